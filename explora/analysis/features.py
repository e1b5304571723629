"""Turn dataset samples into model inputs and read every block's patch tokens.

Every analysis of the paper (project page "Analysis", paper-notes §5) looks at the *output patch tokens of each
transformer block*. :meth:`explora.models.encoder.Encoder.get_intermediate_layers` returns exactly those with the
prefix (CLS/register) tokens split off, so the analyses work for any registered encoder, LoRA-wrapped or merged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from explora.core.errors import DataError
from explora.models.encoder import as_encoder


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Scale samples to float in [0, 1] (uint8 / 255) and standardise per band, as the model saw them in training.

    ``mean``/``std`` are taken in the [0, 1] scale; if every mean is above 1 they are read as 0-255 values (some
    upstream tables give them that way) and divided by 255.
    """
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()  # (B, C, H, W)
    m = torch.as_tensor(list(mean), dtype=torch.float32)
    s = torch.as_tensor(list(std), dtype=torch.float32)
    if m.numel() != x.shape[1] or s.numel() != x.shape[1]:
        raise DataError(
            f"dataset mean/std have {m.numel()}/{s.numel()} values but images have {x.shape[1]} bands; "
            "expected one mean and one std per band"
        )
    if bool((m > 1).all()):
        m, s = m / 255.0, s / 255.0
    return (x - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)


def patch_grid(backbone: nn.Module, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) patch grid the backbone produces for an image of size ``image_hw``."""
    return as_encoder(backbone).grid(tuple(image_hw))


def _to_grid_tokens(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Reduce (B, N, D) patch tokens to (B, h*w, D) in row-major grid order.

    Group-channel (SatMAE-style) backbones emit G tokens per grid cell laid out group-major (G, h*w); they are
    averaged over groups so every analysis sees one token per image location.
    """
    b, n, d = tokens.shape
    hw = grid[0] * grid[1]
    if n == hw:
        return tokens
    if n % hw == 0:
        return tokens.view(b, n // hw, hw, d).mean(1)  # (B, G, hw, D) -> (B, hw, D)
    raise DataError(f"backbone returned {n} patch tokens, expected a multiple of the {grid[0]}x{grid[1]} patch grid")


@torch.no_grad()
def block_patch_tokens(backbone: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Output patch tokens of every block: a list (one per block) of (B, h*w, D) float32 tensors.

    Tokens are taken before the final norm (the raw residual stream, as DinoV2/MAE probing code reads
    intermediate blocks); prefix tokens are dropped.
    """
    encoder = as_encoder(backbone)  # any registered encoder; others are refused by name
    outs = encoder.get_intermediate_layers(images, None, norm=False)  # every block: (patch (B, N, D), prefix)
    return [_to_grid_tokens(patch.float(), encoder.grid(images)) for patch, _ in outs]


def collect_samples(dataset, n_images: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_images`` samples drawn without replacement (fixed seed) as ((n, C, H, W) images, (n,) int64 labels)."""
    total = len(dataset)
    if total == 0:
        raise DataError("dataset is empty; expected at least one (image, label) sample")
    n = min(n_images, total)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(total, generator=g)[:n].sort().values
    imgs, labels = [], []
    for i in idx.tolist():
        img, lab = dataset[i]
        imgs.append(torch.as_tensor(img))
        labels.append(int(lab))
    shapes = {tuple(t.shape) for t in imgs}
    if len(shapes) != 1:
        raise DataError(f"dataset images have different shapes {sorted(shapes)}; build it with a fixed image_size")
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.long)
