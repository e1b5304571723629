"""MAE's only augmentation, RandomResizedCrop + horizontal flip, from an explicit generator.

Crop boxes come from the data layer's batched sampler (torchvision's RandomResizedCrop parameter sampling: 10 tries
at area scale and log-uniform aspect ratio, then a centre crop fallback), drawn from the batch's
``torch.Generator`` so crops are a function of (seed, step); the crops are resized by the data layer's
``crop_resize`` (the antialiased bicubic resample ``F.interpolate`` runs, on the crop window in place).
"""

from __future__ import annotations

import torch

from explora.data.multicrop import crop_resize, random_resized_crop_boxes
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
    return crop_resize(images, boxes, flips, size, "bicubic")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images pass through (the Samples contract); raw 16-bit is refused."""
    require_unit_range(images, "MAE augmentation")
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
