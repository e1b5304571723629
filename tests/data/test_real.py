"""Real material: the 6-band Landsat-7 scene tiled into chips, and Fashion-MNIST's IDX files."""

from __future__ import annotations

import numpy as np
import tifffile
import torch
from conftest import FASHION_MNIST, LANDSAT_SCENE, require

from explora.data.specs import build_dataset
from explora.data.stats import compute_stats


def test_landsat_scene_tiles_into_90_chips():
    scene = require(LANDSAT_SCENE)
    arr = tifffile.imread(scene)  # (352, 349, 6) HWC uint8
    assert arr.shape == (352, 349, 6)
    ds = build_dataset(f"folder:{scene}:chip=64,stride=32")
    assert len(ds) == 90 and ds.in_chans == 6  # rows (352-64)//32+1 = 10, cols (349-64)//32+1 = 9
    for index, (y, x) in ((0, (0, 0)), (1, (0, 32)), (9, (32, 0)), (89, (288, 256))):
        chip, label = ds[index]
        assert chip.shape == (6, 64, 64) and chip.dtype == torch.uint8 and label == -1
        want = torch.from_numpy(arr[y:y + 64, x:x + 64].transpose(2, 0, 1).copy())  # (64, 64, 6) -> (6, 64, 64)
        assert torch.equal(chip, want)
    stats = compute_stats(ds)
    assert len(stats["mean"]) == 6 and stats["samples"] == 90
    chips = np.stack([arr[y:y + 64, x:x + 64] for y in range(0, 289, 32) for x in range(0, 286, 32)]) / 255.0
    assert chips.shape == (90, 64, 64, 6)
    np.testing.assert_allclose(stats["mean"], chips.reshape(-1, 6).mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], chips.reshape(-1, 6).std(0), rtol=1e-9)


def test_fashion_mnist_idx():
    root = require(FASHION_MNIST)
    train = build_dataset(f"fashion_mnist:{root}")
    test = build_dataset(f"fashion_mnist:{root}", split="test")
    assert len(train) == 60000 and len(test) == 10000 and train.num_classes == 10
    image, label = test[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and label == 9  # first test item: ankle boot
    assert torch.bincount(torch.from_numpy(train.labels.astype("int64"))).tolist() == [6000] * 10
    rgb = build_dataset(f"fashion_mnist:{root}:rgb=1", split="test", image_size=32)
    assert rgb[0][0].shape == (3, 32, 32)
    assert abs(train.mean[0] - 0.2860) < 0.002 and abs(train.std[0] - 0.3530) < 0.002  # published statistics
