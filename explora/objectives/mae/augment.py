"""MAE's only augmentation, RandomResizedCrop + horizontal flip, per sample from an explicit generator.

Follows torchvision's RandomResizedCrop parameter sampling (10 tries at area scale and log-uniform aspect ratio,
then a centre crop fallback) but draws from the batch's ``torch.Generator`` so crops are a function of (seed, step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of one random resized crop."""
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_r[0] + u[1] * (log_r[1] - log_r[0]))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
    r = width / height  # fallback: centre crop at the clamped ratio
    if r < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif r > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_flip(
    images: torch.Tensor,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, size, size): bicubic (antialiased) resize of a random crop, random flip."""
    out = []
    for img in images:
        top, left, h, w = crop_box(img.shape[-2], img.shape[-1], scale, ratio, generator)
        crop = img[None, :, top : top + h, left : left + w]  # (1, C, h, w)
        crop = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        if hflip and torch.rand(1, generator=generator).item() < 0.5:
            crop = crop.flip(-1)
        out.append(crop)
    return torch.cat(out, dim=0)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images pass through (the Samples contract)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
