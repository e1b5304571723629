"""Per-band mean/std of a dataset, streamed batch by batch (Chan et al.'s parallel variance merge, float64)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset


class BandMoments:
    """Running per-band count / mean / M2 over pixels of images scaled to [0, 1] (uint8 / 255)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None  # (C,) float64
        self.m2: torch.Tensor | None = None  # (C,) float64

    def update(self, images: torch.Tensor) -> None:
        """Merge a batch ``(B, C, H, W)`` (or one ``(C, H, W)``) into the running moments."""
        x = images if images.ndim == 4 else images[None]
        x = x.double() / 255.0 if x.dtype == torch.uint8 else x.double()
        x = x.transpose(0, 1).reshape(x.shape[1], -1)  # (B, C, H, W) -> (C, B*H*W)
        n_b = x.shape[1]
        mean_b = x.mean(dim=1)  # (C,)
        m2_b = ((x - mean_b[:, None]) ** 2).sum(dim=1)  # (C,)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / n)
        self.n = n

    def result(self) -> dict[str, list[float]]:
        if self.mean is None or self.m2 is None or self.n == 0:
            return {"mean": [], "std": []}
        return {"mean": self.mean.tolist(), "std": (self.m2 / self.n).sqrt().tolist()}


def _collate_images(batch: list[tuple[Any, ...]]) -> list[torch.Tensor]:
    return [item[0] for item in batch]


def spread_indices(n: int, max_samples: int | None) -> list[int]:
    """Up to ``max_samples`` indices evenly spread over ``range(n)`` (deterministic, covers every class block)."""
    if max_samples is None or max_samples >= n:
        return list(range(n))
    return torch.linspace(0, n - 1, max_samples).round().long().unique().tolist()


def compute_stats(dataset: Dataset, max_samples: int | None = None, *, batch_size: int = 64,
                  num_workers: int = 0) -> dict[str, Any]:
    """Per-band mean and (population) std of pixel values in [0, 1] over up to ``max_samples`` samples.

    Decoding runs in ``num_workers`` loader workers; each batch is reduced in one tensor op (batches of
    mixed image sizes are reduced per size). Returns ``{"mean": [...], "std": [...], "samples": n}``.
    """
    indices = spread_indices(len(dataset), max_samples)  # type: ignore[arg-type]
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate_images)
    moments = BandMoments()
    for images in loader:
        by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for im in images:
            by_shape.setdefault(tuple(im.shape), []).append(im)
        for group in by_shape.values():
            moments.update(torch.stack(group))  # (B, C, H, W)
    from explora.data.medical import medical_report

    medical, _ = medical_report(dataset, indices)  # DICOM / NIfTI: intensity range before and after windowing
    return {**moments.result(), "samples": len(indices), **({"intensity": medical["intensity"]} if medical else {})}
