"""Attention for bf16 training on CPUs: PyTorch's flash-attention forward, a backward written out in matmuls.

Why: on CPU, the backward of ``F.scaled_dot_product_attention``'s flash kernel in bf16 is far slower than its
forward for the short sequences of ViT training crops (measured on a 2-core AMX Xeon, one thread: 65 tokens, 6
heads, batch 16: forward 0.9 ms, backward ~27 ms; the whole ViT-S DinoV2 step spent 35% of its time there).
Written out, the backward is five small matmuls (FlashAttention's recurrence, Dao et al. 2022, Alg. 2, without
tiling: the (T, T) matrix of one head is small): with the ``logsumexp`` the forward returns,

    P = exp(q k^T s - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = s dS K,  dK = s dS^T Q

computed in fp32 from the bf16 inputs, a chunk of (batch x head) rows at a time so that each chunk's (T, T) blocks
stay in cache. Only ``q, k, v, out, lse`` are saved, as the flash kernel saves them, so memory is unchanged.
:class:`CpuBf16Attention` routes eligible ``F.scaled_dot_product_attention`` calls (CPU, bf16, gradients needed, no
mask/dropout/causal, at most :data:`MAX_TOKENS` tokens) here; everything else is untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# up to this many tokens the chunked matmul backward is faster than the kernel's (whole forward + backward, bf16,
# one thread, 2-core AMX Xeon): 17 tokens 4.9x, 65: 3.2x, 197 (MAE's 16-head decoder): 1.7x, 257 (ViT-L/14 at 224
# px): 1.1-1.6x, 577: 1.2x; at 1,025 the kernel is faster (0.76x), as one (T, T) score block outgrows the cache
MAX_TOKENS = 640


# the (rows, T, T) fp32 score blocks of one chunk of (batch x head) rows stay about this size, so that the five
# matmuls and the element-wise work between them run in cache: at T = 197 (8 x 16 rows) one unchunked pass over
# all rows took 35 ms, chunks of 4-8 rows 26-27 ms (2-core AMX Xeon, one thread)
CHUNK_BYTES = 1 << 20


def _chunk_rows(tokens: int) -> int:
    return max(1, CHUNK_BYTES // (4 * tokens * tokens))


class _FlashForwardMatmulBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        s = q.shape[-1] ** -0.5 if scale is None else scale
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=s)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = s
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN205
        q, k, v, out, lse = ctx.saved_tensors
        s = ctx.scale
        shape = q.shape  # (B, H, T, d)
        rows, tokens = shape[0] * shape[1], shape[2]
        q, k, v, out, do = (x.reshape(rows, tokens, shape[3]) for x in (q, k, v, out, grad_out))
        neg_lse = lse.reshape(rows, tokens, 1).float().neg()
        dq, dk, dv = (torch.empty(rows, tokens, shape[3], dtype=x.dtype, device=x.device) for x in (q, k, v))
        step = _chunk_rows(tokens)
        for i in range(0, rows, step):
            r = slice(i, i + step)
            qf, kf, vf, dof = q[r].float(), k[r].float(), v[r].float(), do[r].float()
            p = torch.baddbmm(neg_lse[r], qf, kf.transpose(-2, -1), alpha=s).exp_()  # (n, T, T)
            dv[r] = torch.bmm(p.transpose(-2, -1), dof)
            dp = torch.bmm(dof, vf.transpose(-2, -1))
            delta = (dof * out[r].float()).sum(-1, keepdim=True)  # (n, T, 1)
            ds = p.mul_(dp.sub_(delta)).mul_(s)
            dq[r] = torch.bmm(ds, kf)
            dk[r] = torch.bmm(ds.transpose(-2, -1), qf)
        return dq.view(shape), dk.view(shape), dv.view(shape), None


def cpu_bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, scale=scale)`` for bf16 CPU tensors (B, H, T, d), with the
    matmul backward above."""
    return _FlashForwardMatmulBackward.apply(q, k, v, scale)


def _eligible(args: tuple, kwargs: dict) -> bool:
    if len(args) < 3 or len(args) > 3 or set(kwargs) - {"scale", "dropout_p", "is_causal", "attn_mask"}:
        return False
    q, k, v = args
    if kwargs.get("attn_mask") is not None or kwargs.get("dropout_p", 0.0) or kwargs.get("is_causal", False):
        return False
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return False
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.dim() == 4
            and q.shape == k.shape == v.shape and q.shape[-2] <= MAX_TOKENS)


class CpuBf16Attention(TorchFunctionMode):
    """Inside this mode, eligible ``F.scaled_dot_product_attention`` calls use :func:`cpu_bf16_attention`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _eligible(args, kwargs):
            return cpu_bf16_attention(*args, scale=kwargs.get("scale"))
        return func(*args, **kwargs)


__all__ = ["MAX_TOKENS", "CpuBf16Attention", "cpu_bf16_attention"]
