"""Segmentation heads on top of any :class:`~explora.models.encoder.Encoder`: linear and UPerNet-style.

- ``linear``: DinoV2's linear segmentation evaluation (Oquab et al., 2023, sec. 7.4; ``BNHead`` of the DinoV2
  segmentation configs): BatchNorm over the (concatenated) patch-token maps of the chosen blocks + a 1x1 conv to
  the classes, bilinear upsampling of the logits to the input size. Default: the last block.
- ``upernet``: PANGAEA's decoder for ViT encoders (Marsocci et al., 2024), after Xiao et al.'s UPerNet (2018) on
  BEiT/mmsegmentation's ``MultiLevelNeck``: the token maps of 4 intermediate blocks are rescaled to strides 4, 8, 16
  and 32 of the patch grid's x4, x2, x1, x0.5 (two / one 2x2 transposed convs, identity, 2x2 max-pool), then a
  pyramid-pooling module (scales 1, 2, 3, 6) on the coarsest level, a top-down FPN with 3x3 convs, fusion of all
  levels at the finest and a 1x1 classifier. Default blocks by depth: :func:`default_blocks` (depth 12 ->
  3, 5, 7, 11; depth 24 -> 7, 11, 15, 23, PANGAEA's choices), configurable.

Intermediate tokens come from ``Encoder.get_intermediate_layers`` (normed), so every explora family works: for
group-channel / temporal encoders, whose patch tokens are ``R`` groups (frames) of the ``h x w`` grid (group-major),
the map is the mean over the groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from explora.core.errors import ConfigError
from explora.models.encoder import as_encoder

HEADS = ("linear", "upernet")


def encoder_depth(backbone: nn.Module) -> int:
    """Number of transformer blocks of an explora encoder."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        raise ConfigError(f"{type(backbone).__name__} has no 'blocks'; expected a ViT encoder")
    return len(blocks)


def default_blocks(depth: int, head: str) -> tuple[int, ...]:
    """Block indices a head reads: the last block for ``linear``; for ``upernet`` blocks
    ``round(depth * k / 6) - 1`` for k = 2, 3, 4, 6 (12 -> 3, 5, 7, 11 and 24 -> 7, 11, 15, 23 as PANGAEA)."""
    if head == "linear":
        return (depth - 1,)
    if head == "upernet":
        blocks = tuple(round(depth * k / 6) - 1 for k in (2, 3, 4, 6))
        if len(set(blocks)) != 4 or min(blocks) < 0:
            raise ConfigError(f"upernet needs 4 distinct blocks; a depth-{depth} encoder has too few (give blocks=)")
        return blocks
    raise ConfigError(f"segmentation head: got {head!r}, expected one of {HEADS}")


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class LinearSegHead(nn.Module):
    """BatchNorm + 1x1 conv over the concatenated token maps (B, n*D, h, w) -> logits (B, K, h, w)."""

    def __init__(self, embed_dim: int, n_maps: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(embed_dim * n_maps)
        self.conv = nn.Conv2d(embed_dim * n_maps, num_classes, 1)
        nn.init.normal_(self.conv.weight, std=0.01)  # mmseg BaseDecodeHead.conv_seg init
        nn.init.zeros_(self.conv.bias)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(self.bn(torch.cat(maps, dim=1)))


class UPerNetHead(nn.Module):
    """Multi-level neck (x4, x2, x1, x0.5) + UPerNet (PPM + FPN + fusion) on 4 token maps -> logits at x4 the
    patch grid (B, K, 4h, 4w)."""

    def __init__(self, embed_dim: int, num_classes: int, channels: int = 256,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        d = embed_dim
        self.rescale = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.BatchNorm2d(d), nn.GELU(), nn.ConvTranspose2d(d, d, 2, 2)),
            nn.ConvTranspose2d(d, d, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2, ceil_mode=True),
        ])
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList([_conv_bn_relu(d, channels, 1) for _ in self.pool_scales])
        self.ppm_bottleneck = _conv_bn_relu(d + len(self.pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList([_conv_bn_relu(d, channels, 1) for _ in range(3)])
        self.fpn = nn.ModuleList([_conv_bn_relu(channels, channels, 3) for _ in range(3)])
        self.fuse = _conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def _ppm(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(conv(F.adaptive_avg_pool2d(x, s)), size=size, mode="bilinear", align_corners=False)
                  for s, conv in zip(self.pool_scales, self.ppm, strict=True)]
        return self.ppm_bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if len(maps) != 4:
            raise ConfigError(f"upernet needs 4 token maps, got {len(maps)}")
        feats = [r(m) for r, m in zip(self.rescale, maps, strict=True)]  # strides x4, x2, x1, x0.5 of the grid
        lat = [conv(f) for conv, f in zip(self.lateral, feats[:3], strict=True)] + [self._ppm(feats[3])]
        for i in range(3, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear",
                                                    align_corners=False)
        outs = [conv(x) for conv, x in zip(self.fpn, lat[:3], strict=True)] + [lat[3]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))


def token_maps(backbone: nn.Module, images: torch.Tensor, blocks: Sequence[int],
               timestamps: torch.Tensor | None = None) -> list[torch.Tensor]:
    """(B, D, h, w) maps of the normed patch tokens after each of ``blocks`` (indices from 0)."""
    enc = as_encoder(backbone)
    depth = encoder_depth(backbone)
    first = min(blocks)
    outs = enc.get_intermediate_layers(images, depth - first, norm=True, timestamps=timestamps)
    h, w = enc.grid(images)
    maps = []
    for i in blocks:
        patch = outs[i - first][0]  # (B, N, D)
        b, n, d = patch.shape
        if n % (h * w):
            raise ConfigError(f"{type(backbone).__name__}: {n} patch tokens do not tile the {h}x{w} grid")
        patch = patch.reshape(b, n // (h * w), h * w, d).mean(1)  # groups / frames averaged
        maps.append(patch.transpose(1, 2).reshape(b, d, h, w))
    return maps


class SegmentationModel(nn.Module):
    """``backbone`` + a segmentation ``head``; ``forward(images) -> logits (B, K, H, W)`` at the input size."""

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "linear",
                 blocks: Sequence[int] | None = None, channels: int = 256) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"segmentation needs at least 2 classes, got {num_classes}")
        depth = encoder_depth(backbone)
        blocks = tuple(int(b) for b in blocks) if blocks else default_blocks(depth, head)
        if any(not 0 <= b < depth for b in blocks) or list(blocks) != sorted(set(blocks)):
            raise ConfigError(f"segmentation blocks={list(blocks)}: expected increasing indices in 0..{depth - 1}")
        if head == "upernet" and len(blocks) != 4:
            raise ConfigError(f"upernet reads 4 blocks, got blocks={list(blocks)}")
        dim = as_encoder(backbone).embed_dim
        self.backbone = backbone
        self.head_name, self.blocks, self.num_classes = head, blocks, num_classes
        if head == "linear":
            self.head: nn.Module = LinearSegHead(dim, len(blocks), num_classes)
        elif head == "upernet":
            self.head = UPerNetHead(dim, num_classes, channels=channels)
        else:
            raise ConfigError(f"segmentation head: got {head!r}, expected one of {HEADS}")

    def forward(self, images: torch.Tensor, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head(token_maps(self.backbone, images, self.blocks, timestamps))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


__all__ = ["HEADS", "LinearSegHead", "SegmentationModel", "UPerNetHead", "default_blocks", "encoder_depth",
           "token_maps"]
