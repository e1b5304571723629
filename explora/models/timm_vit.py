"""The :class:`~explora.models.encoder.Encoder` view of timm's ``VisionTransformer`` (DinoV2, MAE, and every plain ViT).

timm's ``VisionTransformer`` is not ours, so this adapter is a plain object holding the module, not a parent
``nn.Module``: state-dict keys stay timm's and an export loads with ``timm.create_model``. It asks timm for the
grid, tokens and intermediate blocks rather than re-implementing them; :class:`~explora.models.eva.EvaEncoder`
(DINOv3) subclasses it and changes only what ``Eva`` does differently.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from timm.models.vision_transformer import VisionTransformer

from explora.models.group_channel import pool_tokens
from explora.vit.tokens import forward_tokens, image_hw

POOLS = ("cls", "avg", "cls+avg", "avg_fc_norm")


class TimmViTEncoder:
    """:class:`Encoder` over a timm ``VisionTransformer`` (held as ``vit``; no parameters of its own)."""

    kind: ClassVar[str] = "vit"
    pools: ClassVar[tuple[str, ...]] = POOLS
    default_pool: ClassVar[str] = "cls"
    needs_timestamps: ClassVar[bool] = False

    def __init__(self, vit: VisionTransformer) -> None:
        self.vit = vit

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.vit).__name__}, embed_dim={self.embed_dim})"

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit.num_prefix_tokens)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.patch_size)

    def grid(self, x: torch.Tensor | tuple[int, int]) -> tuple[int, int]:
        """timm's own grid rule (``dynamic_feat_size``: padding / strict size as the patch embedding applies it)."""
        return tuple(int(v) for v in self.vit.patch_embed.dynamic_feat_size(image_hw(x)))

    def forward_features(self, x: torch.Tensor, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        return self.vit.forward_features(x)  # (B, P + N, D)

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None,
                       timestamps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_tokens(self.vit, x, masks, mask_token)

    def get_intermediate_layers(self, x: torch.Tensor, n: int | None = 1, norm: bool = True,
                                timestamps: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """timm ``forward_intermediates`` (DinoV2's ``get_intermediate_layers(..., return_class_token=True)``)."""
        return self.vit.forward_intermediates(
            x, indices=n, norm=norm, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )

    def pool(self, tokens: torch.Tensor, mode: str) -> torch.Tensor:
        return pool_tokens(tokens, mode, self.num_prefix_tokens, self.pools, self.kind)

    def pooled(self, x: torch.Tensor, mode: str, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """``avg_fc_norm``: mean of the last block's patch tokens *before* the final norm (timm
        ``global_pool='avg'``, whose ``fc_norm`` the classifier head owns); other modes as :meth:`pool`."""
        if mode == "avg_fc_norm":
            (patch, _), = self.get_intermediate_layers(x, 1, norm=False)  # (B, N, D), final norm not applied
            return patch.mean(dim=1)  # (B, D)
        return self.pool(self.forward_features(x), mode)

    def probe_features(self, x: torch.Tensor, n_blocks: int,
                       timestamps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS of the last ``n_blocks`` blocks (B, n, D) and the last block's patch mean (B, D), all normed."""
        out = self.get_intermediate_layers(x, n_blocks, norm=True)
        cls = torch.stack([prefix[:, 0] for _, prefix in out], dim=1)  # (B, n, D); prefix (B, 1 + regs, D)
        return cls, out[-1][0].mean(dim=1)  # (B, N, D) -> (B, D)

    def export_config(self) -> None:
        return None


__all__ = ["POOLS", "TimmViTEncoder"]
