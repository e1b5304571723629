"""Token-level forward of a timm ViT with optional iBOT patch masking.

timm's ``VisionTransformer`` has no mask token and no ``masks=`` argument, but DinoV2's iBOT loss needs the student
to see masked global crops. DinoV2 (``dinov2/models/vision_transformer.py``, ``prepare_tokens_with_masks``) replaces
the masked *patch embeddings* by a learned mask token *before* the position embeddings are added, so a masked
token still knows where it is. This module does exactly that with timm's own sub-modules (``patch_embed``,
``_pos_embed``, ``patch_drop``, ``norm_pre``, ``blocks``, ``norm``), so LoRA layers, register tokens and dynamic
image sizes behave as in timm's ``forward_features``.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint


class FrozenWeightCastCache(TorchFunctionMode):
    """Under autocast, give ``F.linear`` one cached low-precision copy of each *frozen* fp32 weight.

    Why: autocast caches casts only of leaf tensors that require grad, so a frozen weight (most of an ExPLoRA
    backbone) is re-cast on every call - three times per DinoV2 step (teacher, global, local crops). Frozen weights
    never change, so one cast is enough. The cast is the same ``Tensor.to`` autocast would do, so results are
    bit-identical; a weight modified in place (``_version`` changes) is re-cast. Costs a bf16 copy of the frozen
    weights (half their fp32 size). Outside autocast, or for trainable weights, it does nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[int, tuple[weakref.ref, int, torch.dtype, torch.Tensor]] = {}

    def _low(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        hit = self._cache.get(id(w))
        if hit is not None and hit[0]() is w and hit[1] == w._version and hit[2] == dtype:
            return hit[3]
        low = w.detach().to(dtype)
        self._cache[id(w)] = (weakref.ref(w), w._version, dtype, low)
        return low

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2:
            w = args[1]
            dev = w.device.type
            if (isinstance(w, nn.Parameter) and not w.requires_grad and w.dtype == torch.float32
                    and torch.is_autocast_enabled(dev)):
                dtype = torch.get_autocast_dtype(dev)
                if dtype != torch.float32:
                    args = (args[0], self._low(w, dtype), *args[2:])
        return func(*args, **kwargs)


def embed_tokens(vit: nn.Module, x: torch.Tensor, masks: torch.Tensor | None = None,
                 mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """Patch-embed ``x``, swap masked patches for ``mask_token``, add prefix tokens and position embeddings.

    Returns the token sequence (B, num_prefix_tokens + N, D) that enters the first block.
    """
    tokens = vit.patch_embed(x)  # (B, H, W, D) with dynamic_img_size, else (B, N, D)
    if masks is not None:
        if mask_token is None:
            raise ValueError("forward_tokens: masks given without a mask_token")
        b, d = tokens.shape[0], tokens.shape[-1]
        n = tokens[0].numel() // d
        if masks.shape != (b, n):
            raise ValueError(f"forward_tokens: masks must be ({b}, {n}) for this input, got {tuple(masks.shape)}")
        m = masks.reshape(tokens.shape[:-1]).unsqueeze(-1)  # (B, H, W, 1) or (B, N, 1)
        tokens = torch.where(m, mask_token.reshape(d).to(tokens.dtype), tokens)
    tokens = vit._pos_embed(tokens)  # (B, P + N, D): cls/reg tokens prepended, pos-embed resampled to the grid
    tokens = vit.patch_drop(tokens)
    return vit.norm_pre(tokens)


def run_blocks(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Run ``vit.blocks`` then ``vit.norm``; per-block non-reentrant checkpointing when ``vit.grad_checkpointing``.

    Non-reentrant checkpointing is forced because with LoRA the input of a frozen early block may not require grad,
    which silently drops gradients under the reentrant variant (peft#1142).
    """
    if getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled():
        for blk in vit.blocks:
            tokens = checkpoint(blk, tokens, use_reentrant=False)
    else:
        tokens = vit.blocks(tokens)
    return vit.norm(tokens)


def forward_tokens(vit: nn.Module, x: torch.Tensor, masks: torch.Tensor | None = None,
                   mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normed class token (B, D) and patch tokens (B, N, D) of ``vit`` on images ``x`` (B, C, H, W).

    ``masks`` (B, N) bool marks patches (row-major over the patch grid) replaced by ``mask_token`` (1, D) or (D,).
    Register tokens (``vit.num_prefix_tokens`` > 1) are dropped from the patch output. With ``masks=None`` the
    result equals timm's ``forward_features`` split into ``[:, 0]`` and ``[:, num_prefix_tokens:]``.
    """
    tokens = run_blocks(vit, embed_tokens(vit, x, masks, mask_token))  # (B, P + N, D)
    p = vit.num_prefix_tokens
    cls = tokens[:, 0] if getattr(vit, "cls_token", None) is not None else tokens[:, p:].mean(1)
    return cls, tokens[:, p:]
