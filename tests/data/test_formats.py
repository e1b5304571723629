"""Each upstream layout loads into (image (C, H, W), label) with the right classes, bands, dtype and values."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from data_fixtures import fmow_rgb, fmow_sentinel, fmow_temporal, idx_files, image_folder, write_jpg, write_tif

from explora.data.base import IMAGENET_MEAN
from explora.data.fmow import CATEGORIES, FMOW_RGB_MEAN, SENTINEL_MEAN, SENTINEL_STD
from explora.data.folders import EUROSAT_CLASSES, RESISC45_CLASSES
from explora.data.specs import build_dataset


def test_fmow_rgb_csv(tmp_path):
    csv = fmow_rgb(tmp_path)
    ds = build_dataset(f"fmow:{csv}")
    assert len(ds) == 6 and ds.num_classes == 62 and ds.classes[0] == "airport" and ds.classes[-1] == "zoo"
    image, label = ds[2]
    assert image.shape == (3, 40, 48) and image.dtype == torch.uint8 and label == 2
    assert ds.mean == IMAGENET_MEAN and ds.in_chans == 3
    assert build_dataset(f"fmow:{csv}:stats=fmow").mean == FMOW_RGB_MEAN


def test_fmow_rgb_names_as_labels_and_resize(tmp_path):
    write_jpg(tmp_path / "a.jpg", size=(40, 48))
    (tmp_path / "l.csv").write_text("category,image_path\nzoo,a.jpg\n")
    ds = build_dataset(f"fmow:{tmp_path / 'l.csv'}", image_size=32)
    image, label = ds[0]
    assert label == CATEGORIES.index("zoo") == 61 and image.shape == (3, 32, 32) and image.dtype == torch.uint8


def test_fmow_sentinel_normalisation_and_drop(tmp_path):
    csv = fmow_sentinel(tmp_path)
    ds = build_dataset(f"fmow_sentinel:{csv}:drop=0,9,10")
    assert len(ds) == 4 and ds.in_chans == 10 and ds.band_names[0] == "B2"
    image, label = ds[1]
    assert image.shape == (10, 24, 24) and image.dtype == torch.float32 and label == 3
    assert image.min() >= 0 and image.max() <= 1
    raw = write_tif(tmp_path / "ref.tif", bands=13, seed=1).astype(np.float64)  # the same array fixture row 1 holds
    mean, std = np.array(SENTINEL_MEAN), np.array(SENTINEL_STD)
    want = np.clip((raw - (mean - 2 * std)) / (4 * std), 0, 1).transpose(2, 0, 1)[[1, 2, 3, 4, 5, 6, 7, 8, 11, 12]]
    torch.testing.assert_close(image, torch.from_numpy(want).float())
    assert ds.mean == (0.0,) * 10 and ds.std == (1.0,) * 10
    # paper syntax: bare band list
    assert build_dataset(f"fmow_sentinel:{csv}:0,9,10").in_chans == 10
    assert build_dataset(f"fmow_sentinel:{csv}").in_chans == 13


def test_fmow_sentinel_year_filter(tmp_path):
    csv = fmow_sentinel(tmp_path)
    ds = build_dataset(f"fmow_sentinel:{csv}", years=range(2011, 2013))
    assert len(ds) == 2


def test_fmow_temporal_frames_and_timestamps(tmp_path):
    csv = fmow_temporal(tmp_path)
    ds = build_dataset(f"fmow_temporal:{csv}:frames=3")
    assert len(ds) == 5 and ds.in_chans == 9
    image, label, stamps = ds[0]  # the 2016 airport frame + the other two, time-ordered
    assert image.shape == (9, 16, 16) and label == 0
    assert stamps.tolist() == [[2014, 2, 9], [2015, 3, 11], [2016, 5, 10]]
    zoo_img, zoo_label, zoo_stamps = ds[2]  # 2 frames available: one repeats
    assert zoo_label == 61 and zoo_stamps[:, 0].tolist() == [2017, 2017, 2018]
    assert torch.equal(zoo_img[0:3], zoo_img[3:6])
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch[0].shape == (2, 9, 16, 16) and batch[2].shape == (2, 3, 3)


def test_imagefolder_and_csv(tmp_path):
    image_folder(tmp_path / "imgs")
    ds = build_dataset(f"imagefolder:{tmp_path / 'imgs'}")
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and [ds[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    (tmp_path / "list.csv").write_text("path,label\nimgs/dog/dog_1.png,dog\nimgs/cat/cat_2.png,cat\n")
    cds = build_dataset(f"csv:{tmp_path / 'list.csv'}")
    assert cds.classes == ["cat", "dog"] and [cds[i][1] for i in range(2)] == [1, 0]
    assert torch.equal(cds[0][0], ds[3][0])


def test_eurosat_rgb_and_ms(tmp_path):
    for c in EUROSAT_CLASSES:
        write_jpg(tmp_path / "rgb" / "EuroSAT_RGB" / c / f"{c}_1.jpg", size=(64, 64))
        write_tif(tmp_path / "ms" / "ds" / "tif" / c / f"{c}_1.tif", bands=13, size=(64, 64))
    rgb = build_dataset(f"eurosat:{tmp_path / 'rgb'}")
    ms = build_dataset(f"eurosat:{tmp_path / 'ms'}")
    assert len(rgb) == len(ms) == 10 and rgb.num_classes == 10
    assert rgb[9][0].shape == (3, 64, 64) and rgb[9][1] == 9
    image, label = ms[3]
    assert image.shape == (13, 64, 64) and image.dtype == torch.float32 and label == 3
    raw = np.asarray(write_tif(tmp_path / "x.tif", bands=13, size=(64, 64)), dtype=np.float32) / 10000
    torch.testing.assert_close(image, torch.from_numpy(raw.transpose(2, 0, 1)))
    (tmp_path / "ms" / "eurosat-val.txt").write_text("Forest_1.tif\nRiver_1.tif\n")
    assert len(build_dataset(f"eurosat:{tmp_path / 'ms'}", split="val")) == 2


def test_resisc45_folder_and_csv(tmp_path):
    for c in RESISC45_CLASSES:
        write_jpg(tmp_path / "NWPU-RESISC45" / c / f"{c}_001.jpg", size=(32, 32))
    ds = build_dataset(f"resisc45:{tmp_path}")
    assert len(ds) == 45 and ds.num_classes == 45 and ds[44][1] == 44
    (tmp_path / "r.csv").write_text("label,image_path\n3,NWPU-RESISC45/church/church_001.jpg\n")
    cds = build_dataset(f"resisc45:{tmp_path / 'r.csv'}")
    assert len(cds) == 1 and cds[0][1] == 3


def test_idx_mnist(tmp_path):
    images, labels = idx_files(tmp_path, n=12)
    ds = build_dataset(f"fashion_mnist:{tmp_path}")
    assert len(ds) == 12 and ds.num_classes == 10 and ds.in_chans == 1
    image, label = ds[5]
    assert image.shape == (1, 28, 28) and torch.equal(image[0], torch.from_numpy(images[5])) and label == 5
    rgb = build_dataset(f"fashion_mnist:{tmp_path}:rgb=1", image_size=32)
    assert rgb[5][0].shape == (3, 32, 32) and rgb.in_chans == 3 and len(rgb.mean) == 3
    idx_files(tmp_path / "plain", n=3, prefix="t10k", gz=False)
    assert len(build_dataset(f"mnist:{tmp_path / 'plain'}", split="test")) == 3


def test_unlabeled_folder_recursive_with_chips(tmp_path):
    a = write_tif(tmp_path / "scenes" / "a.tif", bands=4, size=(40, 50), dtype=np.uint8)
    write_tif(tmp_path / "scenes" / "sub" / "b.tif", bands=4, size=(16, 16), dtype=np.uint8, planar=True)
    whole = build_dataset(f"folder:{tmp_path / 'scenes'}")
    assert len(whole) == 2 and whole.in_chans == 4 and whole[1][0].shape == (4, 16, 16) and whole[0][1] == -1
    chips = build_dataset(f"folder:{tmp_path / 'scenes'}:chip=16,stride=8")
    # a: rows (40-16)//8+1 = 4, cols (50-16)//8+1 = 5 -> 20; b: 1
    assert len(chips) == 21
    image, _ = chips[6]  # a, row 1, col 1
    assert torch.equal(image, torch.from_numpy(a[8:24, 8:24].transpose(2, 0, 1).copy()))


def test_wrapped_torchgeo_style_dicts():
    class TG(torch.utils.data.Dataset):
        classes = ["x", "y"]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": torch.full((5, 8, 8), float(i)), "label": torch.tensor(i % 2)}

    ds = build_dataset(TG())
    assert ds.in_chans == 5 and ds.classes == ["x", "y"] and ds[2][1] == 0 and ds[1][0].dtype == torch.float32


def test_wilds_missing_package_and_fake_module(monkeypatch, tmp_path):
    from explora.core.errors import ConfigError

    monkeypatch.setitem(sys.modules, "wilds", None)
    with pytest.raises(ConfigError, match="pip install wilds"):
        build_dataset(f"wilds:camelyon17:train:{tmp_path}")

    from PIL import Image

    class Subset:
        def __init__(self, unlabeled):
            self.unlabeled = unlabeled

        def __len__(self):
            return 4

        def __getitem__(self, i):
            x = Image.fromarray(np.full((12, 12, 3), i, np.uint8))
            return (x, {}) if self.unlabeled else (x, torch.tensor(i % 2), {})

    class Fake:
        n_classes = 2

        def __init__(self, unlabeled):
            self.unlabeled = unlabeled

        def get_subset(self, split):
            return Subset(self.unlabeled)

    fake = types.SimpleNamespace(get_dataset=lambda dataset, root_dir, unlabeled, download: Fake(unlabeled))
    monkeypatch.setitem(sys.modules, "wilds", fake)
    labeled = build_dataset(f"wilds:camelyon17:train:{tmp_path}")
    assert labeled.num_classes == 2 and labeled[3][1] == 1 and labeled[3][0].shape == (3, 12, 12)
    unlabeled = build_dataset(f"wilds:camelyon17:train_unlabeled:{tmp_path}")
    assert unlabeled[3][1] == -1 and int(unlabeled[3][0][0, 0, 0]) == 3
