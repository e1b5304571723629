"""The one interface every explora encoder speaks, and the one place that says which modules are encoders.

Why a protocol: evaluation, fine-tuning, export, analysis and the objectives need the same handful of things from
an encoder (its width, patch grid, normed tokens, intermediate blocks, a pooled feature, how an export rebuilds
it). Asking the module for them by name (``hasattr``, ``inspect.signature``) silently took another branch when a
name was missing; :func:`as_encoder` instead dispatches on the module's type and raises for anything unknown.

- timm's ``VisionTransformer`` is not ours, so :class:`~explora.models.timm_vit.TimmViTEncoder` adapts it; timm's
  ``Eva`` (DINOv3) gets its subclass :class:`~explora.models.eva.EvaEncoder`. Both are plain objects holding the
  module, not a parent ``nn.Module``, so state-dict keys stay timm's.
- The group-channel and temporal encoders (:mod:`explora.models.group_channel`, :mod:`explora.models.temporal`)
  are our modules and implement the protocol directly; :func:`as_encoder` returns them as they are.

Adding a ViT family: implement :class:`Encoder` in one module and add its type to :data:`ENCODERS` (and, when an
export must rebuild it, to :data:`REBUILDABLE`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from explora.core.errors import CheckpointError, ConfigError
from explora.models.eva import EvaEncoder
from explora.models.group_channel import GroupChannelViT
from explora.models.temporal import TemporalViT
from explora.models.timm_vit import POOLS, TimmViTEncoder


@runtime_checkable
class Encoder(Protocol):
    """What explora reads from an encoder. Shapes: images ``x`` (B, C, H, W); ``timestamps`` (B, T, 3) for
    encoders with ``needs_timestamps`` (ignored by the others); P prefix (cls/register) tokens; N patch tokens
    (``R*L`` for encoders that embed R groups / frames of L patches)."""

    kind: str  # registry name: 'vit', 'eva', 'group_channel', 'temporal' (metrics.json backbone_kind, export sidecars)
    pools: tuple[str, ...]  # the pool modes this encoder supports (subset of POOLS)
    default_pool: str  # the pooling fine-tuning uses for pool='auto'
    needs_timestamps: bool

    @property
    def embed_dim(self) -> int: ...

    @property
    def num_prefix_tokens(self) -> int: ...

    @property
    def patch_size(self) -> tuple[int, int]: ...

    def grid(self, x: torch.Tensor | tuple[int, int]) -> tuple[int, int]:
        """(h, w) patch grid of images ``x`` (or of an (H, W) image size)."""

    def forward_features(self, x: torch.Tensor, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """Normed tokens (B, P + N, D)."""

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None,
                       timestamps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked forward (DinoV2/iBOT): normed class token (B, D) and patch tokens (B, N, D); ``masks`` (B, N)
        swap patch embeddings for ``mask_token`` before position encodings are added."""

    def get_intermediate_layers(self, x: torch.Tensor, n: int | None = 1, norm: bool = True,
                                timestamps: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(patch tokens (B, N, D), prefix tokens (B, P, D)) after each of the last ``n`` blocks (None: all)."""

    def pool(self, tokens: torch.Tensor, mode: str) -> torch.Tensor:
        """Normed tokens (B, P + N, D) -> (B, D) (``cls+avg``: (B, 2D))."""

    def pooled(self, x: torch.Tensor, mode: str, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """Images -> pooled feature; unlike :meth:`pool` also ``avg_fc_norm``'s un-normalised last-block mean."""

    def probe_features(self, x: torch.Tensor, n_blocks: int,
                       timestamps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the linear probe and kNN read: CLS features (B, n, D) and a patch mean (B, D) or None."""

    def export_config(self) -> dict[str, Any] | None:
        """The sidecar's ``wrapper`` entry that rebuilds this encoder around its base ViT; None for a plain timm
        ViT, which timm rebuilds from ``architecture`` + ``model_args`` alone."""


# The one registration point: module type -> how to see it as an Encoder. Our own encoders are returned as they are.
ENCODERS: dict[type[nn.Module], Callable[[nn.Module], Encoder]] = {
    VisionTransformer: TimmViTEncoder,
    Eva: EvaEncoder,  # timm's DINOv3 architecture (explora.models.eva)
    GroupChannelViT: lambda m: m,
    TemporalViT: lambda m: m,
}

# Encoders an export sidecar's ``wrapper`` entry rebuilds around a fresh base ViT: kind -> ``from_config``.
REBUILDABLE: dict[str, Callable[[nn.Module, dict[str, Any]], nn.Module]] = {
    GroupChannelViT.kind: GroupChannelViT.from_config,
    TemporalViT.kind: TemporalViT.from_config,
}


def _adapter_for(module: object) -> Callable[[nn.Module], Encoder] | None:
    for cls, adapt in ENCODERS.items():
        if isinstance(module, cls):
            return adapt
    return None


def is_encoder(module: object) -> bool:
    """True for a module :func:`as_encoder` accepts (or an adapter it returned)."""
    return isinstance(module, TimmViTEncoder) or _adapter_for(module) is not None


def as_encoder(module: nn.Module | Encoder) -> Encoder:
    """``module`` seen through the :class:`Encoder` interface; raises ConfigError for unregistered types."""
    if isinstance(module, TimmViTEncoder):
        return module
    adapt = _adapter_for(module)
    if adapt is None:
        known = ", ".join(cls.__name__ for cls in ENCODERS)
        raise ConfigError(
            f"{type(module).__name__} is not a registered encoder (known: {known}); implement "
            "explora.models.encoder.Encoder for it and add its type to explora.models.encoder.ENCODERS"
        )
    return adapt(module)


def encoder_kind(module: nn.Module) -> str:
    """The registry kind of an encoder module: ``vit``, ``eva``, ``group_channel`` or ``temporal``."""
    return as_encoder(module).kind


def rebuild_encoder(base: nn.Module, config: dict[str, Any], source: str = "sidecar") -> nn.Module:
    """The encoder an export's ``wrapper`` entry (:meth:`Encoder.export_config`) describes, around ``base``."""
    kind = config.get("kind")
    if kind not in REBUILDABLE:
        raise CheckpointError(f"{source}: wrapper kind {kind!r}; expected one of {sorted(REBUILDABLE)}")
    return REBUILDABLE[kind](base, config)


__all__ = [
    "ENCODERS",
    "POOLS",
    "REBUILDABLE",
    "Encoder",
    "TimmViTEncoder",
    "as_encoder",
    "encoder_kind",
    "is_encoder",
    "rebuild_encoder",
]
