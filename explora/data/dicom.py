"""``dicom:/folder[:window=...,frame=...,channels=...,labels=...,label_by=...]``: a DICOM folder, read with pydicom.

Every file under the folder (recursive) named ``*.dcm``, ``*.dicom``, ``*.dic`` or without a suffix is a candidate;
each frame of a multi-frame file is a sample (``frame=all``, default), or one chosen frame (``frame=N``, 0-based, or
``frame=middle``). Pixel values go through the modality LUT (Rescale Slope / Intercept, also from the functional
groups of enhanced multi-frame files), then the window (:mod:`explora.data.windowing`; default ``file``), then
MONOCHROME1 is inverted, giving float32 in [0, 1]. Colour files (RGB / YBR, converted to RGB by pydicom) are scaled
by their bit depth and need ``channels=3``.

Labels: ``labels=/path/labels.csv`` with a header naming the key column and a label column; ``label_by=file``
(default: the path relative to the folder) or a DICOM keyword such as ``PatientID`` / ``StudyInstanceUID``.
Without labels every sample is unlabeled (-1), as self-supervised pre-training needs.

Compressed transfer syntaxes decode through pydicom's pixel handlers; RLE and deflate need nothing else, JPEG 2000
uses Pillow (with OpenJPEG) or pylibjpeg-openjpeg, JPEG-LS and JPEG lossless need pylibjpeg-libjpeg, pyjpegls or
gdcm (see :data:`DECODER_PACKAGES`). pydicom is the optional extra ``explora[medical]``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from explora.core.errors import ConfigError, DataError
from explora.data.medical import Header, MedicalDataset, labels_table
from explora.data.windowing import VOI_FUNCTIONS, Window

_log = logging.getLogger(__name__)

SUFFIXES = {".dcm", ".dicom", ".dic", ""}
GROUP_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")
# Transfer syntax UID -> the packages that decode it (pip names), for error messages and `explora data check`.
DECODER_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "Pillow (8-bit), or pylibjpeg-libjpeg / gdcm",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg or gdcm (Pillow cannot decode 12-bit)",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg or gdcm",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg or gdcm",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pyjpegls, pylibjpeg-libjpeg or gdcm",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls, pylibjpeg-libjpeg or gdcm",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg, Pillow with OpenJPEG, or gdcm",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg, Pillow with OpenJPEG, or gdcm",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg>=2",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg>=2",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg>=2",  # HTJ2K
    "1.2.840.10008.1.2.5": "nothing extra (numpy)",  # RLE Lossless
}


def require_pydicom() -> Any:
    try:
        import pydicom
    except ImportError as e:
        raise DataError("reading DICOM files needs pydicom>=3: pip install 'explora[medical]'") from e
    if int(pydicom.__version__.split(".")[0]) < 3:  # pydicom.pixels (per-frame decoding) arrived in 3.0
        raise DataError(f"reading DICOM files needs pydicom>=3, found {pydicom.__version__}: "
                        "pip install -U 'explora[medical]'")
    return pydicom


def decoder_problem(ds: Any) -> str | None:
    """Why this file's pixel data cannot be decoded here (naming the packages that would), or None."""
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.get("TransferSyntaxUID")
    if uid is None or not uid.is_compressed:
        return None
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"transfer syntax {uid.name} ({uid}) has no pydicom decoder"
    if decoder.is_available:
        return None
    return (f"pixel data is compressed as {uid.name} ({uid}) and no decoder for it is installed; install "
            f"{DECODER_PACKAGES.get(str(uid), 'a pydicom pixel-data plugin')}")


def _first(value: Any) -> float:
    """A DS/IS value or multi-value -> its first number."""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _frame_attr(ds: Any, frame: int, sequence: str, keyword: str) -> Any:
    """``keyword`` at the top level, else in the per-frame or shared functional groups' ``sequence`` item."""
    if keyword in ds:
        return ds.get(keyword)
    for groups, i in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        if groups in ds and len(ds[groups].value) > i:
            item = ds[groups].value[i]
            if sequence in item and len(item[sequence].value) and keyword in item[sequence].value[0]:
                return item[sequence].value[0].get(keyword)
    return None


def rescale(values: np.ndarray, ds: Any, frame: int = 0) -> np.ndarray:
    """The modality LUT: ``values * RescaleSlope + RescaleIntercept`` in float64 (identity when absent)."""
    slope = _frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    x = values.astype(np.float64)
    if slope is not None:
        x *= _first(slope)
    if intercept is not None:
        x += _first(intercept)
    return x


def file_window(ds: Any, frame: int = 0) -> tuple[float, float, str] | None:
    """The file's first Window Center / Width (and VOI LUT Function), or None."""
    center = _frame_attr(ds, frame, "FrameVOILUTSequence", "WindowCenter")
    width = _frame_attr(ds, frame, "FrameVOILUTSequence", "WindowWidth")
    if center is None or width is None:
        return None
    function = str(_frame_attr(ds, frame, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR").upper()
    return _first(center), _first(width), function if function in VOI_FUNCTIONS else "LINEAR"


def _syntax_name(ds: Any) -> str:
    uid = ds.file_meta.get("TransferSyntaxUID")
    return f"{uid.name} ({uid})" if uid else ""


class DicomDataset(MedicalDataset):
    """A folder of DICOM files as float32 (channels, H, W) samples in [0, 1] (see the module docstring)."""

    def __init__(self, root: str | Path, *, window: str | Window | None = None, frame: str | int = "all",
                 channels: int = 3, labels: str | Path | None = None, label_by: str = "file",
                 classes: list[str] | None = None, image_size: int | None = None, on_error: str = "raise") -> None:
        super().__init__(window=window, channels=channels, image_size=image_size, on_error=on_error)
        self._pydicom = require_pydicom()
        self.root = Path(root)
        self.source = str(self.root)
        self.frame = str(frame).lower()
        if self.frame not in ("all", "middle") and not self.frame.isdigit():
            raise ConfigError(f"{root}: frame={frame!r}; expected 'all', 'middle' or a 0-based frame index")
        if not self.root.is_dir():
            raise DataError(f"{root}: DICOM folder not found")
        self.label_by = label_by
        self.items: list[tuple[Path, int, int]] = []  # (file, frame index, label)
        self._build_index(Path(labels) if labels else None, classes)
        self._require_nonempty("DICOM files with pixel data (*.dcm or no suffix)")

    def _files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                      and not p.name.startswith("."))

    def _build_index(self, labels: Path | None, classes: list[str] | None) -> None:
        table: dict[str, tuple[str, int]] = {}
        if labels is not None:
            table, classes = labels_table(labels, self.label_by, classes)
        self.classes = list(classes or [])
        used: set[str] = set()
        for path in self._files():
            try:
                ds = self._pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as e:  # noqa: BLE001 - pydicom raises many types for a bad file
                self._index_problem(f"{path}: unreadable DICOM file ({type(e).__name__}: {e})")
                continue
            rel = path.relative_to(self.root).as_posix()
            if "Rows" not in ds or "Columns" not in ds:
                self._index_problem(f"{path}: no pixel data (a DICOM {ds.get('Modality', 'object')} without an "
                                    "image, e.g. a report or structure set)")
                continue
            n_frames = int(_first(ds.get("NumberOfFrames", 1) or 1))
            frames = self._frames(n_frames, path)
            if frames is None:
                continue
            tags = {t: str(ds.get(t, "")) for t in GROUP_TAGS}
            self.headers[rel] = Header(
                size=f"{ds.Rows}x{ds.Columns}", bits=int(ds.get("BitsStored", ds.get("BitsAllocated", 0)) or 0),
                photometric=str(ds.get("PhotometricInterpretation", "")),
                transfer_syntax=_syntax_name(ds),
                tags=tags)
            label = -1
            if labels is not None:
                key = rel if self.label_by == "file" else str(ds.get(self.label_by, ""))
                if key not in table and self.label_by == "file":
                    key = str(path) if str(path) in table else key
                if key not in table:
                    self._index_problem(f"{path}: no row for {self.label_by}={key!r} in {labels}")
                    continue
                used.add(key)
                label = table[key][1]
            self.items.extend((path, f, label) for f in frames)
        for key, (where, _) in table.items():
            if key not in used:
                self._index_problem(f"{where}: {self.label_by}={key!r} matches no DICOM file under {self.root}")

    def _frames(self, n_frames: int, path: Path) -> list[int] | None:
        if self.frame == "all":
            return list(range(n_frames))
        if self.frame == "middle":
            return [n_frames // 2]
        k = int(self.frame)
        if k >= n_frames:
            self._index_problem(f"{path}: frame={k} but the file has {n_frames} frame(s)")
            return None
        return [k]

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, index: int) -> str:
        path, frame, _ = self.items[index]
        return f"{path} frame {frame}"

    def label(self, index: int) -> int:
        return self.items[index][2]

    def group_key(self, index: int, by: str) -> str:
        path = self.items[index][0]
        if by in ("file", "parent"):
            return str(path if by == "file" else path.parent)
        rel = path.relative_to(self.root).as_posix()
        tags = self.headers[rel].tags
        if by not in tags:
            ds = self._pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[by])
            tags[by] = str(ds.get(by, ""))
        if not tags[by]:
            raise DataError(f"{path}: no {by} tag to group by; choose another by= (e.g. file, parent, PatientID)")
        return tags[by]

    def raw(self, index: int) -> tuple[np.ndarray, tuple[float, float, str] | None, bool]:
        path, frame, _ = self.items[index]
        try:
            ds = self._pydicom.dcmread(path)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: unreadable DICOM file ({type(e).__name__}: {e})") from e
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise DataError(f"{path}: no pixel data")
        problem = decoder_problem(ds)
        if problem:
            raise DataError(f"{path}: {problem}")
        from pydicom.pixels import pixel_array

        n_frames = int(_first(ds.get("NumberOfFrames", 1) or 1))
        try:
            arr = pixel_array(ds, index=frame if n_frames > 1 else None)
        except Exception as e:  # noqa: BLE001 - decoder plugins raise RuntimeError, ValueError, ...
            uid = ds.file_meta.get("TransferSyntaxUID", "")
            hint = DECODER_PACKAGES.get(str(uid))
            extra = f"; {uid.name} decodes with {hint}" if hint else ""
            raise DataError(f"{path} frame {frame}: cannot decode pixel data ({type(e).__name__}: {e}){extra}") from e
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if photometric == "PALETTE COLOR":
            raise DataError(f"{path}: PALETTE COLOR images are not supported; convert them to RGB first")
        if arr.ndim == 3:  # colour (H, W, 3), already RGB (pydicom converts YBR)
            bits = int(ds.get("BitsStored", 8) or 8)
            return np.moveaxis(arr, -1, 0).astype(np.float64) / float(2**bits - 1), None, False
        return rescale(arr, ds, frame), file_window(ds, frame), photometric == "MONOCHROME1"


__all__ = ["DECODER_PACKAGES", "DicomDataset", "decoder_problem", "file_window", "rescale"]
