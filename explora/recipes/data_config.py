"""Configs of ``explora data check`` (read every sample, report problems) and ``explora data stats`` (band moments)."""

from __future__ import annotations

from dataclasses import dataclass

from explora.core.errors import ConfigError


@dataclass
class DataCheckConfig:
    """Which dataset and splits to read through, and how."""

    spec: str = ""  # dataset spec, e.g. fmow:/data/train.csv or folder:/scenes:chip=64
    split: tuple[str, ...] = ("train",)  # splits to check
    max_samples: int | None = None  # check at most this many (spread evenly)
    workers: int = 0  # data-loader workers for decoding
    json: bool = False  # print the report as JSON

    def validate(self) -> None:
        if not self.spec:
            raise ConfigError("explora data check: give the dataset SPEC, e.g. imagefolder:/data/chips.")


@dataclass
class DataStatsConfig:
    """Per-band mean/std of a dataset split."""

    spec: str = ""  # dataset spec, e.g. fmow:/data/train.csv
    split: str = "train"
    max_samples: int = 10000  # images the moments are computed on
    image_size: int | None = None  # resize to this first (default: as stored)
    workers: int = 0  # data-loader workers for decoding

    def validate(self) -> None:
        if not self.spec:
            raise ConfigError("explora data stats: give the dataset SPEC, e.g. imagefolder:/data/chips.")


__all__ = ["DataCheckConfig", "DataStatsConfig"]
