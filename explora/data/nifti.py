"""``nifti:/path[:axis=2,skip_empty=1,window=...,channels=...,frame=0]``: 2-D slices of NIfTI volumes (nibabel).

``path`` is one ``.nii`` / ``.nii.gz`` file or a folder searched recursively. Each volume is cut along ``axis``
(0, 1 or 2; default 2, axial for RAS-oriented volumes); ``skip_empty=1`` leaves out constant slices (background
only). 4-D volumes give the slices of time point ``frame`` (default 0). Values are nibabel's scaled data
(``scl_slope`` / ``scl_inter`` applied: Hounsfield units for CT), then the window (default ``p0.5-99.5``
per-slice percentiles; for CT use a preset such as ``window=soft_tissue``). A sample keeps its volume and slice
index: :meth:`NiftiSlices.slice_of` and the ``describe`` text used in every message.
nibabel is the optional extra ``explora[medical]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from explora.core.errors import ConfigError, DataError
from explora.data.medical import Header, MedicalDataset
from explora.data.windowing import Window

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def require_nibabel() -> Any:
    try:
        import nibabel
    except ImportError as e:
        raise DataError("reading NIfTI files needs nibabel: pip install 'explora[medical]' (or nibabel>=5)") from e
    return nibabel


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


class NiftiSlices(MedicalDataset):
    """2-D slices of one or more NIfTI volumes as float32 (channels, H, W) in [0, 1]; all unlabeled (-1)."""

    default_window = "p0.5-99.5"

    def __init__(self, path: str | Path, *, axis: int = 2, skip_empty: bool = False, frame: int = 0,
                 window: str | Window | None = None, channels: int = 3, image_size: int | None = None,
                 on_error: str = "raise") -> None:
        super().__init__(window=window, channels=channels, image_size=image_size, on_error=on_error)
        self._nib = require_nibabel()
        self.path = Path(path)
        self.source = str(self.path)
        self.axis, self.skip_empty, self.frame = int(axis), bool(skip_empty), int(frame)
        if self.axis not in (0, 1, 2):
            raise ConfigError(f"{path}: axis={axis}; expected 0, 1 or 2")
        if self.path.is_dir():
            files = sorted(p for p in self.path.rglob("*") if _is_nifti(p))
        elif _is_nifti(self.path):
            files = [self.path]
        else:
            raise DataError(f"{path}: not a NIfTI file (.nii / .nii.gz) or a folder of them")
        self.items: list[tuple[Path, int]] = []  # (volume, slice index)
        for f in files:
            self._index_volume(f)
        self._require_nonempty("NIfTI volumes (.nii / .nii.gz) with non-empty slices")

    def _volume(self, path: Path) -> Any:
        """The volume's data proxy (not read into memory), with a 4-D volume's time point chosen."""
        try:
            img = self._nib.load(str(path))
        except Exception as e:  # noqa: BLE001 - nibabel raises several types for a bad file
            raise DataError(f"{path}: unreadable NIfTI file ({type(e).__name__}: {e})") from e
        shape = img.shape
        if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
            return img
        if len(shape) == 4:
            if self.frame >= shape[3]:
                raise DataError(f"{path}: frame={self.frame} but the volume has {shape[3]} time points")
            return img
        raise DataError(f"{path}: volume has shape {shape}; expected 3-D (or 4-D with frame=)")

    def _slab(self, img: Any, index: int | slice) -> np.ndarray:
        where: list[Any] = [slice(None)] * 3
        where[self.axis] = index
        if len(img.shape) == 4:
            where.append(self.frame if img.shape[3] > 1 else 0)
        return np.asarray(img.dataobj[tuple(where)], dtype=np.float64)  # scl_slope / scl_inter applied

    def _index_volume(self, path: Path) -> None:
        try:
            img = self._volume(path)
        except DataError as e:
            self._index_problem(str(e))
            return
        n = img.shape[self.axis]
        keep = range(n)
        if self.skip_empty:
            data = self._slab(img, slice(None))  # (X, Y, Z): one read per volume at indexing time
            moved = np.moveaxis(data, self.axis, 0).reshape(n, -1)
            keep = [i for i in range(n) if moved[i].max() > moved[i].min()]
        plane = [s for a, s in enumerate(img.shape[:3]) if a != self.axis]
        bits = int(img.header.get_data_dtype().itemsize * 8)
        self.headers[str(path)] = Header(size=f"{plane[0]}x{plane[1]}", bits=bits)
        self.items.extend((path, i) for i in keep)

    def __len__(self) -> int:
        return len(self.items)

    def slice_of(self, index: int) -> tuple[Path, int]:
        """(volume file, slice index along ``axis``) of sample ``index``, for reports."""
        return self.items[index]

    def describe(self, index: int) -> str:
        path, i = self.items[index]
        return f"{path} slice {i} (axis {self.axis})"

    def label(self, index: int) -> int:
        return -1

    def group_key(self, index: int, by: str) -> str:
        path = self.items[index][0]
        if by in ("volume", "file"):
            return str(path)
        if by == "parent":
            return str(path.parent)
        raise ConfigError(f"{self.source}: by={by!r}; NIfTI slices group by 'volume' (file) or 'parent' (folder)")

    def raw(self, index: int) -> tuple[np.ndarray, None, bool]:
        path, i = self.items[index]
        img = self._volume(path)
        try:
            return self._slab(img, i), None, False
        except Exception as e:  # noqa: BLE001 - truncated or corrupt files fail at read time
            raise DataError(f"{self.describe(index)}: unreadable voxel data ({type(e).__name__}: {e})") from e


__all__ = ["NiftiSlices"]
