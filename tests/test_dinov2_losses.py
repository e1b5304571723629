"""DINO / iBOT / KoLeo losses, centering, Sinkhorn-Knopp and the head against hand computations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from explora.objectives.dinov2 import DINOHead, DINOLoss, EMACenter, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp


def _ce(p: list[float], z: list[float], temp: float) -> float:
    """-sum_k p_k log softmax(z / temp)_k, by hand."""
    e = [math.exp(v / temp) for v in z]
    s = sum(e)
    return -sum(pk * math.log(ek / s) for pk, ek in zip(p, e))


def test_dino_loss_sums_pair_means():
    s = torch.tensor([[0.1, 0.2, 0.3], [0.3, -0.1, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])  # 2 crops x B=2
    t = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]])  # 1 teacher view x B=2
    got = DINOLoss(student_temp=0.1)(s, t, n_student=2, n_teacher=1)
    want = sum(
        _ce(t[b].tolist(), s[c * 2 + b].tolist(), 0.1) for c in range(2) for b in range(2)
    ) / 2  # per pair: mean over B=2; sum over 2 pairs
    assert torch.isclose(got, torch.tensor(want, dtype=torch.float32), rtol=1e-5)


def test_ibot_loss_per_image_weighting():
    masks = torch.tensor([[True, True, False], [False, False, False], [False, True, False]])  # 3 images, N=3
    s = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 0.1]])  # M=3 masked tokens, K=4
    t = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 1.0, 0.0]])
    got = iBOTPatchLoss(student_temp=0.1)(s, t, masks)
    ce = [_ce(t[i].tolist(), s[i].tolist(), 0.1) for i in range(3)]
    want = (ce[0] / 2 + ce[1] / 2 + ce[2] / 1) / 3  # image 0 has 2 masked, image 2 has 1; divide by 3 images
    assert torch.isclose(got, torch.tensor(want, dtype=torch.float32), rtol=1e-5)


def test_koleo_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    got = KoLeoLoss()(x)
    r = 1 / math.sqrt(2)
    d_diag = math.sqrt((1 - r) ** 2 + r**2)  # distance from a unit axis to (r, r)
    want = -(math.log(d_diag) * 3) / 3  # every point's nearest neighbour is at d_diag
    assert torch.isclose(got, torch.tensor(want), atol=1e-5)


def test_center_softmax_then_ema_update():
    c = EMACenter(3, momentum=0.9)
    t = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    p = c.softmax_centered(t, 0.5)
    assert torch.allclose(p, F.softmax(t / 0.5, -1))  # first batch: centre is zero
    c.update(t)
    assert torch.allclose(c.center, 0.1 * torch.tensor([[2.0, 2.0, 2.0]]))
    p2 = c.softmax_centered(t, 0.5)
    assert torch.allclose(p2, F.softmax((t - c.center) / 0.5, -1))


def test_sinkhorn_rows_and_columns():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    q = sinkhorn_knopp(logits, temp=0.5, n_iterations=3)
    assert q.shape == (6, 4)
    assert torch.allclose(q.sum(1), torch.ones(6), atol=1e-5)  # each sample a distribution (exact after last step)
    assert torch.allclose(q.sum(0), torch.full((4,), 6 / 4), atol=0.1)  # prototypes ~equally used
    q_many = sinkhorn_knopp(logits, temp=0.5, n_iterations=200)
    assert torch.allclose(q_many.sum(0), torch.full((4,), 1.5), atol=1e-4)
    # hand computation of one iteration
    qq = torch.exp(logits / 0.5).t()
    qq /= qq.sum()
    qq /= qq.sum(1, keepdim=True) * 4
    qq /= qq.sum(0, keepdim=True) * 6
    assert torch.allclose(sinkhorn_knopp(logits, 0.5, 1), (qq * 6).t(), atol=1e-6)
    assert sinkhorn_knopp(torch.zeros(0, 4), 0.5).shape == (0, 4)


def test_head_shapes_weight_norm_and_names():
    head = DINOHead(16, n_prototypes=5, hidden_dim=8, bottleneck_dim=4)
    out = head(torch.randn(3, 16))
    assert out.shape == (3, 5)
    assert out.abs().max() <= 1 + 1e-5  # cosine similarities: unit input, unit prototype rows (g = 1)
    names = {n: p for n, p in head.named_parameters()}
    g = [p for n, p in names.items() if "original0" in n][0]
    assert not g.requires_grad and torch.all(g == 1)
    assert all("last_layer" in n for n in names if "original" in n)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == 3
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
