"""CLS-to-patch attention of the last block (paper-notes §5: DinoV2 vs ExPLoRA attention visualisation).

timm's ``Attention`` uses fused ``scaled_dot_product_attention`` and never materialises the attention matrix,
so we capture the last block's attention *input* with a forward pre-hook and recompute softmax(q k^T / sqrt(d))
from its own ``qkv`` module. The module is *called* (never its ``.weight`` read), so a LoRA-wrapped ``qkv``
(an ``nn.Linear`` subclass adding its low-rank update in ``forward``) gives the adapted attention; ``q_norm`` /
``k_norm`` are applied as timm does. This mirrors DINO's ``get_last_selfattention`` visualisation
(facebookresearch/dino ``visualize_attention.py``), re-derived for timm modules.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
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


@torch.no_grad()
def last_block_attention(backbone: nn.Module, images: torch.Tensor, block: int = -1) -> torch.Tensor:
    """Full attention probabilities of one block (default the last): (B, heads, N_tokens, N_tokens)."""
    encoder = as_encoder(backbone)
    attn = backbone.blocks[block].attn
    if not isinstance(attn, Attention):
        raise ConfigError(f"blocks[{block}].attn is a {type(attn).__name__}; expected a timm Attention (fused qkv)")
    captured: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        encoder.forward_features(images)
    finally:
        handle.remove()
    return _attention_probs(attn, captured[-1])


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
