"""SatMAE-style temporal ViT: T frames of one location, each frame's tokens tagged with (year, month, hour).

Re-implemented from the description in Cong et al., SatMAE (NeurIPS 2022), section 3.2 (temporal encoding), not
from its CC-BY-NC code. Every frame is patch-embedded with the RGB model's own ``patch_embed``; a token's encoding
is [2-D sin-cos spatial (D - 3*time_dim) || sin-cos(year) || sin-cos(month) || sin-cos(hour)] (time_dim 128 each),
so T frames give T*L tokens through the shared blocks.

Timestamps are a (B, T, 3) tensor of (year, month, hour) numbers, encoded as given (e.g. 2016, 0-11, 0-23); a
dataset may subtract a reference year, the encoding only needs values that differ between frames.
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from explora.errors import ConfigError, DataError
from explora.models.group_channel import _SlicedViT, sincos_1d, sincos_2d


def timestamp_encoding(timestamps: torch.Tensor, time_dim: int = 128) -> torch.Tensor:
    """(B, T, 3) (year, month, hour) -> (B, T, 3*time_dim): one 1-D sin-cos per field, concatenated."""
    if timestamps.ndim != 3 or timestamps.shape[-1] != 3:
        raise DataError(f"timestamps must have shape (B, T, 3) = (year, month, hour), got {tuple(timestamps.shape)}")
    return torch.cat([sincos_1d(time_dim, timestamps[..., i].float()) for i in range(3)], dim=-1)


class TemporalViT(_SlicedViT):
    """Temporal wrapper of a timm ViT: (B, T*C, H, W) + timestamps (B, T, 3) -> T*L tokens (+ prefix)."""

    def __init__(self, vit: nn.Module, num_frames: int = 3, time_dim: int = 128) -> None:
        super().__init__(vit)
        if not 0 < 3 * time_dim < self.embed_dim or (self.embed_dim - 3 * time_dim) % 4:
            raise ConfigError(
                f"temporal time_dim={time_dim}: embed_dim {self.embed_dim} - 3*time_dim must be positive and a "
                "multiple of 4"
            )
        self.num_frames = num_frames
        self.time_dim = time_dim
        self.in_chans = vit.patch_embed.proj.in_channels
        self.patch_embed = vit.patch_embed
        self.grid = tuple(vit.patch_embed.grid_size)
        # SatMAE uses fixed sin-cos; trainable here, initialised as sin-cos, because ExPLoRA unfreezes new encodings.
        self.pos_embed = nn.Parameter(sincos_2d(self.embed_dim - 3 * time_dim, self.grid)[None])  # (1, L, Ds)

    def split_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T*C, H, W) -> (B*T, C, H, W), frames stacked along channels in time order."""
        B, TC, H, W = x.shape
        if self.num_frames * self.in_chans != TC:
            raise DataError(
                f"temporal input has {TC} channels, expected num_frames*in_chans = {self.num_frames}*{self.in_chans}"
            )
        return x.reshape(B * self.num_frames, self.in_chans, H, W)

    def embed(self, x: torch.Tensor, timestamps: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """-> position/time-encoded tokens (B, T*L, D), frame-major, and the patch grid."""
        B, T = x.shape[0], self.num_frames
        if timestamps.shape[:2] != (B, T):
            raise DataError(f"timestamps shape {tuple(timestamps.shape)} does not match (B, T, 3) = ({B}, {T}, 3)")
        t = self.patch_embed(self.split_frames(x))  # (B*T, h, w, D) NHWC with dynamic_img_size, else (B*T, L, D)
        if t.ndim == 4:
            grid = tuple(t.shape[1:3])
            t = t.flatten(1, 2)
        else:
            grid = self.grid
        L = t.shape[1]
        t = t.reshape(B, T, L, -1)  # (B, T, L, D)
        spatial = self.pos_embed
        if grid != self.grid:
            spatial = resample_abs_pos_embed(spatial, new_size=grid, old_size=self.grid, num_prefix_tokens=0)
        s = spatial[:, None].expand(B, T, -1, -1)  # (B, T, L, Ds)
        tt = timestamp_encoding(timestamps, self.time_dim).to(t.dtype)[:, :, None].expand(-1, -1, L, -1)
        t = t + torch.cat([s, tt], dim=-1)  # (B, T, L, D)
        return t.flatten(1, 2), grid

    def forward_features(self, x: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """-> normed tokens (B, P + T*L, D)."""
        return self.encode(self.embed(x, timestamps)[0])

    def forward(self, x: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """Pooled feature over all T*L tokens: (B, D)."""
        return self.pool(self.forward_features(x, timestamps))


__all__ = ["TemporalViT", "timestamp_encoding"]
