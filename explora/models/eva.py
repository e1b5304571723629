"""The :class:`~explora.models.encoder.Encoder` view of timm's ``Eva``, the architecture of the DINOv3 backbones.

DINOv3 (Siméoni et al., 2025; ``dinov3/models/vision_transformer.py``) is a ViT with 4 register ("storage") tokens
after the cls token, rotary position embeddings (RoPE) on the patch tokens instead of an absolute position
embedding, and LayerScale; timm implements it as ``timm.models.eva.Eva`` (``vit_*_patch16_dinov3``). Like
:class:`~explora.models.encoder.TimmViTEncoder` this adapter is a plain object holding the module, so state-dict
keys stay timm's and an export loads with ``timm.create_model``. What differs from a timm ``VisionTransformer``:

- the masked forward (iBOT) passes the grid's rotary embedding to every block
  (:func:`explora.vit.tokens.forward_tokens` handles ``Eva``); masked patches keep their position through RoPE;
- ``num_prefix_tokens`` is 5 (cls + 4 registers); register tokens are never pooled;
- pools: ``cls`` (upstream DINOv3's feature, :attr:`default_pool`), ``avg`` (timm's default for these models: the
  mean of the normed patch tokens) and ``cls+avg``; ``avg_fc_norm`` needs an ``fc_norm`` DINOv3 does not have.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from timm.models.eva import Eva

from explora.models.group_channel import pool_tokens
from explora.vit.tokens import forward_tokens, image_hw


class EvaEncoder:
    """:class:`~explora.models.encoder.Encoder` over a timm ``Eva`` (held as ``vit``; no parameters of its own)."""

    kind: ClassVar[str] = "eva"
    pools: ClassVar[tuple[str, ...]] = ("cls", "avg", "cls+avg")
    default_pool: ClassVar[str] = "cls"
    needs_timestamps: ClassVar[bool] = False

    def __init__(self, vit: Eva) -> None:
        self.vit = vit

    def __repr__(self) -> str:
        return f"EvaEncoder(embed_dim={self.embed_dim}, prefix_tokens={self.num_prefix_tokens})"

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit.num_prefix_tokens)  # cls + registers (DINOv3: 1 + 4)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.patch_size)

    def grid(self, x: torch.Tensor | tuple[int, int]) -> tuple[int, int]:
        return tuple(int(v) for v in self.vit.patch_embed.dynamic_feat_size(image_hw(x)))

    def forward_features(self, x: torch.Tensor, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        return self.vit.forward_features(x)  # (B, P + N, D), RoPE inside timm's blocks

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None,
                       timestamps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_tokens(self.vit, x, masks, mask_token)  # (B, D), (B, N, D); registers dropped

    def get_intermediate_layers(self, x: torch.Tensor, n: int | None = 1, norm: bool = True,
                                timestamps: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """timm ``Eva.forward_intermediates``: (patch tokens (B, N, D), prefix tokens (B, 5, D)) per block."""
        return self.vit.forward_intermediates(
            x, indices=n, norm=norm, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )

    def pool(self, tokens: torch.Tensor, mode: str) -> torch.Tensor:
        return pool_tokens(tokens, mode, self.num_prefix_tokens, self.pools, self.kind)

    def pooled(self, x: torch.Tensor, mode: str, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(self.forward_features(x), mode)

    def probe_features(self, x: torch.Tensor, n_blocks: int,
                       timestamps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS of the last ``n_blocks`` blocks (B, n, D) and the last block's patch mean (B, D), all normed."""
        out = self.get_intermediate_layers(x, n_blocks, norm=True)
        cls = torch.stack([prefix[:, 0] for _, prefix in out], dim=1)  # (B, n, D)
        return cls, out[-1][0].mean(dim=1)  # (B, N, D) -> (B, D)

    def export_config(self) -> None:
        return None  # timm rebuilds it from ``architecture`` + ``model_args``


__all__ = ["EvaEncoder"]
