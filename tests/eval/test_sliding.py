"""Sliding-window inference: coverage, equality with a full forward where the image fits, blending, GeoTIFF reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import geotiff_chip
from tolerances import FP32_NETWORK

from explora.core.errors import ConfigError
from explora.eval.sliding import SceneReader, blend_weights, iter_windows, sliding_window_probs, window_origins
from explora.models.seg_heads import SegmentationModel


def test_window_origins_cover_the_scene():
    assert window_origins(100, 32, 24) == [0, 24, 48, 68]
    assert window_origins(20, 32, 24) == [0]
    assert len(list(iter_windows(64, 64, 32, 0))) == 4
    with pytest.raises(ConfigError, match="overlap=32"):
        list(iter_windows(64, 64, 32, 32))


def test_blend_weights_positive_and_peaked():
    w = blend_weights(16, "hann")
    assert w.min() > 0 and w[8, 8] > w[0, 0]
    assert torch.equal(blend_weights(4, "none"), torch.ones(4, 4))


@pytest.fixture
def model(tiny_dinov2):
    return SegmentationModel(tiny_dinov2, 3, head="linear").eval()


@pytest.mark.parametrize("blend", ["hann", "none"])
def test_one_window_equals_one_full_forward(model, blend):
    image = torch.rand(3, 32, 32)
    probs = sliding_window_probs(lambda t: model(t), lambda t, lf, h, w: image[:, t:t + h, lf:lf + w], 32, 32, 3,
                                 window=32, overlap=8, blend=blend)
    with torch.no_grad():
        ref = model(image[None]).softmax(1)[0].numpy()
    np.testing.assert_allclose(probs, ref, rtol=FP32_NETWORK["rtol"], atol=FP32_NETWORK["atol"])


def test_tiling_without_overlap_is_each_windows_forward(model):
    image = torch.rand(3, 64, 64)
    probs = sliding_window_probs(lambda t: model(t), lambda t, lf, h, w: image[:, t:t + h, lf:lf + w], 64, 64, 3,
                                 window=32, overlap=0, batch_size=3)
    with torch.no_grad():
        ref = model(image[None, :, 32:, :32]).softmax(1)[0].numpy()
    np.testing.assert_allclose(probs[:, 32:, :32], ref, rtol=FP32_NETWORK["rtol"], atol=FP32_NETWORK["atol"])
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_overlapping_windows_blend_to_a_distribution(model, tmp_path):
    image = torch.rand(3, 56, 72)
    seen = []
    probs = sliding_window_probs(lambda t: model(t), lambda t, lf, h, w: image[:, t:t + h, lf:lf + w], 56, 72, 3,
                                 window=32, overlap=16, scratch=tmp_path, progress=lambda d, n: seen.append((d, n)))
    assert probs.shape == (3, 56, 72)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert seen[-1] == (len(list(iter_windows(56, 72, 32, 16))),) * 2
    assert any(tmp_path.rglob("probs.npy"))  # memory-mapped accumulators


def test_scene_reader_reads_windows_of_a_geotiff(tmp_path):
    arr = geotiff_chip(tmp_path / "s.tif", origin=(0.0, 0.0), pixel=1.0, size=(40, 50))  # (H, W, 3) uint8
    reader = SceneReader(tmp_path / "s.tif")
    assert reader.shape == (3, 40, 50)
    win = reader.read(5, 7, 16, 20)
    assert win.dtype == torch.uint8 and torch.equal(win, torch.from_numpy(arr[5:21, 7:27].transpose(2, 0, 1)))


@pytest.mark.parametrize("layout", [dict(planarconfig="contig", tile=(16, 16), compression="zlib"),
                                    dict(planarconfig="contig", rowsperstrip=5, compression="zlib"),
                                    dict(planarconfig="separate", rowsperstrip=7, compression="zlib")])
def test_scene_reader_decodes_only_the_segments_of_a_window(tmp_path, layout):
    import tifffile

    arr = np.random.default_rng(0).integers(0, 4000, (4, 45, 70)).astype(np.uint16)  # (C, H, W)
    data = arr if layout.get("planarconfig") == "separate" else arr.transpose(1, 2, 0)
    tifffile.imwrite(tmp_path / "c.tif", data, photometric="minisblack", **layout)
    reader = SceneReader(tmp_path / "c.tif")
    assert reader._tif is not None and reader.shape == (4, 45, 70)
    for top, left, h, w in ((0, 0, 16, 16), (7, 13, 30, 40), (29, 54, 16, 16)):
        torch.testing.assert_close(reader.read(top, left, h, w),
                                   torch.from_numpy(arr[:, top:top + h, left:left + w].astype(np.float32) / 10000))
    assert len(reader._cache) < reader.shape[1]  # never the whole scene at once for a small window
    reader.close()


def test_scene_reader_on_the_real_landsat_scene():
    import tifffile
    from conftest import require

    path = require(Path("/work/shared/data/landsat7_etm_olinda_6band.tif"))
    reader = SceneReader(path)
    full = tifffile.imread(path).transpose(2, 0, 1)  # (6, 352, 349), deflate strips of 3 rows
    assert reader.shape == (6, 352, 349)
    assert torch.equal(reader.read(100, 200, 64, 64), torch.from_numpy(np.ascontiguousarray(full[:, 100:164, 200:264])))
