"""Data-loader defaults for explora datasets (the engine may build its own; these are the tuned defaults)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def default_workers() -> int:
    """One worker per available CPU, at most 8 (decoding jpgs/GeoTIFFs is the bottleneck, not the model)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, num_workers: int | None = None,
                drop_last: bool = True, collate_fn: Callable | None = None, generator: torch.Generator | None = None,
                **kwargs: Any) -> DataLoader:
    """A DataLoader with persistent workers, prefetching, and pinned memory when CUDA is present."""
    workers = default_workers() if num_workers is None else num_workers
    opts: dict[str, Any] = {"pin_memory": torch.cuda.is_available()}
    if workers > 0:
        opts.update(persistent_workers=True, prefetch_factor=4)
    opts.update(kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
                      collate_fn=collate_fn, generator=generator, **opts)
