"""CLS-to-patch attention of the last block (paper-notes §5: DinoV2 vs ExPLoRA attention visualisation).

timm's ``Attention`` uses fused ``scaled_dot_product_attention`` and never materialises the attention matrix,
so we capture the last block's attention *input* with a forward pre-hook and recompute softmax(q k^T / sqrt(d))
from its own ``qkv`` module. The module is *called* (never its ``.weight`` read), so a LoRA-wrapped ``qkv``
(an ``nn.Linear`` subclass adding its low-rank update in ``forward``) gives the adapted attention; ``q_norm`` /
``k_norm`` are applied as timm does. This mirrors DINO's ``get_last_selfattention`` visualisation
(facebookresearch/dino ``visualize_attention.py``), re-derived for timm modules.

timm's ``EvaAttention`` (DINOv3) adds its q/v bias after ``qkv`` and rotates q and k of the patch tokens with the
block's RoPE (the ``rope`` keyword the pre-hook captures), as its own forward does.
"""

from __future__ import annotations

import torch
from timm.layers import Attention, apply_rot_embed_cat
from timm.models.eva import EvaAttention
from torch import nn

from explora.analysis.features import patch_grid
from explora.core.errors import ConfigError
from explora.models.encoder import as_encoder


def _attention_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Full attention probabilities of a timm ``Attention`` for its input x: (B, N, C) -> (B, heads, N, N)."""
    b, n, _ = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)


def _eva_attention_probs(attn: EvaAttention, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """Full attention probabilities of a fused-qkv timm ``EvaAttention``: (B, N, C) -> (B, heads, N, N)."""
    b, n, _ = x.shape
    qkv = attn.qkv(x)  # (B, N, 3 * heads * hd); the fused Eva qkv Linear has no bias of its own
    if attn.q_bias is not None:
        qkv = qkv + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    if rope is not None:  # RoPE on the patch tokens only, after the prefix (cls + registers)
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)


@torch.no_grad()
def last_block_attention(backbone: nn.Module, images: torch.Tensor, block: int = -1) -> torch.Tensor:
    """Full attention probabilities of one block (default the last): (B, heads, N_tokens, N_tokens)."""
    encoder = as_encoder(backbone)
    attn = backbone.blocks[block].attn
    eva = isinstance(attn, EvaAttention) and attn.qkv is not None
    if not isinstance(attn, Attention) and not eva:
        raise ConfigError(f"blocks[{block}].attn is a {type(attn).__name__}; expected a timm Attention or a fused-qkv "
                          "EvaAttention")
    captured: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    handle = attn.register_forward_pre_hook(
        lambda _m, args, kwargs: captured.append((args[0], kwargs.get("rope", args[1] if len(args) > 1 else None))),
        with_kwargs=True,
    )
    try:
        encoder.forward_features(images)
    finally:
        handle.remove()
    x, rope = captured[-1]
    return _eva_attention_probs(attn, x, rope) if eva else _attention_probs(attn, x)


@torch.no_grad()
def attention_maps(
    backbone: nn.Module, images: torch.Tensor, renormalize: bool = True, block: int = -1
) -> torch.Tensor:
    """CLS-to-patch attention per head on the patch grid: (B, C, H, W) -> (B, heads, h, w).

    With ``renormalize`` (default) each head's map is divided by its total attention on patch tokens, so it sums
    to 1 over patches (attention the CLS token pays to itself and to register tokens is dropped, which keeps
    maps comparable between backbones with and without registers). Without it the raw probabilities are returned.
    """
    if backbone.cls_token is None:
        raise ConfigError("backbone has no CLS token; CLS-to-patch attention maps need one")
    probs = last_block_attention(backbone, images, block)  # (B, heads, N, N)
    h, w = patch_grid(backbone, (images.shape[-2], images.shape[-1]))
    npre = backbone.num_prefix_tokens
    cls_to_patch = probs[:, :, 0, npre:]  # (B, heads, N_patch)
    if cls_to_patch.shape[-1] != h * w:
        raise ConfigError(f"last block has {cls_to_patch.shape[-1]} patch tokens, expected the {h}x{w} grid")
    if renormalize:
        cls_to_patch = cls_to_patch / cls_to_patch.sum(-1, keepdim=True)
    return cls_to_patch.reshape(*cls_to_patch.shape[:2], h, w)  # (B, heads, h, w)
