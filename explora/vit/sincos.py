"""Fixed sin-cos encodings of positions (Vaswani et al. 2017; MAE's fixed 2-D position embeddings).

Shared by the group-channel / temporal encoders (spatial, group and time encodings) and the MAE decoder.
"""

from __future__ import annotations

import torch

from explora.core.errors import ConfigError


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Transformer sin-cos encoding of arbitrary (float) positions: (...,) -> (..., dim), [sin | cos] halves.

    Frequencies 1/10000^(i/(dim/2)) as in Vaswani et al. 2017 and MAE's fixed position embeddings.
    """
    if dim % 2:
        raise ConfigError(f"sin-cos encoding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = positions.to(torch.float64)[..., None] * omega  # (..., dim/2)
    return torch.cat([out.sin(), out.cos()], dim=-1).float()  # (..., dim)


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position encoding (H*W, dim): first half encodes the column, second half the row.

    The column-then-row order follows MAE's fixed embeddings (He et al. 2022), so freshly built decoder
    positions agree with those stored in MAE checkpoints.
    """
    if dim % 4:
        raise ConfigError(f"2-D sin-cos encoding width must be a multiple of 4, got {dim}")
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (H, W) each
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=-1)


__all__ = ["sincos_1d", "sincos_2d"]
