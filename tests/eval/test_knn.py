"""Weighted kNN: equal to a brute-force, loop-per-query reference."""

from __future__ import annotations

import math

import torch

from explora.eval.knn import knn_classify, knn_scores


def _reference(train, train_labels, query, num_classes, k, T):
    out = []
    for q in query:
        sims = [(float(q @ t / (q.norm() * t.norm())), int(y)) for t, y in zip(train, train_labels, strict=True)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += math.exp(s / T)
        out.append(votes)
    return torch.tensor(out, dtype=torch.float64)


def test_knn_matches_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(40, 8, generator=g), torch.randint(0, 5, (40,), generator=g)
    query = torch.randn(13, 8, generator=g)
    scores = knn_scores(train, labels, query, 5, ks=(1, 3, 10), temperature=0.07, chunk_size=4)
    for k in (1, 3, 10):
        ref = _reference(train, labels, query, 5, k, 0.07)
        ref = ref / _reference(train, labels, query, 5, 10, 0.07).sum(1, keepdim=True)  # softmax over the top max(k)
        torch.testing.assert_close(scores[k].double(), ref, rtol=1e-4, atol=1e-6)
        assert torch.equal(scores[k].argmax(1), _reference(train, labels, query, 5, k, 0.07).argmax(1))


def test_knn_classify_top1_top5_and_clusters():
    centres = torch.eye(3, 6)
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat_interleave(20)
    train = centres[labels] + 0.1 * torch.randn(60, 6, generator=g)
    qlabels = torch.tensor([0, 1, 2, 2])
    query = centres[qlabels] + 0.1 * torch.randn(4, 6, generator=g)
    res = knn_classify(train, labels, query, qlabels, 3, ks=(10, 20, 100, 200), chunk_size=3)
    assert set(res["per_k"]) == {"10", "20", "100", "200"}
    assert res["per_k"]["10"]["top1"] == 100.0 and res["top5"] == 100.0
    assert res["best_k"] == 10 and res["num_train"] == 60  # k > N is clipped to N
    assert res["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 2]]
