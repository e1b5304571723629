"""Datasets in the upstream layouts, the ``name:path[:opts]`` spec syntax, statistics and checks.

Exports are resolved lazily so ``import explora.data.multicrop`` does not import every dataset module.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_dataset": "specs",
    "parse_spec": "specs",
    "ExploraDataset": "base",
    "compute_stats": "stats",
    "check_dataset": "check",
    "CheckReport": "check",
    "make_loader": "loader",
    "FMoWRGB": "fmow",
    "FMoWSentinel": "fmow",
    "FMoWTemporal": "fmow",
    "CATEGORIES": "fmow",
    "CsvDataset": "lists",
    "ImageFolderDataset": "folders",
    "EuroSAT": "folders",
    "RESISC45": "folders",
    "UnlabeledFolder": "folders",
    "IdxDataset": "idx",
    "WrappedDataset": "external",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"explora.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'explora.data' has no attribute {name!r}")
