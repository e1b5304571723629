"""Sliding-window inference over scenes of any size: overlapping windows, blended class probabilities, read and
written window by window.

Windows of ``window x window`` pixels step by ``window - overlap`` and the last row/column is shifted back to end
at the scene's border, so every pixel is covered and no window is padded (a scene smaller than one window is padded
by reflection, and then it is one forward of the whole image). Each window's softmax probabilities are weighted by
a separable ramp (``hann``: a Hann window raised to a floor of 1e-3, so borders still count where only one window
covers them; ``linear``: a triangle; ``none``: uniform) and accumulated with the weights; the class map is the
argmax of the weighted mean. Where the windows tile the scene without overlap, every pixel is one window's own
prediction (the same as a full forward of each window; a single-window scene equals one full forward).

Scenes larger than memory: :class:`SceneReader` reads one window at a time from a GeoTIFF (a memory map where the
file is uncompressed and contiguous, otherwise only the strips or tiles the window overlaps, decoded by tifffile);
the accumulators can be ``numpy.memmap`` files (``scratch=`` a folder), so memory use is a few windows plus the
output class map regardless of the scene size.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile
import torch

from explora.core.errors import ConfigError, DataError
from explora.data.io import array_to_tensor, read_image

BLENDS = ("hann", "linear", "none")


def window_origins(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis: every ``stride``, the last one flush with the border."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def blend_weights(window: int, blend: str = "hann") -> torch.Tensor:
    """(window, window) float32 weights of one window's pixels."""
    if blend == "none":
        ramp = torch.ones(window)
    elif blend == "hann":
        ramp = torch.hann_window(window + 2, periodic=False)[1:-1].clamp(min=1e-3)
    elif blend == "linear":
        c = (torch.arange(window) + 0.5) / window
        ramp = (1 - (2 * c - 1).abs()).clamp(min=1e-3)
    else:
        raise ConfigError(f"blend: got {blend!r}, expected one of {BLENDS}")
    return ramp[:, None] * ramp[None, :]


class SceneReader:
    """Window reads ``(C, h, w)`` of one image file without holding the scene in memory where the format allows.

    GeoTIFFs: an uncompressed contiguous file is memory-mapped (a read touches only the window's bytes); a
    compressed or tiled single-image file is read segment by segment (its strips or tiles: only those a window
    overlaps are read and decoded, the last few kept in a small cache for the neighbouring windows); anything
    else (several pages per image, volumes) is decoded once. Other formats are decoded once.
    """

    CACHE = 64  # decoded strips / tiles kept for neighbouring windows

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._array: np.ndarray | None = None  # (C, H, W) view or array
        self._tensor: torch.Tensor | None = None
        self._tif: tifffile.TiffFile | None = None
        self._cache: dict[int, np.ndarray] = {}
        if self.path.suffix.lower() not in (".tif", ".tiff"):
            self._tensor = read_image(self.path)
            self.shape = tuple(self._tensor.shape)
            return
        try:
            with tifffile.TiffFile(self.path) as tif:
                series = tif.series[0]
                axes, pages = series.axes, len(series.pages)
                shaped = tuple(tif.pages[0].shaped)
            try:
                arr = tifffile.memmap(self.path, mode="r")  # contiguous, uncompressed: no read until sliced
            except (ValueError, OSError):
                arr = None
            if arr is None and pages == 1 and shaped[1] == 1:
                self._tif = tifffile.TiffFile(self.path)  # segment by segment
                s, _, h, w, c = shaped
                self.shape = (s * c, h, w)
                return
            if arr is None:
                arr = tifffile.imread(self.path)
        except FileNotFoundError as e:
            raise DataError(f"{self.path}: file not found") from e
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{self.path}: unreadable GeoTIFF ({type(e).__name__}: {e})") from e
        if arr.ndim == 2:
            arr = arr[None]
        elif axes.endswith("S"):
            arr = np.moveaxis(arr, -1, 0)  # (C, H, W) view of (H, W, C)
        self._array = arr
        self.shape = tuple(int(v) for v in arr.shape)

    def _segment(self, index: int) -> np.ndarray:
        """Strip / tile ``index`` of the first page, decoded: (rows, cols, samples)."""
        if index not in self._cache:
            assert self._tif is not None
            page = self._tif.pages[0]
            fh = self._tif.filehandle
            fh.seek(page.dataoffsets[index])
            data = fh.read(page.databytecounts[index])
            try:
                seg = page.decode(data, index, jpegtables=page.jpegtables)[0]  # (depth, rows, cols, samples)
            except Exception as e:
                raise DataError(f"{self.path}: segment {index} could not be decoded ({type(e).__name__}: {e})") from e
            if len(self._cache) >= self.CACHE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[index] = seg[0]
        return self._cache[index]

    def _read_segments(self, top: int, left: int, h: int, w: int) -> np.ndarray:
        assert self._tif is not None
        page = self._tif.pages[0]
        planes, _, height, width, samples = page.shaped
        th, tw = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip or height, width)
        ny, nx = -(-height // th), -(-width // tw)
        out = None
        for p in range(planes):
            for ty in range(top // th, (top + h - 1) // th + 1):
                for tx in range(left // tw, (left + w - 1) // tw + 1):
                    seg = self._segment(p * ny * nx + ty * nx + tx)
                    if out is None:
                        out = np.zeros((planes, h, w, samples), dtype=seg.dtype)
                    y0, x0 = ty * th, tx * tw
                    ys, ye = max(top, y0), min(top + h, y0 + seg.shape[0])
                    xs, xe = max(left, x0), min(left + w, x0 + seg.shape[1])
                    out[p, ys - top : ye - top, xs - left : xe - left] = seg[ys - y0 : ye - y0, xs - x0 : xe - x0]
        assert out is not None
        return out.transpose(0, 3, 1, 2).reshape(planes * samples, h, w)  # (C, h, w)

    def read(self, top: int, left: int, h: int, w: int) -> torch.Tensor:
        """Pixels ``[top, top + h) x [left, left + w)`` as ``(C, h, w)`` (uint8, or float32 scaled like
        :func:`explora.data.io.read_image`)."""
        if self._tensor is not None:
            return self._tensor[:, top : top + h, left : left + w]
        if self._tif is not None:
            return array_to_tensor(np.ascontiguousarray(self._read_segments(top, left, h, w)))
        assert self._array is not None
        return array_to_tensor(np.ascontiguousarray(self._array[:, top : top + h, left : left + w]))

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None


def _accumulator(shape: tuple[int, ...], scratch: Path | None, name: str) -> np.ndarray:
    if scratch is None:
        return np.zeros(shape, dtype=np.float32)
    scratch.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(scratch / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape)


def iter_windows(height: int, width: int, window: int, overlap: int) -> Iterator[tuple[int, int]]:
    """``(top, left)`` of every window over an ``height x width`` scene."""
    if not 0 <= overlap < window:
        raise ConfigError(f"overlap={overlap}: expected 0 <= overlap < window ({window})")
    stride = window - overlap
    for top in window_origins(height, window, stride):
        for left in window_origins(width, window, stride):
            yield top, left


@torch.no_grad()
def sliding_window_probs(
    forward: Callable[[torch.Tensor], torch.Tensor],
    read: Callable[[int, int, int, int], torch.Tensor],
    height: int,
    width: int,
    num_classes: int,
    *,
    window: int,
    overlap: int = 0,
    blend: str = "hann",
    batch_size: int = 8,
    scratch: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """(K, H, W) float32 blended class probabilities of a scene.

    ``read(top, left, h, w)`` returns the raw window ``(C, h, w)``; ``forward`` maps a batch of raw windows
    ``(B, C, window, window)`` to logits ``(B, K, window, window)`` (normalisation is its business).
    ``scratch``: a folder for memory-mapped accumulators (scenes larger than memory); ``progress(done, total)``
    is called after each batch of windows.
    """
    weights = blend_weights(window, blend).numpy()
    origins = list(iter_windows(height, width, window, overlap))
    scratch_dir = None
    if scratch is not None:
        scratch_dir = Path(tempfile.mkdtemp(prefix="sliding-", dir=scratch))
    probs = _accumulator((num_classes, height, width), scratch_dir, "probs")
    total = _accumulator((height, width), scratch_dir, "weights")
    for lo in range(0, len(origins), batch_size):
        chunk = origins[lo : lo + batch_size]
        tiles, sizes = [], []
        for top, left in chunk:
            h, w = min(window, height - top), min(window, width - left)
            tile = read(top, left, h, w)
            if (h, w) != (window, window):  # a scene smaller than the window: reflect-pad to it
                mode = "reflect" if min(h, w) > 1 and window - max(h, w) < min(h, w) else "replicate"
                padded = torch.nn.functional.pad(tile[None].float(), (0, window - w, 0, window - h), mode=mode)[0]
                tile = padded.to(tile.dtype)
            tiles.append(tile)
            sizes.append((h, w))
        logits = forward(torch.stack(tiles))
        p = logits.float().softmax(1).cpu().numpy()  # (B, K, window, window)
        for (top, left), (h, w), pi in zip(chunk, sizes, p, strict=True):
            wt = weights[:h, :w]
            probs[:, top : top + h, left : left + w] += pi[:, :h, :w] * wt
            total[top : top + h, left : left + w] += wt
        if progress is not None:
            progress(min(lo + batch_size, len(origins)), len(origins))
    probs /= np.maximum(total, 1e-12)[None]
    return probs


def num_windows(height: int, width: int, window: int, overlap: int) -> int:
    """How many windows :func:`sliding_window_probs` runs over a scene."""
    stride = window - overlap
    return len(window_origins(height, window, stride)) * len(window_origins(width, window, stride))


__all__ = ["BLENDS", "SceneReader", "blend_weights", "iter_windows", "num_windows", "sliding_window_probs",
           "window_origins"]
