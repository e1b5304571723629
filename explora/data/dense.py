"""Dense (per-pixel) datasets: image + class-mask pairs for semantic segmentation, in the one spec syntax.

Specs::

    seg_folder:/data/water:classes=2                 images/ and masks/ side by side, paired by file stem
    seg_folder:/data/landcover:class_map=/data/landcover/classes.json     RGB palette masks
    seg_csv:/data/pairs.csv:classes=6                columns image,mask (paths relative to the CSV's folder)
    spacenet:/data/AOI_2_Vegas_Train                  GeoTIFF chips + GeoJSON building footprints

A sample is ``(image (C, H, W) uint8|float32, mask (H, W) int64)``; mask value :data:`IGNORE_INDEX` (255) marks
pixels no loss or metric counts. Images decode with :func:`explora.data.io.read_image` (PNG, JPEG, GeoTIFF);
masks are class indices (single-band PNG/TIFF, palette PNGs give their indices) or, with a class map, RGB colours
mapped to classes (colours not in the map become :data:`IGNORE_INDEX`).

A class map is a JSON file ``{"names": ["background", "water"], "palette": [[0, 0, 0], [0, 0, 255]]}`` (palette
optional: without it masks are indices); ``classes=K`` alone names the classes ``0..K-1``. A ``class_map.json``
in the dataset's root is read when neither is given.

SpaceNet (Van Etten et al., 2018, the paper's building-segmentation setting): chips ``*.tif`` under ``images=``
(default ``RGB-PanSharpen``), footprints ``*.geojson`` under ``labels=`` (default ``geojson/buildings``), paired by
the ``img<N>`` token of their names. The GeoJSON polygons (in the chip's CRS, lon/lat for SpaceNet) are mapped to
pixels with the chip's GeoTIFF ``ModelTiepointTag`` + ``ModelPixelScaleTag`` (or ``ModelTransformationTag``),
read by tifffile, and rasterised by :func:`rasterize_polygons` (even-odd rule, a pixel is inside when its centre
is): classes ``background`` (0) and ``building`` (1). No GDAL/rasterio needed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError

from explora.core.errors import ConfigError, DataError
from explora.data.base import ExploraDataset, located
from explora.data.io import DEFAULT_INT_SCALE, IMAGE_SUFFIXES, is_tiff, read_image, read_tiff_array, tiff_shape
from explora.data.lists import read_csv

IGNORE_INDEX = 255
MASK_COLUMNS = ("mask", "mask_path", "label_path", "target_path", "annotation")
IMAGE_COLUMNS = ("image", "image_path", "path", "file")
_TIEPOINT, _PIXEL_SCALE, _TRANSFORM = 33922, 33550, 34264  # GeoTIFF tag codes (GeoTIFF spec 1.0, sec. 2.6)


# --- masks -------------------------------------------------------------------------------------------------------
def load_class_map(path: Path) -> tuple[list[str], np.ndarray | None]:
    """``(names, palette (K, 3) uint8 or None)`` from a class-map JSON file; errors name the file and field."""
    try:
        spec = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: class map not found") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable class map ({e}); expected JSON with 'names' (and 'palette')") from e
    names = spec.get("names") if isinstance(spec, dict) else None
    if not isinstance(names, list) or len(names) < 2:
        raise ConfigError(f"{path}: field 'names' must list at least 2 class names")
    palette = spec.get("palette")
    if palette is None:
        return [str(n) for n in names], None
    arr = np.asarray(palette)
    if arr.shape != (len(names), 3) or arr.min() < 0 or arr.max() > 255:
        raise ConfigError(f"{path}: field 'palette' must be {len(names)} [r, g, b] triples in 0..255 (one per name), "
                          f"got shape {arr.shape}")
    return [str(n) for n in names], arr.astype(np.uint8)


def palette_to_index(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 colours -> (H, W) int64 class indices; colours not in ``palette`` (K, 3) -> IGNORE_INDEX."""
    code = (rgb[0].astype(np.int64) << 16) | (rgb[1].astype(np.int64) << 8) | rgb[2].astype(np.int64)  # (H, W)
    keys = (palette[:, 0].astype(np.int64) << 16) | (palette[:, 1].astype(np.int64) << 8) | palette[:, 2]
    order = np.argsort(keys)
    pos = np.searchsorted(keys[order], code).clip(0, len(keys) - 1)
    hit = keys[order][pos] == code
    return np.where(hit, order[pos], IGNORE_INDEX).astype(np.int64)


def read_mask(path: Path, palette: np.ndarray | None = None) -> torch.Tensor:
    """Decode a mask file into ``(H, W)`` int64: class indices, or RGB colours through ``palette``."""
    if is_tiff(path):
        arr = read_tiff_array(path)  # (C, H, W)
        if palette is not None and arr.shape[0] >= 3:
            return torch.from_numpy(palette_to_index(arr[:3].astype(np.uint8), palette))
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{path}: mask has dtype {arr.dtype}; expected integer class indices")
        return torch.from_numpy(arr[0].astype(np.int64))
    try:
        with Image.open(path) as im:
            im.load()
            if palette is not None:
                arr = np.asarray(im.convert("RGB")).transpose(2, 0, 1)  # (3, H, W)
                return torch.from_numpy(palette_to_index(arr, palette))
            if im.mode in ("RGB", "RGBA"):
                raise DataError(f"{path}: mask is an {im.mode} image; give a class map with a 'palette' "
                                "(class_map=FILE.json) or store masks as single-band class indices")
            arr = np.asarray(im if im.mode in ("P", "L", "I", "I;16") else im.convert("L"))
    except FileNotFoundError as e:
        raise DataError(f"{path}: mask file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated mask ({type(e).__name__}: {e})") from e
    return torch.from_numpy(np.ascontiguousarray(arr).astype(np.int64))


def resize_pair(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shorter side to ``size`` then centre crop, as :func:`explora.data.base.resize_square`, with the mask
    resampled nearest-neighbour on the same grid."""
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image, mask
    m = mask[None]
    if min(h, w) != size:
        image = TF.resize(image, [size], antialias=True)
        # float32 holds every class index exactly; nearest-neighbour only copies values
        m = TF.resize(m.float(), [size], interpolation=TF.InterpolationMode.NEAREST_EXACT).to(torch.int64)
    return TF.center_crop(image, [size, size]), TF.center_crop(m, [size, size])[0]


def check_pair(image: torch.Tensor, mask: torch.Tensor, num_classes: int, image_where: str,
               mask_where: str) -> torch.Tensor:
    """``mask`` as (H, W) int64 after checking it matches ``image``'s size and holds labels in ``0..K-1`` or
    IGNORE_INDEX; errors name the image and the mask."""
    mask = mask.reshape(mask.shape[-2:]) if mask.ndim == 3 and mask.shape[0] == 1 else mask
    if mask.ndim != 2 or tuple(mask.shape) != tuple(image.shape[-2:]):
        raise DataError(f"{image_where}: image is {tuple(image.shape[-2:])} pixels but its mask {mask_where} is "
                        f"{tuple(mask.shape)}; expected the same height and width")
    mask = mask.long()
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX) | (mask < 0)
    if bad.any():
        raise DataError(f"{mask_where}: label {int(mask[bad][0])} outside the class range 0..{num_classes - 1} "
                        f"(or {IGNORE_INDEX} = ignore); {int(bad.sum())} pixel(s)")
    return mask


# --- datasets ----------------------------------------------------------------------------------------------------
class DenseDataset(ExploraDataset):
    """Pairs ``(image path, mask path)``; ``load`` returns ``(image (C, H, W), mask (H, W) int64)`` checked for
    matching size and labels in ``0..K-1`` or IGNORE_INDEX, each error naming both files."""

    dense = True
    ignore_index = IGNORE_INDEX

    def __init__(self, pairs: Sequence[tuple[Path, Path]], classes: Sequence[str], *, source: str,
                 palette: np.ndarray | None = None, image_size: int | None = None, on_error: str = "raise",
                 int_scale: float = DEFAULT_INT_SCALE, in_chans: int | None = None) -> None:
        super().__init__(image_size=image_size, on_error=on_error)
        self.pairs = list(pairs)
        self.classes = list(classes)
        self.palette = palette
        self.source = source
        self.int_scale = float(int_scale)
        self._require_nonempty("image/mask pairs")
        self.in_chans = int(in_chans) if in_chans else read_image(self.pairs[0][0], self.int_scale).shape[0]

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self, index: int) -> str:
        image, mask = self.pairs[index]
        return f"{image} (mask {mask})"

    def read_mask(self, index: int) -> torch.Tensor:
        return read_mask(self.pairs[index][1], self.palette)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path, self.int_scale)
        return image, check_pair(image, self.read_mask(index), len(self.classes), str(image_path), str(mask_path))

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        self._check_bands(image, self.describe(index))
        if self.image_size is not None:
            image, mask = resize_pair(image, mask, self.image_size)
        return image, mask


def resolve_classes(root: Path, classes: Any = None, class_map: str | None = None
                    ) -> tuple[list[str], np.ndarray | None]:
    """Class names (and palette) from ``class_map=FILE``, ``classes=K`` or ``ROOT/class_map.json``."""
    if class_map:
        path = Path(class_map).expanduser()
        return load_class_map(path if path.is_absolute() else root / path)
    if classes is not None:
        try:
            k = int(classes)
        except (TypeError, ValueError):
            raise ConfigError(f"{root}: option classes={classes!r}; expected the number of classes") from None
        if k < 2:
            raise ConfigError(f"{root}: option classes={k}; expected at least 2 classes")
        return [str(i) for i in range(k)], None
    if (root / "class_map.json").is_file():
        return load_class_map(root / "class_map.json")
    raise ConfigError(f"{root}: the number of classes is unknown; add classes=K or class_map=FILE.json to the spec "
                      "(or put a class_map.json in the dataset root)")


def _files(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}


class SegFolder(DenseDataset):
    """``seg_folder:ROOT``: ``ROOT/images/NAME.ext`` paired with ``ROOT/masks/NAME.ext`` (any image suffix)."""

    def __init__(self, root: str | Path, *, classes: Any = None, class_map: str | None = None,
                 images: str = "images", masks: str = "masks", **kw: Any) -> None:
        root = Path(root)
        for sub in (images, masks):
            if not (root / sub).is_dir():
                raise DataError(f"{root / sub}: folder not found; expected {root}/{images}/ and {root}/{masks}/")
        names, palette = resolve_classes(root, classes, class_map)
        image_files, mask_files = _files(root / images), _files(root / masks)
        pairs, missing = [], []
        for stem, path in image_files.items():
            if stem in mask_files:
                pairs.append((path, mask_files[stem]))
            else:
                missing.append(path)
        if not pairs:
            raise DataError(f"{root}: no image/mask pairs (images in {root / images}: {len(image_files)}, masks in "
                            f"{root / masks}: {len(mask_files)}); expected files with the same name in both")
        super().__init__(pairs, names, source=str(root), palette=palette, **kw)
        for path in missing:
            self._index_problem(f"{path}: missing mask; expected {root / masks}/{path.stem}.<ext>")


class SegCsv(DenseDataset):
    """``seg_csv:FILE.csv``: one pair per row, columns ``image`` and ``mask`` (header names; else columns 0, 1)."""

    def __init__(self, path: str | Path, *, classes: Any = None, class_map: str | None = None,
                 root: str | None = None, **kw: Any) -> None:
        path = Path(path)
        header, rows = read_csv(path)
        base = Path(root) if root else path.parent
        names, palette = resolve_classes(base, classes, class_map)
        ci = next((header.index(c) for c in IMAGE_COLUMNS if header and c in header), 0)
        cm = next((header.index(c) for c in MASK_COLUMNS if header and c in header), 1)
        pairs, problems = [], []
        for row, cells in rows:
            if len(cells) <= max(ci, cm) or not cells[ci] or not cells[cm]:
                problems.append(f"{path}, row {row}: expected an image path and a mask path, got {cells}")
                continue
            pairs.append(tuple(p if p.is_absolute() else base / p for p in (Path(cells[ci]), Path(cells[cm]))))
        if not pairs:
            raise DataError(f"{path}: no image/mask rows; expected columns image,mask")
        super().__init__(pairs, names, source=str(path), palette=palette, **kw)
        for message in problems:
            self._index_problem(message)

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return super().sample(index)
        except DataError as e:
            raise located(f"{self.source}, pair {index + 1}", self.pairs[index][0], e) from e


# --- SpaceNet ----------------------------------------------------------------------------------------------------
def geotiff_transform(path: Path) -> tuple[float, float, float, float, float, float]:
    """The affine pixel -> world map ``(a, b, c, d, e, f)``: ``x = a*col + b*row + c``, ``y = d*col + e*row + f``
    (col/row in pixel units from the raster's top-left corner), from the GeoTIFF tags."""
    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            if _TRANSFORM in tags:
                m = [float(v) for v in tags[_TRANSFORM].value]
                return m[0], m[1], m[3], m[4], m[5], m[7]
            if _TIEPOINT in tags and _PIXEL_SCALE in tags:
                tp = [float(v) for v in tags[_TIEPOINT].value]
                sx, sy = (float(v) for v in tags[_PIXEL_SCALE].value[:2])
                i, j, x, y = tp[0], tp[1], tp[3], tp[4]
                return sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except Exception as e:
        raise DataError(f"{path}: unreadable GeoTIFF tags ({type(e).__name__}: {e})") from e
    raise DataError(f"{path}: no georeferencing (ModelTiepointTag + ModelPixelScaleTag or ModelTransformationTag); "
                    "expected a georeferenced GeoTIFF chip")


def world_to_pixel(xy: np.ndarray, transform: Sequence[float]) -> np.ndarray:
    """(N, 2) world coordinates -> (N, 2) (col, row) pixel coordinates under the inverse of ``transform``."""
    a, b, c, d, e, f = transform
    det = a * e - b * d
    x, y = xy[:, 0] - c, xy[:, 1] - f
    return np.stack([(e * x - b * y) / det, (-d * x + a * y) / det], axis=1)


def rasterize_polygons(rings: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """(H, W) bool: even-odd fill of ``rings`` (each (N, 2) (col, row) pixel coordinates, closed or not).

    Scanline at each row's pixel centre ``row + 0.5``: edge crossings (half-open in y, so a vertex is counted once)
    sorted along x; pixel ``col`` is inside when its centre ``col + 0.5`` lies between an odd crossing and the next.
    Holes are simply more rings (the even-odd rule subtracts them), as are the parts of a MultiPolygon.
    """
    out = np.zeros((height, width), dtype=bool)
    edges = []
    for ring in rings:
        r = np.asarray(ring, dtype=np.float64)[:, :2]
        if len(r) < 3:
            continue
        edges.append(np.concatenate([r, np.roll(r, -1, axis=0)], axis=1))  # (N, 4) x0 y0 x1 y1
    if not edges:
        return out
    e = np.concatenate(edges)
    e = e[e[:, 1] != e[:, 3]]  # horizontal edges never cross a scanline
    centres = np.arange(width) + 0.5
    for row in range(height):
        yc = row + 0.5
        y0, y1 = e[:, 1], e[:, 3]
        hit = (np.minimum(y0, y1) <= yc) & (yc < np.maximum(y0, y1))
        if not hit.any():
            continue
        h = e[hit]
        xs = np.sort(h[:, 0] + (yc - h[:, 1]) * (h[:, 2] - h[:, 0]) / (h[:, 3] - h[:, 1]))
        inside = (np.searchsorted(xs, centres, side="right") % 2) == 1
        out[row] = inside
    return out


def geojson_rings(path: Path) -> list[np.ndarray]:
    """Every ring (outer and holes) of the Polygon / MultiPolygon features of a GeoJSON file, as (N, 2) arrays."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise DataError(f"{path}: footprint file not found") from e
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable GeoJSON ({e})") from e
    features = data.get("features") if isinstance(data, dict) else None
    if features is None:
        raise DataError(f"{path}: GeoJSON has no 'features'; expected a FeatureCollection of building polygons")
    rings = []
    for i, feature in enumerate(features):
        geom = (feature or {}).get("geometry") or {}
        kind, coords = geom.get("type"), geom.get("coordinates")
        if kind is None:
            continue
        try:
            polys = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else []
            rings.extend(np.asarray(ring, dtype=np.float64)[:, :2] for poly in polys for ring in poly)
        except (TypeError, ValueError, IndexError) as e:
            raise DataError(f"{path}: feature {i} has malformed {kind} coordinates ({e})") from e
    return rings


_IMG_TOKEN = re.compile(r"img\d+", re.IGNORECASE)


class SpaceNet(DenseDataset):
    """``spacenet:ROOT[:images=RGB-PanSharpen,labels=geojson/buildings]``: building footprints rasterised on each
    GeoTIFF chip's pixel grid; classes background / building."""

    def __init__(self, root: str | Path, *, images: str = "RGB-PanSharpen", labels: str = "geojson/buildings",
                 **kw: Any) -> None:
        root = Path(root)
        for sub in (images, labels):
            if not (root / sub).is_dir():
                raise DataError(f"{root / sub}: folder not found; expected SpaceNet chips in {root}/{images}/ and "
                                f"footprints in {root}/{labels}/")
        chips = {m.group(0).lower(): p for p in sorted((root / images).glob("*.tif*"))
                 if (m := _IMG_TOKEN.search(p.name))}
        footprints = {m.group(0).lower(): p for p in sorted((root / labels).glob("*.geojson"))
                      if (m := _IMG_TOKEN.search(p.name))}
        pairs = [(chips[k], footprints[k]) for k in chips if k in footprints]
        if not pairs:
            raise DataError(f"{root}: no chip/footprint pairs ({len(chips)} chips, {len(footprints)} GeoJSON files); "
                            "expected names sharing an img<N> token")
        super().__init__(pairs, ["background", "building"], source=str(root), **kw)
        for key, chip in chips.items():
            if key not in footprints:
                self._index_problem(f"{chip}: missing footprint file; expected {root / labels}/*{key}.geojson")

    def read_mask(self, index: int) -> torch.Tensor:
        chip, footprint = self.pairs[index]
        _, h, w = tiff_shape(chip)
        transform = geotiff_transform(chip)
        rings = [world_to_pixel(r, transform) for r in geojson_rings(footprint)]
        return torch.from_numpy(rasterize_polygons(rings, int(h), int(w)).astype(np.int64))


def is_dense(dataset: object) -> bool:
    """Whether ``dataset`` yields ``(image, mask)`` pairs (a :class:`DenseDataset` or anything marked ``dense``)."""
    return bool(getattr(dataset, "dense", False))


__all__ = ["IGNORE_INDEX", "DenseDataset", "SegCsv", "SegFolder", "SpaceNet", "check_pair", "geojson_rings",
           "geotiff_transform", "is_dense", "load_class_map", "palette_to_index", "rasterize_polygons", "read_mask",
           "resize_pair", "world_to_pixel"]
