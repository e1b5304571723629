"""Token-level forward of a timm ViT with optional iBOT patch masking.

timm's ``VisionTransformer`` has no mask token and no ``masks=`` argument, but DinoV2's iBOT loss needs the student
to see masked global crops. DinoV2 (``dinov2/models/vision_transformer.py``, ``prepare_tokens_with_masks``) replaces
the masked *patch embeddings* by a learned mask token *before* the position embeddings are added, so a masked
token still knows where it is. This module does exactly that with timm's own sub-modules (``patch_embed``,
``_pos_embed``, ``patch_drop``, ``norm_pre``, ``blocks``, ``norm``), so LoRA layers, register tokens and dynamic
image sizes behave as in timm's ``forward_features``.

timm's ``Eva`` (DINOv3, EVA) has no absolute position embedding to add after masking: its ``_pos_embed`` returns
the tokens with cls/register tokens prepended and the rotary embedding of the patch grid, which every block takes
as ``rope=``. The same functions handle it (``rope`` travels from :func:`embed_tokens_rope` to :func:`run_blocks`),
so a masked token there keeps its position through RoPE, as in DINOv3's ``prepare_tokens_with_masks``.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from timm.models.eva import Eva
from torch import nn

from explora.core.errors import ConfigError


def apply_mask_token(tokens: torch.Tensor, masks: torch.Tensor | None,
                     mask_token: torch.Tensor | None) -> torch.Tensor:
    """Patch embeddings (B, ..., D) with the ``masks`` (B, N) positions (row-major over ``...``) set to ``mask_token``.

    Applied before any position / group / time encoding is added, as DinoV2's ``prepare_tokens_with_masks`` does.
    ``masks=None`` returns ``tokens`` unchanged.
    """
    if masks is None:
        return tokens
    if mask_token is None:
        raise ValueError("forward_tokens: masks given without a mask_token")
    b, d = tokens.shape[0], tokens.shape[-1]
    n = tokens[0].numel() // d
    if masks.shape != (b, n):
        raise ValueError(f"forward_tokens: masks must be ({b}, {n}) for this input, got {tuple(masks.shape)}")
    m = masks.reshape(tokens.shape[:-1]).unsqueeze(-1)  # (B, ..., 1)
    return torch.where(m, mask_token.reshape(d).to(tokens.dtype), tokens)


def embed_tokens(vit: nn.Module, x: torch.Tensor, masks: torch.Tensor | None = None,
                 mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """Patch-embed ``x``, swap masked patches for ``mask_token``, add prefix tokens and position embeddings.

    Returns the token sequence (B, num_prefix_tokens + N, D) that enters :func:`run_blocks` (which applies
    ``norm_pre``). For an ``Eva`` the rotary embedding the blocks need is dropped: use :func:`embed_tokens_rope`.
    """
    return embed_tokens_rope(vit, x, masks, mask_token)[0]


def embed_tokens_rope(vit: nn.Module, x: torch.Tensor, masks: torch.Tensor | None = None,
                      mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`embed_tokens` and the rotary embedding of the patch grid its blocks take (None without RoPE).

    ``Eva`` options this path does not follow (patch dropout, depth-dependent "mixed" RoPE) raise ConfigError.
    """
    tokens = apply_mask_token(vit.patch_embed(x), masks, mask_token)  # (B, H, W, D) dynamic size, else (B, N, D)
    if not isinstance(vit, Eva):
        tokens = vit._pos_embed(tokens)  # (B, P + N, D): cls/reg tokens prepended, pos-embed resampled to the grid
        return vit.patch_drop(tokens), None
    if vit.patch_drop is not None or getattr(vit, "rope_mixed", False):
        raise ConfigError("forward_tokens: Eva patch dropout and mixed-mode RoPE are not supported; build the "
                          "backbone with patch_drop_rate=0 and a non-mixed rope_type (DINOv3's 'dinov3')")
    tokens, rope = vit._pos_embed(tokens)  # (B, P + N, D), rope for the N patch tokens (or None)
    return tokens, rope


def run_blocks(model: nn.Module, tokens: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
    """``norm_pre`` -> blocks -> ``norm`` of a timm ViT (or an encoder sharing its blocks): (B, T, D) -> (B, T, D).

    ``rope`` (an ``Eva``'s rotary embedding, :func:`embed_tokens_rope`) is passed to every block when given.
    Per-block non-reentrant checkpointing when ``model.grad_checkpointing``: non-reentrant because with LoRA the
    input of a frozen early block may not require grad, which silently drops gradients under the reentrant
    variant (peft#1142).
    """
    kwargs = {} if rope is None else {"rope": rope}
    tokens = model.norm_pre(tokens)
    if model.grad_checkpointing and torch.is_grad_enabled():
        for blk in model.blocks:
            tokens = torch.utils.checkpoint.checkpoint(blk, tokens, use_reentrant=False, **kwargs)
    else:
        for blk in model.blocks:
            tokens = blk(tokens, **kwargs)
    return model.norm(tokens)


def image_hw(x: torch.Tensor | tuple[int, int]) -> tuple[int, int]:
    """(H, W) of an image batch (..., H, W), or the pair itself."""
    return (int(x.shape[-2]), int(x.shape[-1])) if isinstance(x, torch.Tensor) else (int(x[0]), int(x[1]))


def patch_grid_size(x: torch.Tensor | tuple[int, int], patch: int | tuple[int, int]) -> tuple[int, int]:
    """The (h, w) patch grid of an image batch (or an (H, W) size); raises when the size is not a multiple of the
    patch."""
    p = patch if isinstance(patch, int) else patch[0]
    H, W = image_hw(x)
    if H % p or W % p:
        raise ConfigError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    return H // p, W // p


def forward_tokens(vit: nn.Module, x: torch.Tensor, masks: torch.Tensor | None = None,
                   mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normed class token (B, D) and patch tokens (B, N, D) of ``vit`` on images ``x`` (B, C, H, W).

    ``masks`` (B, N) bool marks patches (row-major over the patch grid) replaced by ``mask_token`` (1, D) or (D,).
    Register tokens (``vit.num_prefix_tokens`` > 1) are dropped from the patch output. With ``masks=None`` the
    result equals timm's ``forward_features`` split into ``[:, 0]`` and ``[:, num_prefix_tokens:]``.
    """
    tokens = run_blocks(vit, *embed_tokens_rope(vit, x, masks, mask_token))  # (B, P + N, D)
    p = vit.num_prefix_tokens
    cls = tokens[:, 0] if vit.cls_token is not None else tokens[:, p:].mean(1)
    return cls, tokens[:, p:]
