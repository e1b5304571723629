"""The base class every explora dataset shares: resize-to-square, error policy, skip counting, statistics.

A subclass implements ``__len__`` and ``load(index) -> (image (C, H, W), label, *extra)`` raising
:class:`DataError` on bad input. ``__getitem__`` adds the per-sample resize (in the worker, on uint8 where the
data is uint8, so samples stack) and the ``on_error`` policy:

* ``'raise'``: the DataError propagates (its message names the file and, for CSVs, the row);
* ``'skip'``: the next index (``index + 1``, wrapping) is tried instead, deterministically, and the bad sample is
  counted in :attr:`ExploraDataset.skipped` and logged once per index.

The skip counter is shared memory (one slot per worker) created in the main process and inherited by (fork) or pickled
into (spawn) data-loader workers, so ``dataset.skipped`` read in the main process is the total over all workers;
the engine needs no extra plumbing. Bad rows found while indexing (malformed CSV rows, labels outside the class
list) are counted the same way and listed in :attr:`ExploraDataset.problems`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Sequence
from multiprocessing.context import get_spawning_popen
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset, get_worker_info

from explora.core.errors import ConfigError, DataError
from explora.data.stats import compute_stats

log = logging.getLogger("explora.data")

# ImageNet statistics (torchvision / timm IMAGENET_DEFAULT_MEAN/STD): the default for RGB data, as in ExPLoRA's
# linprobe/util/data.py which normalises fMoW-RGB with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ON_ERROR = ("raise", "skip")
STATS_SAMPLES = 512  # samples read to estimate mean/std when a dataset has no published statistics


class SkipCounter:
    """A process-shared count: one int64 slot per data-loader worker (slot 0 = main process), summed on read.

    Slots avoid a lock (whose context, fork vs spawn, would have to match the loader's); each process only
    writes its own slot, so increments never race.
    """

    SLOTS = 257

    def __init__(self, value: int = 0) -> None:
        self._slots = mp.RawArray("q", self.SLOTS)
        self._slots[0] = value

    def increment(self) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (self.SLOTS - 1)
        self._slots[slot] += 1

    @property
    def value(self) -> int:
        return int(sum(self._slots))

    def __getstate__(self) -> dict[str, Any]:
        # Shared memory only travels while a worker process is being spawned; a plain pickle (deepcopy, saving a
        # config) gets a snapshot of the count and a fresh counter.
        if get_spawning_popen() is not None:
            return {"shared": self._slots}
        return {"count": self.value}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "shared" in state:
            self._slots = state["shared"]
        else:
            self.__init__(state["count"])


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is ``size`` (bilinear, antialiased), then center-crop to ``size x size``."""
    h, w = image.shape[-2:]
    if (h, w) != (size, size):
        if min(h, w) != size:
            image = TF.resize(image, [size], antialias=True)  # shorter side -> size, aspect kept
        image = TF.center_crop(image, [size, size])
    return image


class ExploraDataset(Dataset):
    """Map-style dataset returning ``(image (C, H, W) uint8|float32, label int, *extra)``; label -1 = unlabeled."""

    classes: list[str] = []
    in_chans: int = 3
    source: str = ""  # the file or folder the samples come from, for messages

    def __init__(self, *, image_size: int | None = None, on_error: str = "raise") -> None:
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error={on_error!r}; expected one of {ON_ERROR}")
        if image_size is not None and image_size <= 0:
            raise ConfigError(f"image_size={image_size}; expected a positive integer")
        self.image_size = image_size
        self.on_error = on_error
        self._skips = SkipCounter()
        self.problems: list[str] = []  # bad rows/files found while indexing (skip mode), for reports
        self._mean: tuple[float, ...] | None = None
        self._std: tuple[float, ...] | None = None

    # --- to implement --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[Any, ...]:
        """Decode sample ``index`` at its native size; raise DataError naming the file on bad input."""
        raise NotImplementedError

    # --- shared behaviour ----------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def skipped(self) -> int:
        """Samples and index rows skipped so far, summed over all data-loader workers."""
        return self._skips.value

    def _index_problem(self, message: str) -> None:
        """A bad row/file found while building the index: raise, or drop it and count it."""
        if self.on_error == "raise":
            raise DataError(message)
        self.problems.append(message)
        self._skips.increment()
        log.warning("skipping: %s", message)

    def _require_nonempty(self, what: str) -> None:
        if len(self) == 0:
            raise DataError(f"{self.source or what}: no samples found; expected {what}")

    def _check_bands(self, image: torch.Tensor, where: str) -> None:
        if image.ndim != 3 or image.shape[0] != self.in_chans:
            raise DataError(f"{where}: image has shape {tuple(image.shape)}; expected {self.in_chans} bands (C, H, W)")

    def sample(self, index: int) -> tuple[Any, ...]:
        """``load`` plus band-count check and resize, with no error policy (``check`` uses this)."""
        out = self.load(index)
        image = out[0]
        self._check_bands(image, self.describe(index))
        if self.image_size is not None:
            image = resize_square(image, self.image_size)
        return (image, *out[1:])

    def describe(self, index: int) -> str:
        """The file (and row) sample ``index`` comes from; subclasses refine it."""
        return f"{self.source}[{index}]"

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        if self.on_error == "raise":
            return self.sample(index)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                return self.sample(i)
            except DataError as e:
                self._skips.increment()
                log.warning("skipping sample %d: %s", i, e)
        raise DataError(f"{self.source}: none of the {n} samples could be read")

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-band mean the engine normalises batches with (images scaled to [0, 1])."""
        if self._mean is None:
            self._fill_stats()
        assert self._mean is not None
        return self._mean

    @property
    def std(self) -> tuple[float, ...]:
        if self._std is None:
            self._fill_stats()
        assert self._std is not None
        return self._std

    def set_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != self.in_chans or len(std) != self.in_chans:
            raise ConfigError(f"{self.source}: mean/std have {len(mean)}/{len(std)} values; expected {self.in_chans}")
        self._mean, self._std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def _fill_stats(self) -> None:
        """Default statistics: ImageNet for RGB, otherwise estimated from up to STATS_SAMPLES samples."""
        if self.in_chans == 3:
            self.set_stats(IMAGENET_MEAN, IMAGENET_STD)
            return

        stats = compute_stats(self, max_samples=STATS_SAMPLES)
        self.set_stats(stats["mean"], stats["std"])


def located(where: str, path: object, error: DataError) -> DataError:
    """Prefix a decoder error (which names the file) with the CSV row it came from, naming the file once."""
    row = where.removesuffix(f" ({path})")
    return error if row == str(path) else DataError(f"{row}: {error}")
