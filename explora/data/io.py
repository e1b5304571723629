"""Decoding one file into a ``(C, H, W)`` tensor, with every failure turned into a :class:`DataError`.

Decoders run inside data-loader workers; they do no normalisation (that is batched later by the engine) and keep
uint8 data as uint8 so a batch of images costs a quarter of the memory of float32 until it is on the device.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image, UnidentifiedImageError

from explora.core.errors import DataError

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".ppm") + TIFF_SUFFIXES

# Sentinel-2 L1C/L2A digital numbers are reflectance x 10000 (ESA product spec; torchgeo and SSL4EO divide by it).
DEFAULT_INT_SCALE = 10000.0


def is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_SUFFIXES


def read_rgb(path: Path, mode: str = "RGB", min_side: int | None = None) -> torch.Tensor:
    """Decode a jpg/png/... with Pillow into a ``(C, H, W)`` uint8 tensor (``mode`` 'RGB' -> C=3, 'L' -> C=1).

    ``min_side``: the caller resizes the shorter side to this next (``ExploraDataset.image_size``), so a JPEG is
    decoded at the smallest DCT scale (1/2, 1/4, 1/8: Pillow's ``Image.draft``, libjpeg's scaled IDCT) whose shorter
    side is still at least ``min_side``: a 2,000-px image for a 448-px input decodes at 1/4, 16x fewer pixels. Other
    formats decode in full.
    """
    try:
        with Image.open(path) as im:
            if min_side is not None and im.format == "JPEG":
                w, h = im.size
                scale = min_side / min(w, h)
                if scale < 1:  # draft keeps the decoded size >= the requested one
                    im.draft(mode, (math.ceil(w * scale), math.ceil(h * scale)))
            im.load()  # forces full decode: truncated files fail here, not later in a worker's collate
            arr = np.asarray(im.convert(mode))
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(
            f"{path}: unreadable or truncated image ({type(e).__name__}: {e}); expected a {mode} image"
        ) from e
    if arr.ndim == 2:  # (H, W) -> (H, W, 1)
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (H, W, C) -> (C, H, W)


def _to_chw(arr: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Bring a decoded TIFF array to (C, H, W) using tifffile's axes string (S = samples, C/I/Q = planes)."""
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim != 3:
        raise DataError(f"{path}: GeoTIFF has shape {arr.shape}; expected (H, W), (H, W, C) or (C, H, W)")
    if axes.endswith("S"):  # pixel-interleaved (H, W, C)
        return arr.transpose(2, 0, 1)
    if axes and axes[0] in "CSIQ" and axes[1:] == "YX":  # planar (C, H, W)
        return arr
    # Unknown axes: the band axis is the smallest one (chips are never thinner than their band count).
    return arr if arr.shape[0] <= arr.shape[-1] else arr.transpose(2, 0, 1)


def read_tiff_array(path: Path) -> np.ndarray:
    """Decode a (Geo)TIFF into a ``(C, H, W)`` numpy array in its stored dtype."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            arr = series.asarray()
            axes = series.axes
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except DataError:
        raise
    except Exception as e:  # tifffile raises many types (TiffFileError, ValueError, struct.error, zlib, ...)
        raise DataError(f"{path}: unreadable or truncated GeoTIFF ({type(e).__name__}: {e})") from e
    return np.ascontiguousarray(_to_chw(arr, axes, path))


def tiff_shape(path: Path) -> tuple[int, int, int]:
    """``(C, H, W)`` of a TIFF from its header only, so large scenes can be tiled without decoding them."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes = tuple(series.shape), series.axes
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except Exception as e:
        raise DataError(f"{path}: unreadable GeoTIFF header ({type(e).__name__}: {e})") from e
    chw = _to_chw(np.empty(shape, dtype=np.uint8), axes, path).shape if len(shape) in (2, 3) else shape
    if len(chw) != 3:
        raise DataError(f"{path}: GeoTIFF has shape {shape}; expected 2 or 3 dimensions")
    return int(chw[0]), int(chw[1]), int(chw[2])


def image_shape(path: Path) -> tuple[int, int, int]:
    """``(C, H, W)`` of any supported image from its header (Pillow images report C=3: they are read as RGB)."""
    if is_tiff(path):
        return tiff_shape(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except Exception as e:
        raise DataError(f"{path}: unreadable image header ({type(e).__name__}: {e})") from e
    return 3, h, w


def array_to_tensor(arr: np.ndarray, int_scale: float = DEFAULT_INT_SCALE) -> torch.Tensor:
    """uint8 stays uint8; other integer types become float32 / ``int_scale``; floats become float32 unchanged."""
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr)
    if np.issubdtype(arr.dtype, np.integer):
        return torch.from_numpy(arr.astype(np.float32) / np.float32(int_scale))
    if np.issubdtype(arr.dtype, np.floating):
        return torch.from_numpy(arr.astype(np.float32, copy=False))
    raise DataError(f"unsupported pixel dtype {arr.dtype}; expected an integer or floating type")


def read_image(path: Path, int_scale: float = DEFAULT_INT_SCALE, min_side: int | None = None) -> torch.Tensor:
    """Decode any supported file into ``(C, H, W)``: TIFFs through tifffile (all bands), others as RGB uint8
    (JPEGs at a reduced scale whose shorter side stays >= ``min_side``, see :func:`read_rgb`)."""
    if is_tiff(path):
        try:
            return array_to_tensor(read_tiff_array(path), int_scale)
        except DataError as e:
            if str(path) in str(e):
                raise
            raise DataError(f"{path}: {e}") from e
    return read_rgb(path, min_side=min_side)


def open_maybe_gzip(path: Path) -> bytes:
    """Read a whole file, transparently gunzipping ``.gz`` files; errors name the file."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: unreadable or truncated gzip file ({e})") from e
