"""The :class:`~explora.models.encoder.Encoder` view of timm's ``Eva``, the architecture of the DINOv3 backbones.

DINOv3 (Siméoni et al., 2025; ``dinov3/models/vision_transformer.py``) is a ViT with 4 register ("storage") tokens
after the cls token, rotary position embeddings (RoPE) on the patch tokens instead of an absolute position
embedding, and LayerScale; timm implements it as ``timm.models.eva.Eva`` (``vit_*_patch16_dinov3``), with the
same ``patch_embed``, ``forward_features`` and ``forward_intermediates`` as its ``VisionTransformer``, so this
adapter is :class:`~explora.models.timm_vit.TimmViTEncoder` with what differs:

- the masked forward (iBOT) passes the grid's rotary embedding to every block
  (:func:`explora.vit.tokens.forward_tokens` handles ``Eva``); masked patches keep their position through RoPE;
- ``num_prefix_tokens`` is 5 (cls + 4 registers); register tokens are never pooled;
- pools: ``cls`` (upstream DINOv3's feature, :attr:`default_pool`), ``avg`` (timm's default for these models: the
  mean of the normed patch tokens) and ``cls+avg``; ``avg_fc_norm`` needs an ``fc_norm`` DINOv3 does not have.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from explora.models.timm_vit import TimmViTEncoder


class EvaEncoder(TimmViTEncoder):
    """:class:`~explora.models.encoder.Encoder` over a timm ``Eva`` (held as ``vit``: ``EvaEncoder(eva)``; no
    parameters of its own)."""

    kind: ClassVar[str] = "eva"
    pools: ClassVar[tuple[str, ...]] = ("cls", "avg", "cls+avg")  # no fc_norm: no avg_fc_norm

    def __repr__(self) -> str:
        return f"EvaEncoder(embed_dim={self.embed_dim}, prefix_tokens={self.num_prefix_tokens})"

    def pooled(self, x: torch.Tensor, mode: str, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(self.forward_features(x), mode)  # avg_fc_norm is refused by pool()


__all__ = ["EvaEncoder"]
