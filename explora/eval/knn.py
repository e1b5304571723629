"""Weighted kNN classification on L2-normalised frozen features (DinoV2 ``eval/knn.py``, ExPLoRA ``linprobe/knn.py``).

For each query the ``max(k)`` most cosine-similar training samples vote for their labels with weight
``exp(sim / T)`` (upstream: softmax of the top-``max(k)`` similarities over ``T`` -- the same ranking, since the
softmax denominator is shared by all classes of a query). Upstream defaults: k in {10, 20, 100, 200}, T = 0.07,
full training set, eval transform on both splits. Similarities are computed a chunk of queries at a time so memory
stays at ``chunk_size x len(train)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from explora.core.errors import ConfigError
from explora.eval.metrics import classification_metrics

UPSTREAM_KS = (10, 20, 100, 200)


@torch.no_grad()
def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    num_classes: int,
    ks: tuple[int, ...] = UPSTREAM_KS,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """Per k, the (Q, K) class vote totals of every query. Features are L2-normalised here."""
    if not ks or min(ks) < 1:
        raise ConfigError(f"kNN needs positive k values, got {ks}")
    train = F.normalize(train_feats.float(), dim=1)  # (N, D)
    query = F.normalize(query_feats.float(), dim=1)  # (Q, D)
    max_k = min(max(ks), train.shape[0])
    onehot = F.one_hot(train_labels.long(), num_classes).float()  # (N, K)
    scores = {k: [] for k in ks}
    for start in range(0, query.shape[0], chunk_size):
        sim = query[start : start + chunk_size] @ train.T  # (q, N) cosine similarities
        top_sim, top_idx = sim.topk(max_k, dim=1)  # (q, max_k), sorted descending
        weights = torch.softmax(top_sim / temperature, dim=1)  # (q, max_k) == exp(sim/T) up to a per-row constant
        votes = onehot[top_idx] * weights[..., None]  # (q, max_k, K)
        for k in ks:
            scores[k].append(votes[:, : min(k, max_k)].sum(dim=1))  # (q, K)
    return {k: torch.cat(v) for k, v in scores.items()}


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    ks: tuple[int, ...] = UPSTREAM_KS,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Top-1/top-5 (and per-class accuracy, confusion matrix) for every k; ``best_k`` by top-1."""
    scores = knn_scores(train_feats, train_labels, query_feats, num_classes, ks, temperature, chunk_size)
    per_k = {k: classification_metrics(s, query_labels, num_classes) for k, s in scores.items()}
    best_k = max(per_k, key=lambda k: per_k[k]["top1"])
    out = dict(per_k[best_k])
    out.update(
        protocol="knn",
        best_k=best_k,
        temperature=temperature,
        num_train=int(train_feats.shape[0]),
        per_k={str(k): {"top1": m["top1"], "top5": m["top5"]} for k, m in per_k.items()},
    )
    return out
