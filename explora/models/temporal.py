"""SatMAE-style temporal ViT: T frames of one location, each frame's tokens tagged with (year, month, hour).

Re-implemented from the description in Cong et al., SatMAE (NeurIPS 2022), section 3.2 (temporal encoding), not
from its CC-BY-NC code. Every frame is patch-embedded with the RGB model's own ``patch_embed``; a token's encoding
is [2-D sin-cos spatial (D - 3*time_dim) || sin-cos(year) || sin-cos(month) || sin-cos(hour)] (time_dim 128 each),
so T frames give T*L tokens through the shared blocks.

Timestamps are a (B, T, 3) tensor of (year, month, hour) numbers. The data layer delivers raw calendar values
(year, month 1-12, hour 0-23); ``time_offset`` is subtracted before encoding. SatMAE encodes (year - 2002,
month - 1, hour) (``util/datasets.py``, ``CustomDatasetFromImagesTemporal.parse_timestamp`` with ``min_year = 2002``,
"hard-coded for fMoW"; the hour is used as it is), so the MAE objective passes ``time_offset=(2002, 1, 0)``
(``MAEConfig.time_offset``); the wrapper's own default ``(0, 0, 0)`` encodes values as given. The offset is part of
the exported encoder's sidecar, so downstream evaluation encodes timestamps exactly as pre-training did, and an
export written with another offset (earlier explora versions used 1980) keeps its own.

The cls token carries no time encoding (SatMAE's encoder adds none; its decoder gives the cls token zeros for the
time part, as :class:`~explora.objectives.mae.decoder.MAEDecoder` does by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from explora.core.errors import ConfigError, DataError
from explora.models.backbone import input_size
from explora.models.group_channel import _pair, _SlicedViT
from explora.vit.sincos import sincos_1d, sincos_2d
from explora.vit.tokens import apply_mask_token


def timestamp_encoding(timestamps: torch.Tensor, time_dim: int = 128) -> torch.Tensor:
    """(B, T, 3) (year, month, hour) -> (B, T, 3*time_dim): one 1-D sin-cos per field, concatenated."""
    if timestamps.ndim != 3 or timestamps.shape[-1] != 3:
        raise DataError(f"timestamps must have shape (B, T, 3) = (year, month, hour), got {tuple(timestamps.shape)}")
    return torch.cat([sincos_1d(time_dim, timestamps[..., i].float()) for i in range(3)], dim=-1)


class TemporalViT(_SlicedViT):
    """Temporal wrapper of a timm ViT: (B, T*C, H, W) + timestamps (B, T, 3) -> T*L tokens (+ prefix)."""

    kind: ClassVar[str] = "temporal"
    needs_timestamps: ClassVar[bool] = True

    def __init__(
        self, vit: nn.Module, num_frames: int = 3, time_dim: int = 128, time_offset: Sequence[float] = (0, 0, 0),
        img_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__(vit)
        if len(time_offset) != 3:
            raise ConfigError(f"temporal time_offset must be 3 numbers (year, month, hour), got {list(time_offset)}")
        self.time_offset = tuple(float(v) for v in time_offset)
        if not 0 < 3 * time_dim < self.embed_dim or (self.embed_dim - 3 * time_dim) % 4:
            raise ConfigError(
                f"temporal time_dim={time_dim}: embed_dim {self.embed_dim} - 3*time_dim must be positive and a "
                "multiple of 4"
            )
        self.num_frames = num_frames
        self.time_dim = time_dim
        self.in_chans = vit.patch_embed.proj.in_channels
        self.patch_embed = vit.patch_embed
        self.img_size = _pair(img_size) if img_size is not None else input_size(vit)  # encodings laid out for it
        ph, pw = vit.patch_embed.patch_size
        self.pos_embed_grid = (self.img_size[0] // ph, self.img_size[1] // pw)  # the grid pos_embed is laid out on
        # SatMAE uses fixed sin-cos; trainable here, initialised as sin-cos, because ExPLoRA unfreezes new encodings.
        self.pos_embed = nn.Parameter(sincos_2d(self.embed_dim - 3 * time_dim, self.pos_embed_grid)[None])  # (1,L,Ds)

    @property
    def own_pos_embed(self) -> nn.Parameter:
        """The spatial encoding this encoder adds (trainable, new); exports record its grid."""
        return self.pos_embed

    def export_config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: an export's sidecar stores them so the loader can rebuild us."""
        return {"kind": "temporal", "num_frames": self.num_frames, "time_dim": self.time_dim,
                "time_offset": list(self.time_offset), "img_size": list(self.img_size)}

    @classmethod
    def from_config(cls, vit: nn.Module, config: dict[str, Any]) -> TemporalViT:
        """Inverse of :meth:`export_config` around a ViT of the same architecture (weights are loaded after).

        Configs written before ``img_size`` was recorded built the base ViT at that size: its ``patch_embed.img_size``.
        """
        return cls(vit, int(config.get("num_frames", 3)), int(config.get("time_dim", 128)),
                   config.get("time_offset", (0, 0, 0)), config.get("img_size") or tuple(vit.patch_embed.img_size))

    def shift_timestamps(self, timestamps: torch.Tensor) -> torch.Tensor:
        """Raw (B, T, 3) (year, month, hour) -> the values the encoding sees: minus ``time_offset`` (float)."""
        return timestamps.float() - torch.tensor(self.time_offset, device=timestamps.device)  # (B, T, 3)

    def split_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T*C, H, W) -> (B*T, C, H, W), frames stacked along channels in time order."""
        B, TC, H, W = x.shape
        if self.num_frames * self.in_chans != TC:
            raise DataError(
                f"temporal input has {TC} channels, expected num_frames*in_chans = {self.num_frames}*{self.in_chans}"
            )
        return x.reshape(B * self.num_frames, self.in_chans, H, W)

    def embed(self, x: torch.Tensor, timestamps: torch.Tensor | None = None, masks: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """-> position/time-encoded tokens (B, T*L, D), frame-major, and the patch grid; ``masks`` (B, T*L) set
        patch embeddings to ``mask_token`` before the encodings are added."""
        B, T = x.shape[0], self.num_frames
        if timestamps is None:
            raise DataError(
                "the temporal encoder needs frame timestamps (B, T, 3) = (year, month, hour); none were given "
                "(expected each sample as (image, label, timestamps), e.g. fmow_temporal)"
            )
        if timestamps.shape[:2] != (B, T):
            raise DataError(f"timestamps shape {tuple(timestamps.shape)} does not match (B, T, 3) = ({B}, {T}, 3)")
        t = self.patch_embed(self.split_frames(x))  # (B*T, h, w, D) NHWC with dynamic_img_size, else (B*T, L, D)
        if t.ndim == 4:
            grid = tuple(t.shape[1:3])
            t = t.flatten(1, 2)
        else:
            grid = self.pos_embed_grid
        L = t.shape[1]
        t = apply_mask_token(t.reshape(B, T, L, -1), masks, mask_token)  # (B, T, L, D)
        spatial = self.pos_embed
        if grid != self.pos_embed_grid:
            spatial = resample_abs_pos_embed(spatial, new_size=grid, old_size=self.pos_embed_grid, num_prefix_tokens=0)
        s = spatial[:, None].expand(B, T, -1, -1)  # (B, T, L, Ds)
        tt = timestamp_encoding(self.shift_timestamps(timestamps), self.time_dim).to(t.dtype)  # (B, T, 3*time_dim)
        tt = tt[:, :, None].expand(-1, -1, L, -1)  # (B, T, L, 3*time_dim)
        t = t + torch.cat([s, tt], dim=-1)  # (B, T, L, D)
        return t.flatten(1, 2), grid


__all__ = ["TemporalViT", "timestamp_encoding"]
