"""Reduced-size JPEG decoding: a JPEG that is resized to ``image_size`` next is decoded at the smallest DCT scale
whose shorter side is still at least ``image_size`` (Pillow ``Image.draft``)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from explora.data.base import resize_square
from explora.data.io import read_image, read_rgb
from explora.data.lists import CsvDataset


def _photo(path, w: int = 640, h: int = 480, fmt: str = "JPEG") -> None:
    """A smooth colour pattern with some texture (a JPEG's DCT scaling is exact only for smooth content)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(0)
    img = np.stack([128 + 100 * np.sin(x / 37 + c) * np.cos(y / 23 - c) for c in range(3)], -1)
    img += rng.normal(0, 4, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, fmt, quality=92)


def test_jpeg_decodes_at_the_smallest_scale_that_keeps_min_side(tmp_path):
    p = tmp_path / "a.jpg"
    _photo(p)
    assert read_rgb(p).shape == (3, 480, 640)
    assert read_rgb(p, min_side=100).shape == (3, 120, 160)  # 1/4: 120 >= 100, 1/8 would give 60
    assert read_rgb(p, min_side=240).shape == (3, 240, 320)  # exactly 1/2
    assert read_rgb(p, min_side=241).shape == (3, 480, 640)  # 1/2 would be too small
    assert read_rgb(p, min_side=1000).shape == (3, 480, 640)  # never upsampled
    assert read_image(p, min_side=60).shape == (3, 60, 80)  # 1/8


def test_reduced_decode_then_resize_matches_the_full_decode(tmp_path):
    p = tmp_path / "a.jpg"
    _photo(p)
    for size in (64, 100, 200):
        full = resize_square(read_rgb(p), size).float()
        fast = resize_square(read_rgb(p, min_side=size), size).float()
        assert fast.shape == full.shape == (3, size, size)
        assert (fast - full).abs().mean() < 3.0  # uint8 levels: the DCT downscale is a slightly different filter


def test_other_formats_decode_in_full(tmp_path):
    p = tmp_path / "a.png"
    _photo(p, fmt="PNG")
    assert read_rgb(p, min_side=60).shape == (3, 480, 640)


def test_dataset_with_image_size_uses_the_reduced_decode(tmp_path):
    for i in range(2):
        _photo(tmp_path / f"{i}.jpg", 512 + 64 * i, 384)
    (tmp_path / "list.csv").write_text("path,label\n0.jpg,0\n1.jpg,1\n")
    ds = CsvDataset(tmp_path / "list.csv", image_size=96)
    for i in range(2):
        image, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 96, 96) and label == i
        assert torch.equal(image, resize_square(read_rgb(tmp_path / f"{i}.jpg", min_side=96), 96))
    native = CsvDataset(tmp_path / "list.csv")  # no image_size: native size, full decode
    assert native[1][0].shape == (3, 384, 576)
