"""Patient- / study-level splits: every image of one group lands in one split, so no patient leaks across them.

Any dataset spec takes the options ``by=<key>,val_fraction=0.2[,test_fraction=0][,seed=0]``; the command's own
split (``train`` for training data, ``val`` for evaluation data, as ``explora evaluate`` / ``pretrain`` ask for
them) then selects that part of the one pool::

    explora evaluate linprobe --data 'dicom:/data/cxr:labels=/data/labels.csv,label_by=PatientID,by=PatientID'

``by`` is a DICOM keyword (``PatientID``, ``StudyInstanceUID``, ``SeriesInstanceUID``, any other tag) for
``dicom:``, ``volume`` for ``nifti:`` (one volume per patient), or ``parent`` (the file's folder, e.g.
``<patient>/<image>.png``) for ``dicom:``, ``nifti:``, ``csv:``, ``imagefolder:`` and the other file-list datasets.

Assignment: the distinct group keys are sorted, shuffled with ``seed``, and taken in that order into ``test`` then
``val`` until each holds at least its fraction of the *samples*; the rest is ``train``. The same spec therefore
gives the same disjoint splits in every command and on every machine.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from explora.core.errors import ConfigError, DataError
from explora.data.base import ExploraDataset
from explora.data.lists import ImageListDataset
from explora.data.medical import MedicalDataset

SPLITS = ("train", "val", "test")
OPTIONS = ("by", "val_fraction", "test_fraction", "seed")


def group_keys(dataset: ExploraDataset, by: str) -> list[str]:
    """The group key of every sample of ``dataset`` (see the module docstring for what ``by`` may be)."""
    if isinstance(dataset, MedicalDataset):
        return [dataset.group_key(i, by) for i in range(len(dataset))]
    if isinstance(dataset, ImageListDataset):
        if by not in ("parent", "file"):
            raise ConfigError(f"{dataset.source}: by={by!r}; file-list datasets group by 'parent' (the image's folder)"
                              " or 'file'")
        return [str(p.parent if by == "parent" else p) for p, _, _ in dataset.items]
    raise ConfigError(f"{dataset.source or type(dataset).__name__}: by= grouped splits need a dicom:, nifti: or "
                      "file-list (csv:, imagefolder:, ...) dataset")


def assign_groups(sizes: dict[str, int], val_fraction: float, test_fraction: float = 0.0,
                  seed: int = 0) -> dict[str, str]:
    """``{group: samples}`` -> ``{group: 'train'|'val'|'test'}`` (shuffled groups, greedy by sample count)."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ConfigError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be in [0, 1) and "
                          "their sum below 1")
    groups = sorted(sizes)
    random.Random(seed).shuffle(groups)
    total = sum(sizes.values())
    out: dict[str, str] = {}
    pos = 0
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        taken = 0
        while fraction > 0 and taken < fraction * total and pos < len(groups) - 1:  # keep >= 1 group for train
            out[groups[pos]] = split
            taken += sizes[groups[pos]]
            pos += 1
    for g in groups[pos:]:
        out[g] = "train"
    return out


class GroupSplit(ExploraDataset):
    """The samples of ``inner`` whose group fell into ``split``; normalisation statistics are the whole pool's."""

    def __init__(self, inner: ExploraDataset, split: str, by: str, *, val_fraction: float = 0.2,
                 test_fraction: float = 0.0, seed: int = 0) -> None:
        super().__init__(image_size=inner.image_size, on_error=inner.on_error)
        if split not in SPLITS:
            raise ConfigError(f"{inner.source}: split={split!r} with by={by!r}; expected one of {SPLITS}")
        self.inner, self.split, self.by = inner, split, by
        self.classes, self.in_chans, self.source = list(inner.classes), inner.in_chans, inner.source
        self.problems, self._skips = inner.problems, inner._skips
        keys = group_keys(inner, by)
        self.assignment = assign_groups(dict(Counter(keys)), float(val_fraction), float(test_fraction), int(seed))
        self.indices = [i for i, k in enumerate(keys) if self.assignment[k] == split]
        self.groups = sorted({keys[i] for i in self.indices})
        if not self.indices:
            knob = "test_fraction" if split == "test" else "val_fraction"
            raise DataError(f"{inner.source}: no samples in split {split!r} grouped by {by} "
                            f"({len(self.assignment)} group(s)); set or raise {knob}, or add data")

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[Any, ...]:
        return self.inner.load(self.indices[index])

    def describe(self, index: int) -> str:
        return self.inner.describe(self.indices[index])

    @property
    def mean(self) -> tuple[float, ...]:
        return self.inner.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.inner.std


def grouped_split(dataset: ExploraDataset, split: str, options: dict[str, Any]) -> ExploraDataset:
    """``dataset`` restricted to ``split`` by the spec's grouped-split ``options`` (returned unchanged without
    ``by``)."""
    if "by" not in options:
        unused = sorted(k for k in options if k in OPTIONS)
        if unused:
            raise ConfigError(f"{dataset.source}: {', '.join(unused)} given without by=<group key>")
        return dataset
    return GroupSplit(dataset, split, str(options["by"]), val_fraction=float(options.get("val_fraction", 0.2)),
                      test_fraction=float(options.get("test_fraction", 0.0)), seed=int(options.get("seed", 0)))


def leaked_groups(a: Sequence[str], b: Sequence[str]) -> set[str]:
    """Groups present in both key lists (a non-empty result means patient leakage)."""
    return set(a) & set(b)


__all__ = ["GroupSplit", "assign_groups", "group_keys", "grouped_split", "leaked_groups"]
