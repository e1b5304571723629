"""CPU bf16 attention: the flash forward with a backward written out in matmuls."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from tolerances import FP32_NETWORK
from torch.nn.attention import SDPBackend, sdpa_kernel

from explora.vit import attention
from explora.vit.attention import MAX_TOKENS, CpuBf16Attention, cpu_bf16_attention

SHAPES = [(2, 3, 17, 16), (2, 4, 65, 32), (1, 2, 150, 8)]


def _qkv(shape, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(shape, generator=g) * scale).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("shape, chunk_rows", [(s, None) for s in SHAPES] + [((2, 3, 17, 16), 4)])
def test_matmul_backward_equals_autograd_in_fp32(shape, chunk_rows, monkeypatch):
    """The formula is exact: in fp32 it matches autograd through the reference attention to fp32 round-off, also
    when the (batch x head) rows are back-propagated in chunks (6 rows: a chunk of 4, then the remaining 2)."""
    if chunk_rows:
        monkeypatch.setattr(attention, "CHUNK_BYTES", 4 * shape[2] ** 2 * chunk_rows)
        assert attention._chunk_rows(shape[2]) == chunk_rows
    ref, ours = _qkv(shape), _qkv(shape)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with sdpa_kernel([SDPBackend.MATH]):
        out_ref = F.scaled_dot_product_attention(*ref, scale=0.3)
    out_ref.backward(grad)
    out = cpu_bf16_attention(*ours, scale=0.3)
    out.backward(grad)
    torch.testing.assert_close(out, out_ref, **FP32_NETWORK)  # flash vs unfused forward
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, **FP32_NETWORK)


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_gradients_are_as_accurate_as_the_flash_kernels(shape):
    exact = _qkv(shape)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    F.scaled_dot_product_attention(*exact).backward(grad)
    ours, flash = _qkv(shape, torch.bfloat16), _qkv(shape, torch.bfloat16)
    cpu_bf16_attention(*ours).backward(grad.bfloat16())
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out_flash = F.scaled_dot_product_attention(*flash)
    out_flash.backward(grad.bfloat16())
    with torch.no_grad():
        assert torch.equal(cpu_bf16_attention(*ours), out_flash)  # the same forward kernel
    for e, o, f in zip(exact, ours, flash):
        err_ours = (o.grad.float() - e.grad).norm() / e.grad.norm()
        err_flash = (f.grad.float() - e.grad).norm() / e.grad.norm()
        assert err_ours < 0.02 and err_ours < 1.5 * err_flash + 1e-3


def test_mode_routes_only_eligible_calls():
    def grad_fn(q, k, v, **kw):
        with CpuBf16Attention():
            return type(F.scaled_dot_product_attention(q, k, v, **kw).grad_fn).__name__

    bf16 = _qkv((2, 2, 17, 8), torch.bfloat16)
    assert grad_fn(*bf16) == "_FlashForwardMatmulBackwardBackward"
    assert grad_fn(*bf16, scale=0.5) == "_FlashForwardMatmulBackwardBackward"
    assert grad_fn(*_qkv((2, 2, 17, 8))) != "_FlashForwardMatmulBackwardBackward"  # fp32: the kernel's own
    assert grad_fn(*bf16, is_causal=True) != "_FlashForwardMatmulBackwardBackward"
    mask = torch.ones(17, 17, dtype=torch.bool)
    assert grad_fn(*bf16, attn_mask=mask) != "_FlashForwardMatmulBackwardBackward"
    long = _qkv((1, 1, MAX_TOKENS + 1, 8), torch.bfloat16)
    assert grad_fn(*long) != "_FlashForwardMatmulBackwardBackward"
    with torch.no_grad(), CpuBf16Attention():  # inference: the kernel's own forward
        assert F.scaled_dot_product_attention(*bf16).grad_fn is None


def test_timm_block_under_the_mode_matches_without(tiny_dinov2):
    """A ViT's blocks under bf16 autocast: the same loss and (bf16-close) gradients with and without the mode."""
    x = torch.randn(2, 3, 32, 32)

    def run(mode: bool):
        tiny_dinov2.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), CpuBf16Attention() if mode else contextlib.nullcontext():
            loss = tiny_dinov2.forward_features(x).float().square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tiny_dinov2.named_parameters()}

    loss_a, grads_a = run(False)
    loss_b, grads_b = run(True)
    torch.testing.assert_close(loss_a, loss_b)  # the forward is the same kernel
    for name, g in grads_a.items():
        rel = (grads_b[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 0.05, name
