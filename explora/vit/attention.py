"""Attention for bf16 training on CPUs: PyTorch's flash-attention forward, a backward written out in matmuls.

Why: on CPU, the backward of ``F.scaled_dot_product_attention``'s flash kernel in bf16 is far slower than its
forward for the short sequences of ViT training crops (measured on a 2-core AMX Xeon, one thread: 65 tokens, 6
heads, batch 16: forward 0.9 ms, backward ~27 ms; the whole ViT-S DinoV2 step spent 35% of its time there).
Written out, the backward is five small matmuls (FlashAttention's recurrence, Dao et al. 2022, Alg. 2, without
tiling: the (T, T) matrix of one head is small): with the ``logsumexp`` the forward returns,

    P = exp(q k^T s - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = s dS K,  dK = s dS^T Q

computed in fp32 from the bf16 inputs. Only ``q, k, v, out, lse`` are saved, as the flash kernel saves them, so
memory is unchanged. :class:`CpuBf16Attention` routes eligible ``F.scaled_dot_product_attention`` calls (CPU, bf16,
gradients needed, no mask/dropout/causal, at most :data:`MAX_TOKENS` tokens) here; everything else is untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# up to this many tokens the matmul backward is faster (ViT-S/14 crops: 17 and 65 tokens; MAE ViT-B/16 encoder: 50);
# at 197 tokens (MAE's 16-head decoder at 224 px) the kernel's backward was faster in the whole step (MAE step
# 2.0 s with the decoder on the kernel's backward, 3.0 s with it on ours), so longer sequences keep it
MAX_TOKENS = 160


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
        qf, kf, vf, do = q.float(), k.float(), v.float(), grad_out.float()  # (B, H, T, d)
        p = torch.exp(torch.matmul(qf, kf.transpose(-2, -1)) * s - lse.float().unsqueeze(-1))  # (B, H, T, T)
        dv = torch.matmul(p.transpose(-2, -1), do)
        dp = torch.matmul(do, vf.transpose(-2, -1))
        delta = (do * out.float()).sum(-1, keepdim=True)  # (B, H, T, 1)
        ds = p.mul_(dp.sub_(delta)).mul_(s)
        dq = torch.matmul(ds, kf)
        dk = torch.matmul(ds.transpose(-2, -1), qf)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


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
