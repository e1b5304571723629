"""DINO / iBOT / KoLeo losses, centering, Sinkhorn-Knopp and the head against hand computations; fp32 under autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import FP32_ONE_OP

from explora.objectives.dinov2 import DINOHead, DINOLoss, EMACenter, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp


def _ce(p: list[float], z: list[float], temp: float) -> float:
    """-sum_k p_k log softmax(z / temp)_k, by hand."""
    e = [math.exp(v / temp) for v in z]
    s = sum(e)
    return -sum(pk * math.log(ek / s) for pk, ek in zip(p, e))


def test_dino_loss_sums_pair_means_over_every_student_teacher_pair():
    g = torch.Generator().manual_seed(0)
    B, K = 2, 3
    s = torch.randn(3 * B, K, generator=g)  # 3 crops x B, crop-major
    t = torch.softmax(torch.randn(2 * B, K, generator=g), -1)  # 2 teacher views x B, view-major
    got = DINOLoss(student_temp=0.1)(s, t, n_student=3, n_teacher=2)
    want = sum(  # per (crop, view) pair: mean over B; sum over the 3 x 2 pairs
        _ce(t[v * B + b].tolist(), s[c * B + b].tolist(), 0.1) for c in range(3) for v in range(2) for b in range(B)
    ) / B
    assert torch.isclose(got, torch.tensor(want, dtype=torch.float32), **FP32_ONE_OP)


def test_ibot_loss_per_image_weighting():
    masks = torch.tensor([[True, True, False], [False, False, False], [False, True, False]])  # 3 images, N=3
    s = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 0.1]])  # M=3 masked tokens, K=4
    t = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 1.0, 0.0]])
    got = iBOTPatchLoss(student_temp=0.1)(s, t, masks)
    ce = [_ce(t[i].tolist(), s[i].tolist(), 0.1) for i in range(3)]
    want = (ce[0] / 2 + ce[1] / 2 + ce[2] / 1) / 3  # image 0 has 2 masked, image 2 has 1; divide by 3 images
    assert torch.isclose(got, torch.tensor(want, dtype=torch.float32), **FP32_ONE_OP)


def test_koleo_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    got = KoLeoLoss()(x)
    r = 1 / math.sqrt(2)
    d_diag = math.sqrt((1 - r) ** 2 + r**2)  # distance from a unit axis to (r, r)
    want = -(math.log(d_diag) * 3) / 3  # every point's nearest neighbour is at d_diag
    assert torch.isclose(got, torch.tensor(want), atol=1e-5)


def test_koleo_uses_each_points_nearest_other_point():
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0]])  # unit vectors; NN of 0 and 1 is each other, of 2 is 1
    d01 = math.dist((1.0, 0.0), (0.8, 0.6))
    d21 = math.dist((-1.0, 0.0), (0.8, 0.6))
    want = -(math.log(d01) * 2 + math.log(d21)) / 3
    assert torch.isclose(KoLeoLoss()(x), torch.tensor(want), atol=1e-6)


def test_center_softmax_then_ema_update():
    c = EMACenter(3, momentum=0.9)
    t = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 5.0]])  # batch mean (2, 2, 4): not uniform, so centring shows
    p = c.softmax_centered(t, 0.5)
    assert torch.allclose(p, F.softmax(t / 0.5, -1), **FP32_ONE_OP)  # first batch: centre is zero
    c.update(t)
    assert torch.allclose(c.center, 0.1 * torch.tensor([[2.0, 2.0, 4.0]]), **FP32_ONE_OP)
    p2 = c.softmax_centered(t, 0.5)
    assert torch.allclose(p2, F.softmax((t - torch.tensor([[0.2, 0.2, 0.4]])) / 0.5, -1), **FP32_ONE_OP)
    assert not torch.allclose(p2, p, atol=1e-3)  # the centre really changed the targets


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
    assert torch.allclose(sinkhorn_knopp(logits, 0.5, 1), (qq * 6).t(), **FP32_ONE_OP)
    assert sinkhorn_knopp(torch.zeros(0, 4), 0.5).shape == (0, 4)


# -- fp32 under autocast ----------------------------------------------------------------------------------------
K_BIG = 4096  # a bf16 contraction over this many prototypes is off by ~1e-3 relative: far outside fp32 rounding


def _logits(rows: int, seed: int, k: int = K_BIG) -> torch.Tensor:
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) * 0.5


def _dino(x: torch.Tensor) -> torch.Tensor:
    t = torch.softmax(_logits(2 * 8, 1) / 0.05, -1)
    return DINOLoss(0.1)(x, t, n_student=4, n_teacher=2)


def _ibot(x: torch.Tensor) -> torch.Tensor:
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[0, :5], masks[2, 3:12] = True, True  # 14 masked tokens
    t = torch.softmax(_logits(14, 1) / 0.05, -1)
    return iBOTPatchLoss(0.1)(x, t, masks)


def _center_update(x: torch.Tensor) -> torch.Tensor:
    c = EMACenter(x.shape[1])
    c.center.copy_(_logits(1, 3))
    c.update(x)
    return c.center


LOSSES = {  # name -> (function of one (rows, K) input, rows)
    "dino": (_dino, 4 * 8),
    "ibot": (_ibot, 14),
    "koleo": (lambda x: KoLeoLoss()(x), 32),
    "center_softmax": (lambda x: EMACenter(x.shape[1]).softmax_centered(x, 0.04), 16),
    "center_update": (_center_update, 16),
    "sinkhorn": (lambda x: sinkhorn_knopp(x, 0.05, 3), 16),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_loss_under_bf16_autocast_equals_fp32(name, input_dtype):
    """Each loss/target computed inside ``torch.autocast("cpu", bf16)`` is the fp32 computation on the same inputs."""
    fn, rows = LOSSES[name]
    x = _logits(rows, 0).to(input_dtype)  # bf16 inputs: what a head returns under autocast
    want = fn(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["dino", "ibot", "koleo"])
def test_loss_gradient_under_bf16_autocast_equals_fp32(name):
    fn, rows = LOSSES[name]
    x = _logits(rows, 0).requires_grad_(True)
    (want,) = torch.autograd.grad(fn(x), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn(x)
    (got,) = torch.autograd.grad(loss, x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


# -- head ---------------------------------------------------------------------------------------------------------
def test_head_shapes_weight_norm_and_names():
    head = DINOHead(16, n_prototypes=5, hidden_dim=8, bottleneck_dim=4)
    x = torch.randn(3, 16)
    out = head(x)
    assert out.shape == (3, 5)
    # cosine similarities: L2-normalised bottleneck against unit prototype rows (g = 1), whatever the raw scales
    v = head.last_layer.parametrizations.weight.original1  # (5, 4) direction parameter of the weight norm
    cosine = F.normalize(head.mlp(x), dim=-1) @ F.normalize(v, dim=-1).t()
    torch.testing.assert_close(out, cosine, **FP32_ONE_OP)
    assert out.abs().max() > 0.1  # not the tiny raw-scale logits of an unnormalised head (mlp init std 0.02)
    with torch.no_grad():
        v.mul_(torch.tensor([[3.0], [0.5], [7.0], [1.0], [2.0]]))  # rescale every prototype row differently
    torch.testing.assert_close(head(x), out, **FP32_ONE_OP)
    names = {n: p for n, p in head.named_parameters()}
    assert set(names) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
                          "last_layer.parametrizations.weight.original0",
                          "last_layer.parametrizations.weight.original1"}
    assert sum(p.numel() for p in names.values()) == (16 * 8 + 8) + (8 * 8 + 8) + (8 * 4 + 4) + 5 + 5 * 4
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2


def test_weight_norm_gain_trains_by_default_and_scales_the_logits():
    """DinoV2 (``dino_head.py``) trains g; ``freeze_weight_norm_gain=True`` is DINO v1's ``norm_last_layer``."""
    torch.manual_seed(0)
    head = DINOHead(16, n_prototypes=5, hidden_dim=8, bottleneck_dim=4)
    g = head.last_layer.parametrizations.weight.original0
    assert g.shape == (5, 1) and g.requires_grad and torch.all(g == 1)
    x = torch.randn(3, 16)
    out = head(x)
    out.pow(2).sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0
    with torch.no_grad():
        g.mul_(torch.tensor([[2.0], [1.0], [0.5], [1.0], [3.0]]))
    torch.testing.assert_close(head(x), out * torch.tensor([2.0, 1.0, 0.5, 1.0, 3.0]), rtol=1e-5, atol=1e-6)
    frozen = DINOHead(16, n_prototypes=5, hidden_dim=8, bottleneck_dim=4, freeze_weight_norm_gain=True)
    g0 = frozen.last_layer.parametrizations.weight.original0
    assert not g0.requires_grad and torch.all(g0 == 1)
    assert frozen.last_layer.parametrizations.weight.original1.requires_grad
