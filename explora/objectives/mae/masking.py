"""Per-sample random masking from an explicit noise tensor (MAE, He et al. 2022, section 3 "Masking").

The noise is drawn in the data-loader worker from the batch's generator, so masks are a function of
(seed, step) and a resumed run masks identically. Masking itself is deterministic given the noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Mask:
    """ids_keep (B, K): kept token indices; ids_restore (B, N): un-shuffle; mask (B, N): 1 = removed, 0 = kept."""

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """MAE's count: int(L * (1 - ratio))."""
    return int(num_tokens * (1 - mask_ratio))


def draw_noise(batch: int, num_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform noise (B, N) in [0, 1); the sort order of each row is that sample's shuffle."""
    return torch.rand(batch, num_tokens, generator=generator)


def _from_shuffle(ids_shuffle: torch.Tensor, keep: int) -> Mask:
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N): inverse permutation
    mask = torch.ones_like(ids_shuffle, dtype=torch.float32)
    mask[:, :keep] = 0  # shuffled order: first `keep` are kept
    mask = torch.gather(mask, 1, ids_restore)  # (B, N) back in token order
    return Mask(ids_shuffle[:, :keep], ids_restore, mask)


def random_masking(noise: torch.Tensor, mask_ratio: float) -> Mask:
    """Keep the ``num_kept`` lowest-noise tokens of each sample: noise (B, N) -> Mask."""
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, N) ascending: small noise is kept
    return _from_shuffle(ids_shuffle, num_kept(noise.shape[1], mask_ratio))


def shared_masking(noise: torch.Tensor, repeats: int, mask_ratio: float) -> Mask:
    """Same removed positions in each of ``repeats`` slices (SatMAE spatial_mask / same_mask).

    noise (B, L) for one slice; tokens are slice-major (index r*L + l). Returns a Mask over N = repeats*L tokens
    that keeps ``num_kept(L)`` positions in every slice.
    """
    B, L = noise.shape
    keep = num_kept(L, mask_ratio)
    ids = torch.argsort(noise, dim=1)  # (B, L)
    offsets = (torch.arange(repeats, device=noise.device) * L)[None, :, None]  # (1, R, 1)
    kept = (ids[:, None, :keep] + offsets).flatten(1)  # (B, R*keep)
    removed = (ids[:, None, keep:] + offsets).flatten(1)  # (B, R*(L-keep))
    return _from_shuffle(torch.cat([kept, removed], dim=1), repeats * keep)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))
