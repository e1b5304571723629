"""Paired augmentation of image + mask batches for segmentation: random resized crop, flips, 90-degree rotations.

Every draw comes from the explicit ``torch.Generator`` (the engine seeds it from ``(seed, step)``), and the image and
its mask go through the same crop box, flips and rotation. Images are resampled with the data layer's antialiased
``crop_resize`` (bilinear); masks nearest-neighbour on the same pixel-centre grid (output pixel ``i`` of a crop
``[top, top + h)`` resized to ``S`` reads source ``top + floor((i + 0.5) h / S)``), so labels stay labels.
Rotations by 90 degrees suit overhead imagery, which has no canonical "up" (as PANGAEA / GEO-Bench augment).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from explora.data.multicrop import crop_resize, random_resized_crop_boxes


@dataclass
class DenseAugConfig:
    """Train-time augmentation of image/mask pairs; ``scale`` and ``ratio`` of the random resized crop (area
    fraction, aspect), flip probabilities, and whether to rotate by a random multiple of 90 degrees."""

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True


def nearest_crop_resize(masks: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) integer masks -> (B, size, size): crop ``boxes`` (B, 4) ``(top, left, h, w)``, resize
    nearest-neighbour at pixel centres, flip horizontally where ``flip`` (B,) is set."""
    out = masks.new_empty(masks.shape[0], size, size)
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    for i, (top, left, h, w) in enumerate(boxes.long().tolist()):
        rows = top + torch.floor(centres * h / size).long().clamp(max=h - 1)  # (S,)
        cols = left + torch.floor(centres * w / size).long().clamp(max=w - 1)
        crop = masks[i][rows[:, None], cols[None, :]]  # (S, S)
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def augment_pair(images: torch.Tensor, masks: torch.Tensor, size: int, aug: DenseAugConfig,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) float images and (B, H, W) int64 masks -> the same batch cropped, resized to ``size``,
    flipped and rotated identically: ``((B, C, S, S), (B, S, S))``."""
    b, _, h, w = images.shape
    boxes = random_resized_crop_boxes(b, h, w, aug.scale, aug.ratio, generator)  # (B, 4)
    hflip = torch.rand(b, generator=generator) < aug.hflip
    vflip = torch.rand(b, generator=generator) < aug.vflip
    turns = torch.randint(0, 4, (b,), generator=generator) if aug.rot90 else torch.zeros(b, dtype=torch.long)
    x = crop_resize(images, boxes, hflip, size, "bilinear")  # (B, C, S, S)
    m = nearest_crop_resize(masks, boxes, hflip, size)  # (B, S, S)
    x_out, m_out = [], []
    for i in range(b):
        xi, mi = x[i], m[i]
        if vflip[i]:
            xi, mi = xi.flip(-2), mi.flip(-2)
        k = int(turns[i])
        if k:
            xi, mi = torch.rot90(xi, k, (-2, -1)), torch.rot90(mi, k, (-2, -1))
        x_out.append(xi)
        m_out.append(mi)
    return torch.stack(x_out).contiguous(), torch.stack(m_out).contiguous()


__all__ = ["DenseAugConfig", "augment_pair", "nearest_crop_resize"]
