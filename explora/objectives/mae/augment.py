"""MAE's only augmentation, RandomResizedCrop + horizontal flip, from an explicit generator.

Crop boxes come from the data layer's batched sampler (torchvision's RandomResizedCrop parameter sampling: 10 tries
at area scale and log-uniform aspect ratio, then a centre crop fallback), drawn from the batch's
``torch.Generator`` so crops are a function of (seed, step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from explora.data.multicrop import random_resized_crop_boxes
from explora.data.windowing import require_unit_range


def random_resized_crop_flip(
    images: torch.Tensor,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, size, size): bicubic (antialiased) resize of a random crop, random flip."""
    boxes = random_resized_crop_boxes(images.shape[0], images.shape[-2], images.shape[-1], scale, ratio, generator)
    flips = (torch.rand(images.shape[0], generator=generator) < 0.5) & hflip
    out = []
    for img, (top, left, h, w), flip in zip(images, boxes.long().tolist(), flips.tolist()):
        crop = img[None, :, top : top + h, left : left + w]  # (1, C, h, w)
        crop = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        out.append(crop.flip(-1) if flip else crop)
    return torch.cat(out, dim=0)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images pass through (the Samples contract); raw 16-bit is refused."""
    require_unit_range(images, "MAE augmentation")
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
