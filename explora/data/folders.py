"""Folder layouts: ImageFolder, EuroSAT (RGB jpg and 13-band tif), RESISC-45, and unlabeled folders of images or
GeoTIFF chips (large scenes tiled on the fly)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from explora.core.errors import DataError
from explora.data.base import ExploraDataset
from explora.data.io import (
    DEFAULT_INT_SCALE,
    IMAGE_SUFFIXES,
    array_to_tensor,
    image_shape,
    is_tiff,
    read_image,
    read_rgb,
    read_tiff_array,
)
from explora.data.lists import CsvDataset, ImageListDataset

EUROSAT_CLASSES = [
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
    "Residential", "River", "SeaLake",
]  # fmt: skip
RESISC45_CLASSES = [
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral", "church",
    "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest", "freeway",
    "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection", "island", "lake", "meadow",
    "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot", "railway",
    "railway_station", "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship", "snowberg",
    "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace", "thermal_power_station", "wetland",
]  # fmt: skip
assert len(RESISC45_CLASSES) == 45


def list_images(root: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``root`` in sorted (deterministic) order; hidden files are ignored."""
    if not root.is_dir():
        raise DataError(f"{root}: folder not found; expected a directory of images")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern)
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def class_folder_items(root: Path, classes: Sequence[str] | None = None) -> tuple[list, list[str]]:
    """torchvision ImageFolder semantics: one sub-folder per class (sorted names), images below it."""
    if not root.is_dir():
        raise DataError(f"{root}: folder not found; expected one sub-folder per class")
    if classes is None:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items = [(p, label, str(p)) for label, c in enumerate(classes) if (root / c).is_dir()
             for p in list_images(root / c)]
    if not items:
        raise DataError(f"{root}: no images in class sub-folders; expected <class>/<image> files "
                        f"with suffixes {', '.join(IMAGE_SUFFIXES)}")
    return items, list(classes)


class ImageFolderDataset(ImageListDataset):
    """``imagefolder:/path`` — torchvision's ImageFolder layout (class = sub-folder name, sorted)."""

    def __init__(self, root: str | Path, *, image_size: int | None = None, on_error: str = "raise",
                 int_scale: float = DEFAULT_INT_SCALE) -> None:
        items, classes = class_folder_items(Path(root))
        super().__init__(items, classes, source=str(root), image_size=image_size, on_error=on_error,
                         int_scale=int_scale)


def _find_class_root(root: Path, classes: Sequence[str]) -> Path:
    """The folder holding the class sub-folders, searched below ``root`` (archives nest them differently)."""
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    for d in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if (d / classes[0]).is_dir() and (d / classes[-1]).is_dir():
            return d
    raise DataError(f"{root}: no folder with class sub-folders {classes[0]}/ ... {classes[-1]}/ found")


def _split_filter(items: list, root: Path, pattern: str, split: str) -> list:
    """Keep items whose file name is listed in torchgeo's split file ``pattern.format(split)``, if one exists."""
    for d in (root, *root.parents[:1]):
        f = d / pattern.format(split)
        if f.is_file():
            names = {Path(line.strip()).stem for line in f.read_text().splitlines() if line.strip()}
            return [it for it in items if it[0].stem in names]
    return items


class EuroSAT(ImageListDataset):
    """``eurosat:/dir`` — EuroSAT (Helber et al. 2019): 10 classes, RGB jpgs (``EuroSAT_RGB``, 64x64) or 13-band
    Sentinel-2 tifs (``EuroSAT_MS``/``ds/.../tif``). The class folders are found anywhere below ``dir``;
    ``bands='rgb'|'ms'`` chooses when both are present (default: ms if tifs exist). torchgeo's split files
    ``eurosat-{split}.txt`` next to the data restrict to a split; without them every image is used.
    """

    def __init__(self, root: str | Path, *, split: str = "train", bands: str | None = None,
                 image_size: int | None = None, on_error: str = "raise",
                 int_scale: float = DEFAULT_INT_SCALE) -> None:
        root = Path(root)
        class_root = _find_class_root(root, EUROSAT_CLASSES)
        items, classes = class_folder_items(class_root, EUROSAT_CLASSES)
        has_tif = any(is_tiff(p) for p, _, _ in items)
        bands = bands or ("ms" if has_tif else "rgb")
        items = [it for it in items if is_tiff(it[0]) == (bands == "ms")]
        items = _split_filter(items, root, "eurosat-{}.txt", split)
        super().__init__(items, classes, source=str(root), in_chans=13 if bands == "ms" else 3,
                         image_size=image_size, on_error=on_error, int_scale=int_scale)


class RESISC45(ImageListDataset):
    """``resisc45:/dir`` (NWPU-RESISC45 folder, 45 classes, 256x256 jpgs; torchgeo split files
    ``resisc45-{split}.txt`` honoured) or ``resisc45:/file.csv`` (the upstream CSV layout, as fMoW)."""

    def __init__(self, root: str | Path, *, split: str = "train", image_size: int | None = None,
                 on_error: str = "raise") -> None:
        root = Path(root)
        if root.suffix.lower() == ".csv":
            ds = CsvDataset(root, classes=RESISC45_CLASSES, upstream=True, image_size=image_size,
                            on_error=on_error, in_chans=3)
            items, problems, skips = ds.items, ds.problems, ds._skips
        else:
            items, _ = class_folder_items(_find_class_root(root, RESISC45_CLASSES), RESISC45_CLASSES)
            items, problems, skips = _split_filter(items, root, "resisc45-{}.txt", split), [], None
        super().__init__(items, RESISC45_CLASSES, source=str(root), in_chans=3, image_size=image_size,
                         on_error=on_error)
        self.problems = problems
        self._skips = skips or self._skips


class UnlabeledFolder(ExploraDataset):
    """``folder:/path[:chip=64,stride=32]`` — every image/GeoTIFF below ``path`` (recursive), label -1.

    With ``chip`` set, each file is tiled into ``chip x chip`` windows at ``stride`` (default: chip), row-major,
    windows that would cross the border dropped (as ``torch.Tensor.unfold``); only headers are read while
    indexing, and each worker keeps the last decoded scene so consecutive chips of a scene decode it once.
    All files must have the band count of the first one; files smaller than a chip are index problems.
    """

    def __init__(self, root: str | Path, *, chip: int | None = None, stride: int | None = None,
                 image_size: int | None = None, on_error: str = "raise",
                 int_scale: float = DEFAULT_INT_SCALE) -> None:
        super().__init__(image_size=image_size, on_error=on_error)
        root = Path(root)
        self.source = str(root)
        self.int_scale = int_scale
        self.chip, self.stride = chip, (stride or chip)
        if chip is not None and (chip <= 0 or self.stride <= 0):
            raise DataError(f"folder {root}: chip={chip}, stride={stride}; expected positive integers")
        files = [root] if root.is_file() else list_images(root)
        self.windows: list[tuple[Path, int, int]] = []  # (file, top, left); top = -1 means the whole file
        for f in files:
            if chip is None:
                self.windows.append((f, -1, -1))
                continue
            try:
                _, h, w = image_shape(f)
            except DataError as e:
                self._index_problem(str(e))
                continue
            if h < chip or w < chip:
                self._index_problem(f"{f}: image is {h}x{w}; expected at least one {chip}x{chip} chip")
                continue
            self.windows += [(f, y, x) for y in range(0, h - chip + 1, self.stride)
                             for x in range(0, w - chip + 1, self.stride)]
        self._require_nonempty(f"image files ({', '.join(IMAGE_SUFFIXES)})")
        self.in_chans = self._probe_bands()
        self._cache: tuple[Path, torch.Tensor] | None = None

    def _probe_bands(self) -> int:
        for f, _, _ in self.windows:
            try:
                return image_shape(f)[0]
            except DataError:
                if self.on_error == "raise":
                    raise
        raise DataError(f"{self.source}: none of the files could be read")

    def __len__(self) -> int:
        return len(self.windows)

    def describe(self, index: int) -> str:
        f, y, x = self.windows[index]
        return str(f) if y < 0 else f"{f} chip at (y={y}, x={x})"

    def _decode(self, f: Path) -> torch.Tensor:
        if self._cache is not None and self._cache[0] == f:
            return self._cache[1]
        image = array_to_tensor(read_tiff_array(f), self.int_scale) if is_tiff(f) else read_rgb(f)
        self._cache = (f, image)
        return image

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        f, y, x = self.windows[index]
        image = self._decode(f) if y >= 0 else read_image(f, self.int_scale, min_side=self.image_size)
        if y >= 0:
            image = image[:, y:y + self.chip, x:x + self.chip].clone()  # (C, chip, chip), own storage
            if image.shape[-2:] != (self.chip, self.chip):
                raise DataError(f"{self.describe(index)}: decoded image smaller than its header said")
        return image, -1

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # never ship a decoded scene to workers
        return state


__all__ = ["EUROSAT_CLASSES", "RESISC45_CLASSES", "EuroSAT", "ImageFolderDataset", "RESISC45", "UnlabeledFolder",
           "list_images", "np"]
