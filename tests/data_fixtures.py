"""Code that writes tiny datasets in each upstream layout into a folder (tests call it with ``tmp_path``)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from explora.data.fmow import CATEGORIES


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def write_jpg(path: Path, size: tuple[int, int] = (40, 48), seed: int = 0, fmt: str = "JPEG") -> np.ndarray:
    """A random RGB image of (H, W) = size; returns the HWC array written (png round-trips exactly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def write_tif(path: Path, bands: int = 13, size: tuple[int, int] = (24, 24), seed: int = 0,
              dtype: type = np.uint16, planar: bool = False) -> np.ndarray:
    """A random GeoTIFF-like chip, pixel-interleaved (H, W, C) unless ``planar``; returns the HWC array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    high = 4000 if dtype != np.uint8 else 256
    arr = rng(seed).integers(0, high, (*size, bands)).astype(dtype)
    if planar:
        tifffile.imwrite(path, arr.transpose(2, 0, 1), photometric="minisblack", planarconfig="separate")
    else:
        tifffile.imwrite(path, arr, photometric="minisblack", planarconfig="contig")
    return arr


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def fmow_rgb(root: Path, n: int = 6) -> Path:
    """ExPLoRA linprobe CSV: header, column 0 label (index), column 1 image path (relative)."""
    lines = ["label,image_path"]
    for i in range(n):
        rel = f"train/{CATEGORIES[i]}/{CATEGORIES[i]}_{i}/{CATEGORIES[i]}_{i}_0_rgb.jpg"
        write_jpg(root / rel, seed=i)
        lines.append(f"{i},{rel}")
    csv = root / "train_62classes.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def fmow_sentinel(root: Path, n: int = 4) -> Path:
    """SatMAE fMoW-Sentinel CSV (category, location_id, image_id, timestamp, image_path) + 13-band tifs."""
    lines = ["category,location_id,image_id,timestamp,image_path"]
    for i in range(n):
        c = CATEGORIES[i * 3]
        rel = f"fmow-sentinel/train/{c}/{c}_{i}/{c}_{i}_0.tif"
        write_tif(root / rel, bands=13, seed=i, dtype=np.uint16 if i % 2 else np.float32)
        lines.append(f"{c},{i},0,201{i}-0{i + 1}-1{i}T0{i}:00:00Z,{rel}")
    csv = root / "train.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def fmow_temporal(root: Path) -> Path:
    """Two locations: one with 3 frames (out of time order in the CSV), one with 2 frames."""
    rows = [("airport", "7", "2016-05-01T10:00:00Z"), ("airport", "7", "2014-02-01T09:00:00Z"),
            ("zoo", "3", "2017-08-03T14:00:00Z"), ("airport", "7", "2015-03-01T11:00:00Z"),
            ("zoo", "3", "2018-09-04T15:00:00Z")]
    lines = ["category,location_id,image_id,timestamp,image_path"]
    for i, (c, loc, ts) in enumerate(rows):
        rel = f"{c}/{c}_{loc}/{c}_{loc}_{i}_rgb.png"
        write_jpg(root / rel, size=(16, 16), seed=i, fmt="PNG")
        lines.append(f"{c},{loc},{i},{ts},{rel}")
    csv = root / "temporal.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3,
                 suffix: str = ".png") -> Path:
    for c_i, c in enumerate(classes):
        for j in range(per_class):
            if suffix == ".tif":
                write_tif(root / c / f"{c}_{j + 1}.tif", bands=13, size=(16, 16), seed=10 * c_i + j)
            else:
                write_jpg(root / c / f"{c}_{j + 1}{suffix}", size=(16, 20), seed=10 * c_i + j,
                          fmt="PNG" if suffix == ".png" else "JPEG")
    return root


def idx_files(root: Path, n: int = 12, prefix: str = "train", gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-style IDX pair written with numpy: magic 0x803 images (N, 28, 28), 0x801 labels (N,)."""
    root.mkdir(parents=True, exist_ok=True)
    images = rng(1).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    img_bytes = np.array([0x803, n, 28, 28], dtype=">u4").tobytes() + images.tobytes()
    lab_bytes = np.array([0x801, n], dtype=">u4").tobytes() + labels.tobytes()
    for name, data in ((f"{prefix}-images-idx3-ubyte", img_bytes), (f"{prefix}-labels-idx1-ubyte", lab_bytes)):
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return images, labels


def seg_folder(root: Path, n: int = 4, size: tuple[int, int] = (32, 32), classes: int = 3) -> Path:
    """``root/images/*.png`` + ``root/masks/*.png`` (single-band class indices: a vertical band per class)."""
    for i in range(n):
        write_jpg(root / "images" / f"chip{i}.png", size=size, seed=i, fmt="PNG")
        mask = (np.arange(size[1])[None, :] * classes // size[1] + i).repeat(size[0], 0) % classes
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8), mode="L").save(root / "masks" / f"chip{i}.png")
    return root


def geotiff_chip(path: Path, origin: tuple[float, float], pixel: float, size: tuple[int, int] = (32, 32),
                 bands: int = 3, seed: int = 0) -> np.ndarray:
    """A uint8 GeoTIFF with ModelPixelScaleTag + ModelTiepointTag: pixel (0, 0)'s corner at world ``origin``
    (x, y), square pixels of ``pixel`` world units, y growing north (rows go south)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng(seed).integers(0, 256, (*size, bands)).astype(np.uint8)
    tags = [(33550, "d", 3, (pixel, pixel, 0.0)), (33922, "d", 6, (0.0, 0.0, 0.0, origin[0], origin[1], 0.0))]
    tifffile.imwrite(path, arr, photometric="rgb" if bands == 3 else "minisblack", extratags=tags)
    return arr


def spacenet(root: Path, n: int = 2, pixel: float = 1e-5, origin: tuple[float, float] = (-115.3, 36.2)) -> Path:
    """SpaceNet layout: ``RGB-PanSharpen/RGB-PanSharpen_AOI_2_Vegas_img<i>.tif`` and
    ``geojson/buildings/buildings_AOI_2_Vegas_img<i>.geojson`` with one square building covering pixel rows
    4..11 and columns 8..19 (in lon/lat, through the chip's tags)."""
    import json

    for i in range(1, n + 1):
        geotiff_chip(root / "RGB-PanSharpen" / f"RGB-PanSharpen_AOI_2_Vegas_img{i}.tif", origin, pixel, seed=i)
        x0, y0 = origin
        ring = [[x0 + c * pixel, y0 - r * pixel] for c, r in ((8, 4), (20, 4), (20, 12), (8, 12), (8, 4))]
        feature = {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}
        fc = {"type": "FeatureCollection", "features": [feature]}
        out = root / "geojson" / "buildings" / f"buildings_AOI_2_Vegas_img{i}.geojson"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(fc))
    return root
