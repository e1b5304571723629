"""Classifier and pooled-feature modules on top of any :class:`~explora.models.encoder.Encoder`.

:class:`ClassifierModel` is what fine-tuning trains (encoder + linear head); :class:`PooledEncoder` is the
``images -> (B, D)`` feature function downstream evaluation of an MAE export uses. Both pool through the encoder's
own :meth:`~explora.models.encoder.Encoder.pool`, so every encoder kind pools one way everywhere.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers import DropPath, calculate_drop_path_rates
from timm.models.eva import EvaBlock
from timm.models.vision_transformer import Block
from torch import nn

from explora.core.errors import ConfigError
from explora.models.encoder import POOLS as ENCODER_POOLS
from explora.models.encoder import Encoder, as_encoder, is_encoder

Pool = Literal["cls", "avg", "cls+avg", "avg_fc_norm", "auto"]
POOLS = (*ENCODER_POOLS, "auto")


def resolve_pool(encoder: Encoder, pool: Pool) -> str:
    """``auto``: the encoder's ``default_pool`` (the mean over all non-prefix tokens for group-channel / temporal
    encoders, as SatMAE fine-tunes them and as their pre-training export pools; the final-norm CLS token for plain
    ViTs). ``avg_fc_norm`` needs a plain timm ViT (its un-normalised last-block tokens)."""
    if pool == "auto":
        return encoder.default_pool
    if pool not in POOLS:
        raise ConfigError(f"pool: got {pool!r}, expected one of {list(POOLS)}")
    if pool not in encoder.pools:
        raise ConfigError(
            f"pool {pool!r} pools the un-normalised tokens of a plain timm ViT; a {encoder.kind} encoder is not one "
            f"(use one of {list(encoder.pools)} or 'auto')"
        )
    return pool


class PooledEncoder(nn.Module):
    """``images [, timestamps] -> (B, D)``: an encoder's pooled feature (default ``avg``: the mean of the normed
    output over ALL non-prefix tokens, every group/frame and position, SatMAE's fine-tuning pooling; for a plain
    ViT global average pooling over patches, MAE's fine-tune default)."""

    def __init__(self, encoder: nn.Module, mode: str = "avg") -> None:
        super().__init__()
        self.encoder = encoder
        view = as_encoder(encoder)
        self.mode = resolve_pool(view, mode)
        self.num_prefix_tokens = view.num_prefix_tokens
        self.num_features = view.embed_dim * (2 if self.mode == "cls+avg" else 1)

    def forward(self, x: torch.Tensor, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) [, timestamps (B, T, 3)] -> (B, D)."""
        return as_encoder(self.encoder).pooled(x, self.mode, timestamps)


class ClassifierModel(nn.Module):
    """An encoder and one linear head on the final-norm CLS token, the mean patch token, or both concatenated, or
    (``avg_fc_norm``) on a LayerNorm ``fc_norm`` of the mean of the last block's patch tokens *before* the final
    norm: timm's ``global_pool='avg'`` (``fc_norm`` after the pool, the final ``norm`` unused), which MAE fine-tuning
    and the official ExPLoRA fine-tuning use. ``fc_norm`` starts fresh (weight 1, bias 0, the backbone norm's eps),
    as the checkpoint has no such tensor (MAE ``main_finetune.py``: missing keys ``fc_norm.*``).

    ``backbone`` is any registered encoder (:func:`~explora.models.encoder.as_encoder`: a timm ViT, a
    group-channel / temporal encoder, whose ``avg`` pools over every group/frame and position), or any other module
    mapping images to pooled (B, D) features (then ``pool`` is ignored and ``in_dim`` must be given, except for a
    :class:`PooledEncoder`). ``pool='auto'``: the encoder's ``default_pool``. ``forward(images, timestamps=None)``:
    temporal encoders need the (B, T, 3) frame timestamps; others ignore them.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        pool: Pool = "auto",
        in_dim: int | None = None,
        head_init_std: float = 2e-5,
    ):
        super().__init__()
        self.backbone = backbone
        self.is_encoder = is_encoder(backbone)
        if self.is_encoder:
            encoder = as_encoder(backbone)
            self.pool = resolve_pool(encoder, pool)
            self.needs_timestamps = encoder.needs_timestamps
            dim = in_dim or encoder.embed_dim * (2 if self.pool == "cls+avg" else 1)
        else:  # a pooling callable
            self.pool = "pooled"
            self.needs_timestamps = False
            dim = in_dim or (backbone.num_features if isinstance(backbone, PooledEncoder) else None)
            if dim is None:
                raise ConfigError(f"{type(backbone).__name__} is not a registered encoder; pass in_dim, the size "
                                  "of the (B, D) features it returns")
        self.fc_norm = nn.LayerNorm(dim, eps=_norm_eps(backbone)) if self.pool == "avg_fc_norm" else None
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)  # MAE main_finetune.py
        nn.init.zeros_(self.head.bias)

    def features(self, images: torch.Tensor, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) [+ timestamps (B, T, 3)] -> pooled (B, D) (2D for ``cls+avg``)."""
        if not self.is_encoder:  # a pooling callable; like extract_features, extra inputs go positionally
            return self.backbone(images) if timestamps is None else self.backbone(images, timestamps)  # (B, D)
        encoder = as_encoder(self.backbone)
        if self.fc_norm is not None:  # timm global_pool='avg': blocks -> mean of the patch tokens -> fc_norm
            return self.fc_norm(encoder.pooled(images, "avg_fc_norm"))  # (B, D)
        return encoder.pool(encoder.forward_features(images, timestamps), self.pool)  # through the final norm

    def forward(self, images: torch.Tensor, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(images, timestamps))  # (B, K)


def _norm_eps(backbone: nn.Module) -> float:
    """The final norm's eps (timm ViTs: a LayerNorm), which a fresh ``fc_norm`` copies; 1e-6 otherwise."""
    norm = backbone.norm if isinstance(backbone, nn.Module) and is_encoder(backbone) else None
    return float(norm.eps) if isinstance(norm, nn.LayerNorm) else 1e-6


def set_linear_drop_path(backbone: nn.Module, rate: float) -> None:
    """timm's stochastic-depth rule (``VisionTransformer(drop_path_rate=rate)``, which MAE fine-tuning uses): block
    ``i`` of ``n`` drops its residual branches with probability ``rate * i / (n - 1)``; rate 0 removes drop path."""
    as_encoder(backbone)  # every registered encoder has timm blocks
    blocks = backbone.blocks
    for block, p in zip(blocks, calculate_drop_path_rates(rate, len(blocks)), strict=True):
        if not isinstance(block, Block | EvaBlock):
            raise ConfigError(f"drop path: {type(block).__name__} blocks are not timm Blocks (drop_path1/drop_path2)")
        block.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        block.drop_path2 = DropPath(p) if p > 0 else nn.Identity()


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters of the backbone (LoRA / all) and of the head (with a trained ``fc_norm``), reported
    separately as in the paper."""
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad) if m is not None else 0  # noqa: E731
    return {"backbone": count(model.backbone), "head": count(model.head) + count(getattr(model, "fc_norm", None))}


__all__ = ["POOLS", "ClassifierModel", "Pool", "PooledEncoder", "resolve_pool", "set_linear_drop_path",
           "trainable_counts"]
