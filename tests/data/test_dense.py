"""Dense datasets (seg_folder, seg_csv, spacenet), the polygon rasteriser and paired augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_fixtures import geotiff_chip, seg_folder, spacenet
from PIL import Image

from explora.core.errors import ConfigError, DataError
from explora.data import build_dataset
from explora.data.dense import (
    IGNORE_INDEX,
    geotiff_transform,
    rasterize_polygons,
    world_to_pixel,
)
from explora.data.dense_augment import DenseAugConfig, augment_pair


def test_seg_folder_pairs_and_masks(tmp_path):
    seg_folder(tmp_path, n=3, classes=3)
    ds = build_dataset(f"seg_folder:{tmp_path}:classes=3")
    assert len(ds) == 3 and ds.num_classes == 3 and ds.in_chans == 3
    image, mask = ds[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert mask.shape == (32, 32) and mask.dtype == torch.int64
    expected = (np.arange(32) * 3 // 32 + 1) % 3
    assert torch.equal(mask[5], torch.from_numpy(expected))


def test_seg_folder_resize_keeps_labels(tmp_path):
    seg_folder(tmp_path, n=1, size=(32, 48), classes=3)
    image, mask = build_dataset(f"seg_folder:{tmp_path}:classes=3", image_size=16)[0]
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16)
    assert set(mask.unique().tolist()) <= {0, 1, 2}


def test_palette_class_map(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, 4:] = (0, 0, 255)
    rgb[0, 0] = (7, 7, 7)  # not in the palette -> ignore
    Image.fromarray(rgb).save(tmp_path / "masks" / "a.png")
    (tmp_path / "class_map.json").write_text(json.dumps({"names": ["land", "water"],
                                                         "palette": [[0, 0, 0], [0, 0, 255]]}))
    ds = build_dataset(f"seg_folder:{tmp_path}")
    _, mask = ds[0]
    assert ds.classes == ["land", "water"]
    assert mask[3, :4].tolist() == [0] * 4 and mask[3, 4:].tolist() == [1] * 4 and mask[0, 0] == IGNORE_INDEX


def test_errors_name_the_files(tmp_path):
    seg_folder(tmp_path, n=2, classes=3)
    with pytest.raises(ConfigError, match="classes=K"):
        build_dataset(f"seg_folder:{tmp_path}")
    ds = build_dataset(f"seg_folder:{tmp_path}:classes=2")  # masks hold label 2
    with pytest.raises(DataError, match=r"chip\d\.png: label 2 outside the class range 0\.\.1"):
        [ds[i] for i in range(len(ds))]
    Image.fromarray(np.zeros((16, 16), np.uint8), mode="L").save(tmp_path / "masks" / "chip0.png")
    with pytest.raises(DataError, match=r"chip0\.png: image is \(32, 32\) pixels but its mask .* is \(16, 16\)"):
        build_dataset(f"seg_folder:{tmp_path}:classes=3")[0]
    (tmp_path / "images" / "orphan.png").write_bytes((tmp_path / "images" / "chip1.png").read_bytes())
    with pytest.raises(DataError, match=r"orphan\.png: missing mask"):
        build_dataset(f"seg_folder:{tmp_path}:classes=3")


def test_seg_csv(tmp_path):
    seg_folder(tmp_path, n=2, classes=2)
    rows = "".join(f"images/chip{i}.png,masks/chip{i}.png\n" for i in range(2))
    (tmp_path / "pairs.csv").write_text("image,mask\n" + rows)
    ds = build_dataset(f"seg_csv:{tmp_path / 'pairs.csv'}:classes=2")
    assert len(ds) == 2 and ds[1][1].max() == 1


def test_rasterizer_pixel_centres_and_holes():
    square = np.array([[1, 1], [5, 1], [5, 4], [1, 4]], float)  # cols 1..4, rows 1..3 have centres inside
    out = rasterize_polygons([square], 6, 7)
    expected = np.zeros((6, 7), bool)
    expected[1:4, 1:5] = True
    assert np.array_equal(out, expected)
    hole = np.array([[2, 2], [3, 2], [3, 3], [2, 3]], float)  # pixel (2, 2) only
    with_hole = rasterize_polygons([square, hole], 6, 7)
    expected[2, 2] = False
    assert np.array_equal(with_hole, expected)
    tri = np.array([[0, 0], [4, 0], [0, 4]], float)  # centre (c+.5, r+.5) inside when c + r + 1 < 4
    got = rasterize_polygons([tri], 4, 4)
    assert np.array_equal(got, np.add.outer(np.arange(4), np.arange(4)) + 1 < 4)


def test_geotiff_transform_roundtrip(tmp_path):
    geotiff_chip(tmp_path / "c.tif", origin=(500000.0, 4200000.0), pixel=0.5)
    t = geotiff_transform(tmp_path / "c.tif")
    px = world_to_pixel(np.array([[500000.0 + 3 * 0.5, 4200000.0 - 7 * 0.5]]), t)
    np.testing.assert_allclose(px, [[3.0, 7.0]])


def test_spacenet_footprints_on_the_chip_grid(tmp_path):
    spacenet(tmp_path, n=2)
    ds = build_dataset(f"spacenet:{tmp_path}")
    assert ds.classes == ["background", "building"] and len(ds) == 2
    image, mask = ds[0]
    assert image.shape == (3, 32, 32)
    expected = torch.zeros(32, 32, dtype=torch.int64)
    expected[4:12, 8:20] = 1
    assert torch.equal(mask, expected)


def _pattern(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """An asymmetric L shape of class 1, a block of class 2 in one corner; channel 0 = 80 x class."""
    m = torch.zeros(size, size, dtype=torch.int64)
    m[4:28, 4:10] = 1
    m[22:28, 4:20] = 1
    m[2:8, 22:30] = 2
    img = torch.stack([m.float() * 80, torch.zeros_like(m, dtype=torch.float32),
                       torch.arange(size).float().expand(size, size)]) / 255.0
    return img, m


@pytest.mark.parametrize("aug", [
    DenseAugConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, vflip=0.0, rot90=False),
    DenseAugConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, vflip=1.0, rot90=False),
    DenseAugConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, vflip=0.0, rot90=True),
    DenseAugConfig(scale=(0.3, 0.8), ratio=(0.7, 1.4), hflip=0.5, vflip=0.5, rot90=True),
])
def test_mask_moves_with_the_image(aug):
    img, m = _pattern()
    images, masks = img.expand(6, -1, -1, -1).contiguous(), m.expand(6, -1, -1).contiguous()
    out_img, out_mask = augment_pair(images, masks, 24, aug, torch.Generator().manual_seed(3))
    assert out_img.shape == (6, 3, 24, 24) and out_mask.shape == (6, 24, 24) and out_mask.dtype == torch.int64
    for i in range(6):
        mk = out_mask[i]
        # where the mask is constant over a 3x3 neighbourhood, the image's class channel agrees with it
        pad = torch.nn.functional.pad(mk[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0]
        windows = pad.unfold(0, 3, 1).unfold(1, 3, 1)  # (24, 24, 3, 3)
        flat = windows.amax((-1, -2)) == windows.amin((-1, -2))
        assert flat.sum() > 100
        np.testing.assert_allclose((out_img[i, 0] * 255 / 80)[flat].numpy(), mk[flat].float().numpy(), atol=0.05)
        assert set(mk.unique().tolist()) <= {0, 1, 2}
    if aug.scale == (1.0, 1.0) and not aug.rot90:  # a whole-image crop: exactly the resized mask, flipped
        resized = torch.nn.functional.interpolate(m[None, None].float(), size=24, mode="nearest-exact")[0, 0].long()
        flipped = resized.flip(-1) if aug.hflip else resized.flip(-2)
        assert all(torch.equal(out_mask[i], flipped) for i in range(6))


def test_augmentation_is_a_function_of_the_generator():
    img, m = _pattern()
    images, masks = img.expand(4, -1, -1, -1).contiguous(), m.expand(4, -1, -1).contiguous()
    a = augment_pair(images, masks, 16, DenseAugConfig(), torch.Generator().manual_seed(9))
    b = augment_pair(images, masks, 16, DenseAugConfig(), torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_data_check_names_bad_pairs(tmp_path):
    from explora.data.check import check_dataset

    seg_folder(tmp_path, n=4, classes=3)
    report = check_dataset(build_dataset(f"seg_folder:{tmp_path}:classes=3", on_error="skip"))
    assert report.clean and report.checked == 4 and report.counts == {"0": 4, "1": 4, "2": 4}
    Image.fromarray(np.zeros((16, 16), np.uint8), mode="L").save(tmp_path / "masks" / "chip0.png")
    Image.fromarray(np.full((32, 32), 7, np.uint8), mode="L").save(tmp_path / "masks" / "chip1.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8), mode="L").save(tmp_path / "masks" / "chip2.png")
    (tmp_path / "images" / "lonely.png").write_bytes((tmp_path / "images" / "chip3.png").read_bytes())
    report = check_dataset(build_dataset(f"seg_folder:{tmp_path}:classes=3", on_error="skip"))
    assert not report.clean and report.checked == 2
    text = "\n".join(report.unreadable)
    assert "lonely.png: missing mask" in text
    assert "chip0.png: image is (32, 32) pixels but its mask" in text
    assert "chip1.png: label 7 outside the class range 0..2" in text
    assert any("chip2.png" in w and "only ignored pixels" in w for w in report.warnings)
    for p in (tmp_path / "masks").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="no image/mask pairs"):
        build_dataset(f"seg_folder:{tmp_path}:classes=3", on_error="skip")


def test_torchgeo_segmentation_dataset_through_a_fake_module(monkeypatch, tmp_path):
    import sys
    import types

    class FakeSeg(torch.utils.data.Dataset):
        classes = ["background", "road", "water"]

        def __init__(self, root, split="train"):
            self.root, self.split = root, split

        def __len__(self):
            return 3

        def __getitem__(self, i):
            mask = torch.zeros(12, 12, dtype=torch.long)
            mask[:, 6:] = i % 3
            return {"image": torch.rand(4, 12, 12), "mask": mask}

    pkg, mod = types.ModuleType("torchgeo"), types.ModuleType("torchgeo.datasets")
    mod.FakeSeg = FakeSeg
    monkeypatch.setitem(sys.modules, "torchgeo", pkg)
    monkeypatch.setitem(sys.modules, "torchgeo.datasets", mod)
    ds = build_dataset(f"torchgeo:FakeSeg:{tmp_path}", split="val", image_size=8)
    assert ds.dense and ds.classes == ["background", "road", "water"] and ds.in_chans == 4
    image, mask = ds[2]
    assert image.shape == (4, 8, 8) and mask.shape == (8, 8) and set(mask.unique().tolist()) == {0, 2}
    with pytest.raises(DataError, match=r"FakeSeg.*\[2\] mask: label 2 outside the class range 0\.\.1"):
        build_dataset(f"torchgeo:FakeSeg:{tmp_path}:classes=2")[2]
