"""What the DICOM and NIfTI datasets share: windowing to [0, 1], grayscale -> backbone channels, header summaries.

A subclass implements ``__len__``, ``raw(index) -> (values (H, W) or (3, H, W) float64 in physical units, window
from the file or None, inverted)`` and ``label(index)``; ``load`` windows, inverts MONOCHROME1 and lays the result out
as ``channels`` (3: grayscale replicated, the default; 1: for a backbone built with ``model.in_chans=1``, whose RGB
patch filters are summed). The output is always float32 in [0, 1], so raw 12/16-bit values never reach the
normalisation. ``headers`` (per file: size, bit depth, photometric interpretation, transfer syntax) feed
``explora data check``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from explora.core.errors import ConfigError, DataError
from explora.data.base import ExploraDataset
from explora.data.windowing import GRAY_MEAN, GRAY_STD, Window, intensity_range, parse_window, to_channels

INTENSITY_SAMPLES = 256  # samples read for the before/after windowing ranges of a report


@dataclass
class Header:
    """What a file's header says, for consistency checks (one per file, not per frame/slice)."""

    size: str  # "HxW"
    bits: int  # bits stored (DICOM) / bits per voxel (NIfTI)
    photometric: str = ""
    transfer_syntax: str = ""
    tags: dict[str, str] = field(default_factory=dict)  # grouping tags (PatientID, StudyInstanceUID, ...)


class MedicalDataset(ExploraDataset):
    """Base of :class:`~explora.data.dicom.DicomDataset` and :class:`~explora.data.nifti.NiftiSlices`."""

    default_window = "file"

    def __init__(self, *, window: str | Window | None = None, channels: int = 3, image_size: int | None = None,
                 on_error: str = "raise") -> None:
        super().__init__(image_size=image_size, on_error=on_error)
        if int(channels) not in (1, 3):
            raise ConfigError(f"channels={channels}; expected 3 (replicate grayscale, default) or 1 (in_chans=1)")
        self.window = parse_window(window, self.default_window)
        self.channels = int(channels)
        self.in_chans = self.channels
        self.headers: dict[str, Header] = {}  # file -> header

    # --- to implement --------------------------------------------------------------------------------------
    def raw(self, index: int) -> tuple[np.ndarray, tuple[float, float, str] | None, bool]:
        """Physical values of sample ``index``, the file's window (center, width, VOI function) or None, and
        whether the display is inverted (MONOCHROME1)."""
        raise NotImplementedError

    def label(self, index: int) -> int:
        raise NotImplementedError

    def group_key(self, index: int, by: str) -> str:
        """The value of ``by`` (a DICOM tag keyword, ``volume``, ``parent``...) that sample ``index`` belongs to."""
        raise NotImplementedError

    # --- shared behaviour ----------------------------------------------------------------------------------
    def windowed(self, index: int) -> np.ndarray:
        values, file_window, inverted = self.raw(index)
        colour = values.ndim == 3
        out = values.astype(np.float32) if colour else self.window.apply(values, file_window)
        return 1.0 - out if inverted else out

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return to_channels(self.windowed(index), self.channels, self.describe(index)), self.label(index)

    def _fill_stats(self) -> None:
        """ImageNet statistics for the replicated 3 channels (base class); their mean for 1 channel."""
        if self.in_chans == 1:
            self.set_stats(GRAY_MEAN, GRAY_STD)
            return
        super()._fill_stats()

    def header_summary(self) -> dict[str, dict[str, int]]:
        """Counts of sizes, bit depths, photometric interpretations and transfer syntaxes over the files."""
        hs = self.headers.values()
        return {
            "sizes": dict(Counter(h.size for h in hs)),
            "bit_depths": dict(Counter(str(h.bits) for h in hs)),
            "photometric": dict(Counter(h.photometric for h in hs if h.photometric)),
            "transfer_syntaxes": dict(Counter(h.transfer_syntax for h in hs if h.transfer_syntax)),
        }

    def intensity_summary(self, indices: Sequence[int]) -> dict[str, Any]:
        """Range of the physical values and of the windowed values over ``indices`` (at most
        INTENSITY_SAMPLES of them, evenly spread), with the window used; unreadable samples are left out."""
        step = max(1, len(indices) // INTENSITY_SAMPLES)
        raw_lo = raw_hi = win_lo = win_hi = None
        for i in list(indices)[::step]:
            try:
                values, file_window, inverted = self.raw(i)
            except DataError:
                continue
            lo, hi = intensity_range(values)
            w = values.astype(np.float32) if values.ndim == 3 else self.window.apply(values, file_window)
            w = 1.0 - w if inverted else w
            wlo, whi = intensity_range(w)
            raw_lo, raw_hi = _min(raw_lo, lo), _max(raw_hi, hi)
            win_lo, win_hi = _min(win_lo, wlo), _max(win_hi, whi)
        return {"window": self.window.describe(), "before": [raw_lo, raw_hi], "after": [win_lo, win_hi]}

    def consistency_warnings(self) -> list[str]:
        """Inconsistent sizes or bit depths across files (resizing hides the first, windowing may not fix the
        second: mixed 12/16-bit scanners with file windows)."""
        summary = self.header_summary()
        out = []
        if len(summary["bit_depths"]) > 1:
            out.append(f"inconsistent bit depths across files: {summary['bit_depths']}")
        if len(summary["sizes"]) > 1:
            out.append(f"inconsistent image sizes across files (each is resized to image_size): {summary['sizes']}")
        return out


def medical_report(dataset: Any, indices: Sequence[int]) -> tuple[dict[str, Any], list[str]]:
    """For ``explora data check`` / ``data stats``: header summary + intensity ranges, and consistency warnings,
    of a DICOM / NIfTI dataset (also behind a patient-level split); ``({}, [])`` for any other dataset."""
    from explora.data.splits import GroupSplit

    if isinstance(dataset, GroupSplit):
        dataset, indices = dataset.inner, [dataset.indices[i] for i in indices]
    if not isinstance(dataset, MedicalDataset):
        return {}, []
    return ({**dataset.header_summary(), "intensity": dataset.intensity_summary(indices)},
            dataset.consistency_warnings())


def input_channels_record(dataset: Any) -> dict[str, Any]:
    """``{'input_channels': {...}}`` for an export's sidecar when the data is DICOM / NIfTI: how grayscale met the
    backbone's channels and the window, so evaluation can read its data the same way; ``{}`` otherwise."""
    from explora.data.splits import GroupSplit

    if isinstance(dataset, GroupSplit):
        dataset = dataset.inner
    if not isinstance(dataset, MedicalDataset):
        return {}
    mode = "replicate" if dataset.channels == 3 else "in_chans_1 (RGB patch filters summed)"
    return {"input_channels": {"grayscale": mode, "channels": dataset.channels, "window": dataset.window.describe(),
                               "spec_options": f"channels={dataset.channels}"}}


def _min(a: float | None, b: float) -> float:
    return b if a is None or b < a else a


def _max(a: float | None, b: float) -> float:
    return b if a is None or b > a else a


def labels_table(csv_path, key_column: str, classes: Sequence[str] | None) -> tuple[dict[str, tuple[str, int]],
                                                                                     list[str]]:
    """A labels CSV (header row with ``key_column`` and a label column) -> ``{key: (row description, label)}`` and
    the class list (given, or sorted names / ``'0'..'max'`` for integer labels)."""
    from pathlib import Path

    from explora.data.lists import LABEL_COLUMNS, parse_label, read_csv

    csv_path = Path(csv_path)
    header, rows = read_csv(csv_path)
    if header is None:
        header = [c.lower() for c in rows[0][1]]
        rows = rows[1:]
    key = key_column.lower()
    if key not in header:
        raise DataError(f"{csv_path}: no column {key_column!r} in the header {header}; the labels CSV needs the "
                        f"key column named by label_by= and a label column ({', '.join(LABEL_COLUMNS)})")
    label_col = next((header.index(c) for c in LABEL_COLUMNS if c in header), None)
    if label_col is None:
        raise DataError(f"{csv_path}: no label column in the header {header}; expected one of {LABEL_COLUMNS}")
    key_col = header.index(key)
    cells = [r for _, r in rows if len(r) > max(key_col, label_col)]
    if classes is None:
        labels = [r[label_col] for r in cells]
        if labels and all(c.lstrip("-").isdigit() for c in labels):
            classes = [str(i) for i in range(max(int(c) for c in labels) + 1)]
        else:
            classes = sorted(set(labels))
    table: dict[str, tuple[str, int]] = {}
    for row_no, r in rows:
        where = f"{csv_path} row {row_no}"
        if len(r) <= max(key_col, label_col):
            raise DataError(f"{where}: malformed row {r!r}; expected {key_column} and a label")
        table[r[key_col]] = (where, parse_label(r[label_col], classes, where))
    return table, list(classes)


__all__ = ["Header", "MedicalDataset", "input_channels_record", "labels_table", "medical_report"]
