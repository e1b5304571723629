"""Intensity windowing: physical values (CT Hounsfield units, MR signal, ...) -> float32 in [0, 1].

Medical images carry 12-16 bit values whose meaning depends on the modality; the backbone's normalisation expects
[0, 1]. A window maps a value range onto [0, 1] (clipping outside it). The ``window=`` option of the ``dicom:`` and
``nifti:`` specs takes one of:

* ``file``: the file's own Window Center / Width (DICOM; the first pair when several are stored; the VOI LUT Function
  LINEAR / LINEAR_EXACT / SIGMOID is honoured). Files without one fall back to ``minmax``.
* a preset name (CT, Hounsfield units; Radiopaedia "Windowing (CT)"): ``lung``, ``mediastinum``, ``soft_tissue``,
  ``abdomen``, ``liver``, ``bone``, ``brain``, ``subdural``, ``stroke``, ``temporal_bone``.
* ``C/W``: a fixed center and width, e.g. ``40/400``.
* ``pLOW-HIGH``: per-image percentiles, e.g. ``p1-99`` or ``p0.5-99.5``; ``minmax`` = ``p0-100``.

The linear window is DICOM PS3.3 C.11.2.1.2.1: ``y = ((x - (c - 0.5)) / (w - 1) + 0.5)`` clipped to [0, 1].
:func:`require_unit_range` is the guard the normalisation calls: integer images other than uint8 (raw 12/16-bit
values) are refused, so they can never be normalised as if they were in [0, 1].
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from explora.core.errors import ConfigError, DataError

# name -> (center, width) in Hounsfield units (Radiopaedia, "Windowing (CT)").
CT_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "temporal_bone": (600.0, 2800.0),
}
_FIXED = re.compile(r"^(-?\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)$")
_PERCENTILE = re.compile(r"^p(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)$")
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


@dataclass(frozen=True)
class Window:
    """One windowing rule: ``kind`` is ``'file'``, ``'fixed'`` (center/width) or ``'percentile'`` (low/high)."""

    kind: str
    center: float = 0.0
    width: float = 1.0
    low: float = 0.0
    high: float = 100.0
    name: str = ""

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.name or 'fixed'} (center {self.center:g}, width {self.width:g})"
        if self.kind == "percentile":
            return f"percentiles {self.low:g}-{self.high:g}"
        return "file window (fallback minmax)"

    def apply(self, values: np.ndarray, file_window: tuple[float, float, str] | None = None) -> np.ndarray:
        """``values`` (any shape, physical units) -> float32 in [0, 1]. ``file_window`` = (center, width, VOI
        function) from the file, used by ``kind='file'``."""
        x = np.asarray(values, dtype=np.float64)
        if self.kind == "fixed":
            return voi_window(x, self.center, self.width)
        if self.kind == "file" and file_window is not None:
            return voi_window(x, *file_window)
        low, high = (self.low, self.high) if self.kind == "percentile" else (0.0, 100.0)
        lo, hi = np.percentile(x, [low, high]) if x.size else (0.0, 0.0)
        if hi <= lo:  # a constant image: all zeros, not a division by zero
            return np.zeros(x.shape, dtype=np.float32)
        return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def voi_window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The DICOM VOI window (PS3.3 C.11.2.1.2) onto [0, 1] as float32."""
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise DataError(f"window width {width}: must be > 0 for LINEAR_EXACT")
        y = (x - center) / width + 0.5
    elif function == "SIGMOID":
        if width <= 0:
            raise DataError(f"window width {width}: must be > 0 for SIGMOID")
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
    else:
        if width < 1:
            raise DataError(f"window width {width}: must be >= 1 for the LINEAR VOI function")
        y = (x - (center - 0.5)) / max(width - 1.0, 1e-12) + 0.5
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def parse_window(text: str | Window | None, default: str = "file") -> Window:
    """A ``window=`` option value (see the module docstring) -> :class:`Window`."""
    if isinstance(text, Window):
        return text
    raw = (default if text is None or text == "" else str(text)).strip().lower()
    if raw == "file":
        return Window("file")
    if raw == "minmax":
        return Window("percentile", low=0.0, high=100.0)
    if raw in CT_PRESETS:
        c, w = CT_PRESETS[raw]
        return Window("fixed", center=c, width=w, name=raw)
    if m := _FIXED.match(raw):
        c, w = float(m.group(1)), float(m.group(2))
        if w < 1:
            raise ConfigError(f"window={text!r}: width must be >= 1")
        return Window("fixed", center=c, width=w)
    if m := _PERCENTILE.match(raw):
        lo, hi = float(m.group(1)), float(m.group(2))
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"window={text!r}: percentiles must satisfy 0 <= low < high <= 100")
        return Window("percentile", low=lo, high=hi)
    raise ConfigError(
        f"window={text!r}: expected 'file', 'minmax', a preset ({', '.join(CT_PRESETS)}), "
        "'CENTER/WIDTH' (e.g. 40/400) or 'pLOW-HIGH' percentiles (e.g. p1-99)"
    )


def to_channels(image: np.ndarray, channels: int, where: str) -> torch.Tensor:
    """A windowed (H, W) or (3, H, W) float image -> (channels, H, W) float32: grayscale replicated to 3 channels,
    or kept as 1 channel for a backbone whose patch embedding was adapted to ``in_chans=1``."""
    if channels not in (1, 3):
        raise ConfigError(f"{where}: channels={channels}; expected 3 (replicate grayscale) or 1 (in_chans=1 backbone)")
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    if x.ndim == 2:
        x = x.unsqueeze(0)  # (1, H, W)
    if x.shape[0] == channels:
        return x
    if x.shape[0] == 1 and channels == 3:
        return x.expand(3, -1, -1).contiguous()
    raise DataError(f"{where}: image has {x.shape[0]} channels; cannot give {channels} (colour data needs channels=3)")


# Normalisation statistics for 1-channel inputs: the mean of ImageNet's RGB statistics, so a 1-channel backbone
# (RGB patch filters summed) sees about what the RGB backbone sees on the replicated image.
GRAY_MEAN = (float(np.mean([0.485, 0.456, 0.406])),)
GRAY_STD = (float(np.mean([0.229, 0.224, 0.225])),)


def require_unit_range(images: torch.Tensor, where: str = "normalisation") -> None:
    """Refuse integer images that are not uint8: raw 12/16-bit values normalised as if in [0, 1] is a silent wrong
    result. uint8 is scaled by 1/255 downstream; floats are taken to be in [0, 1] already."""
    if images.dtype == torch.uint8 or images.is_floating_point():
        return
    raise DataError(
        f"{where}: got {str(images.dtype).replace('torch.', '')} images; only uint8 (scaled by 1/255) or float in "
        "[0, 1] may be normalised. Raw 12/16-bit medical values need windowing first: read them with the "
        "'dicom:' or 'nifti:' dataset specs and a window= option (see docs/medical.md)"
    )


def intensity_range(values: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite values, for reports; (nan, nan) when there are none."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    return (float(x.min()), float(x.max())) if x.size else (math.nan, math.nan)


__all__ = ["CT_PRESETS", "GRAY_MEAN", "GRAY_STD", "Window", "intensity_range", "parse_window",
           "require_unit_range", "to_channels", "voi_window"]
