"""Per-block linear probes on individual patch tokens (paper-notes §5, analyses (2) and (3)).

The paper trains, for every block, a linear classifier on single patch tokens to predict (2) the patch's
position in the image and (3) the image's class; it does not publish the probe protocol. Our choices
(configurable where it matters):

- images (not patches) are split into train/test, so a probe never sees a test image's tokens;
- features are standardised with the train tokens' per-channel mean/std (per block);
- each probe is multinomial logistic regression (zero-initialised linear layer plus a small L2 penalty
  ``weight_decay`` on the weights) fitted full-batch with L-BFGS (strong-Wolfe line search). The problem is convex,
  so the result does not depend on initialisation or data order;
- position is predicted as two classifications, row index (h classes) and column index (w classes); we report
  row, column and joint accuracy (both right: chance is 1 / (h*w)), the joint one as the headline.

All probes of all blocks (row, column, class heads) are fitted as *one* L-BFGS problem whose loss is the sum of
the independent probe losses: the objective is separable, so its minimiser is every probe's own minimiser, and one
batched optimisation costs far less Python overhead than 3 x depth small ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of the linear probes: L-BFGS iterations, L2 penalty on the weights, gradient tolerance."""

    max_iter: int = 200
    weight_decay: float = 1e-4
    tolerance_grad: float = 1e-5


def fit_linear_probes(
    x_train: torch.Tensor,
    targets: Sequence[torch.Tensor],
    num_classes: Sequence[int],
    x_test: torch.Tensor,
    cfg: ProbeConfig = ProbeConfig(),
) -> list[torch.Tensor]:
    """Fit one logistic-regression head per target on each of L feature sets; predict the test features.

    ``x_train``: (L, M, D) features (e.g. one set per block); ``targets``: per head, (M,) int64 labels shared by
    all L sets; ``x_test``: (L, M', D). Returns per head the (L, M') predicted labels.
    """
    sizes = [int(c) for c in num_classes]
    mu = x_train.mean(1, keepdim=True)  # (L, 1, D)
    sd = x_train.std(1, keepdim=True).clamp_min(1e-6)
    xtr = (x_train - mu) / sd  # (L, M, D)
    xte = (x_test - mu) / sd  # (L, M', D)
    n_sets, _, d = xtr.shape
    w = torch.zeros(n_sets, d, sum(sizes), requires_grad=True)  # all heads side by side
    b = torch.zeros(n_sets, 1, sum(sizes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=cfg.max_iter, tolerance_grad=cfg.tolerance_grad,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.baddbmm(b, xtr, w)  # (L, M, sum C)
        loss = cfg.weight_decay * w.square().sum()
        for y, part in zip(targets, logits.split(sizes, dim=-1)):
            # sum over sets of each set's mean cross-entropy
            loss = loss + F.cross_entropy(part.transpose(1, 2), y.expand(n_sets, -1), reduction="mean") * n_sets
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        logits = torch.baddbmm(b, xte, w)  # (L, M', sum C)
        return [part.argmax(-1) for part in logits.split(sizes, dim=-1)]


def split_images(n_images: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (train, test) image indices; at least one image in each when n_images >= 2."""
    if n_images < 2:
        raise ValueError(f"probes need at least 2 images for a train/test split, got {n_images}")
    perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
    n_test = min(max(1, round(n_images * test_fraction)), n_images - 1)
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def blockwise_probes(
    tokens: torch.Tensor,
    positions: torch.Tensor,
    grid: tuple[int, int],
    train_idx: torch.Tensor,
    test_idx: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_classes: int = 0,
    cfg: ProbeConfig = ProbeConfig(),
) -> list[dict[str, dict[str, float] | None]]:
    """Position probe (and class probe when ``labels`` is given) for each block; one dict per block.

    ``tokens``: (L, n_images, P, D) patch tokens of L blocks; ``positions``: (n_images, P) their row-major grid
    indices; ``labels``: (n_images,) image classes, inherited by every patch of the image.
    """
    h, w = grid
    n_blocks, n, p, d = tokens.shape
    rows, cols = positions // w, positions % w  # (n, P) each
    heads = [rows, cols]
    sizes = [h, w]
    if labels is not None:
        heads.append(labels.view(n, 1).expand(n, p))
        sizes.append(num_classes)
    xtr = tokens[:, train_idx].reshape(n_blocks, -1, d)  # (L, M, D)
    xte = tokens[:, test_idx].reshape(n_blocks, -1, d)  # (L, M', D)
    preds = fit_linear_probes(xtr, [t[train_idx].reshape(-1) for t in heads], sizes, xte, cfg)
    ok = [pr == t[test_idx].reshape(1, -1) for pr, t in zip(preds, heads)]  # per head (L, M')
    out: list[dict[str, dict[str, float] | None]] = []
    for i in range(n_blocks):
        rec: dict[str, dict[str, float] | None] = {
            "position": {
                "row_accuracy": ok[0][i].float().mean().item(),
                "col_accuracy": ok[1][i].float().mean().item(),
                "accuracy": (ok[0][i] & ok[1][i]).float().mean().item(),
                "chance": 1.0 / (h * w),
            },
            "class": None,
        }
        if labels is not None:
            majority = torch.bincount(labels[train_idx], minlength=num_classes).argmax()
            rec["class"] = {
                "accuracy": ok[2][i].float().mean().item(),
                "majority_baseline": (labels[test_idx] == majority).float().mean().item(),
            }
        out.append(rec)
    return out


def position_probe(
    tokens: torch.Tensor,
    positions: torch.Tensor,
    grid: tuple[int, int],
    train_idx: torch.Tensor,
    test_idx: torch.Tensor,
    cfg: ProbeConfig = ProbeConfig(),
) -> dict[str, float]:
    """Row/column/joint test accuracy of predicting each patch's grid position from its (n, P, D) tokens."""
    return blockwise_probes(tokens.unsqueeze(0), positions, grid, train_idx, test_idx, cfg=cfg)[0]["position"]


def class_probe(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    train_idx: torch.Tensor,
    test_idx: torch.Tensor,
    cfg: ProbeConfig = ProbeConfig(),
) -> dict[str, float]:
    """Test accuracy of predicting the image class from each individual patch token of (n, P, D) tokens."""
    y = labels.view(-1, 1).expand(tokens.shape[0], tokens.shape[1])  # (n, P)
    preds = fit_linear_probes(tokens[train_idx].reshape(1, -1, tokens.shape[-1]), [y[train_idx].reshape(-1)],
                              [num_classes], tokens[test_idx].reshape(1, -1, tokens.shape[-1]), cfg)
    acc = (preds[0][0] == y[test_idx].reshape(-1)).float().mean().item()
    majority = torch.bincount(labels[train_idx], minlength=num_classes).argmax()
    return {"accuracy": acc, "majority_baseline": (labels[test_idx] == majority).float().mean().item()}
