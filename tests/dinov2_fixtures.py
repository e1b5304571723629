"""Inputs for DinoV2 training runs that must equal each other across batch layouts (micro-batches, ranks).

The engine's real multi-crop draws one generator per (seed, step, micro-batch, rank) batch, and iBOT masking spreads
mask ratios over a batch (as upstream), so a run split into micro-batches or ranks augments differently by design.
Equality tests swap in :class:`PerSampleViews`, whose views and masks are a function of each image only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class PerSampleViews:
    """Views and iBOT masks that depend on each image only (not on its batch, rank or the generator).

    global (2B, 3, 32, 32): [image; flipped image]; local (2B, 3, 16, 16): the same at half size;
    masks (2B, (32 / patch)^2): view 0 masks the patches brighter than the image's median patch (8x8 by default;
    ``patch=16`` for the DINOv3 test models), view 1 is unmasked.
    The class is a zero-argument factory of the transform, so it can stand in for ``objective.batch_transform``
    (``functools.partial(PerSampleViews, patch=16)`` for another patch size).
    """

    def __init__(self, patch: int = 8) -> None:
        self.patch = patch

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = images.float() / 255 - 0.5  # (B, 3, 32, 32)
        small = F.interpolate(x, size=16, mode="bilinear", align_corners=False)  # (B, 3, 16, 16)
        patch = F.avg_pool2d(x.mean(1, keepdim=True), self.patch).flatten(1)  # (B, (32 / patch)^2)
        masked = patch > patch.median(dim=1, keepdim=True).values  # (B, N)
        return {"global": torch.cat([x, x.flip(-1)]), "local": torch.cat([small, small.flip(-1)]),
                "masks": torch.cat([masked, torch.zeros_like(masked)])}


class FixedImages(Dataset):
    """``n`` fixed random RGB uint8 32x32 images, unlabeled (label -1)."""

    def __init__(self, n: int = 32, seed: int = 123) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], -1
