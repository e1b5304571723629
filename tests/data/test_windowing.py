"""Windowing to [0, 1] (DICOM VOI formula, presets, percentiles) and the guard against raw 16-bit images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explora.core.errors import ConfigError, DataError
from explora.data.multicrop import MultiCrop
from explora.data.windowing import CT_PRESETS, parse_window, require_unit_range, to_channels, voi_window
from explora.eval.features import EvalTransform
from explora.objectives.mae.augment import to_float


def test_linear_voi_matches_the_dicom_formula():
    c, w = 40.0, 400.0
    x = np.array([-1000.0, c - 0.5 - (w - 1) / 2, 40.0, 100.0, c - 0.5 + (w - 1) / 2, 3000.0])
    y = voi_window(x, c, w)
    expected = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-7)
    assert y[0] == 0.0 and y[-1] == 1.0


def test_linear_exact_and_sigmoid():
    x = np.array([0.0, 50.0, 100.0])
    np.testing.assert_allclose(voi_window(x, 50, 100, "LINEAR_EXACT"), [0.0, 0.5, 1.0])
    s = voi_window(x, 50, 100, "SIGMOID")
    assert s[1] == pytest.approx(0.5) and 0 < s[0] < 0.5 < s[2] < 1


@pytest.mark.parametrize("text", ["lung", "soft_tissue", "bone", "brain", "40/400", "-600/1500", "p1-99", "minmax",
                                  "p0.5-99.5", "file"])
def test_every_window_kind_gives_unit_float(text):
    x = np.random.default_rng(0).normal(0, 800, size=(16, 16))
    y = parse_window(text).apply(x)
    assert y.dtype == np.float32 and y.min() >= 0 and y.max() <= 1


def test_presets_and_fixed_values():
    assert parse_window("lung").center == CT_PRESETS["lung"][0] == -600
    w = parse_window("40/400")
    assert (w.kind, w.center, w.width) == ("fixed", 40.0, 400.0)
    p = parse_window("p2-98")
    x = np.arange(101, dtype=np.float64)
    y = p.apply(x)
    assert y[2] == 0 and y[98] == 1 and y[50] == pytest.approx(0.5)


def test_constant_image_and_missing_file_window():
    assert parse_window("minmax").apply(np.full((4, 4), 7.0)).max() == 0
    y = parse_window("file").apply(np.array([0.0, 5.0, 10.0]))  # no file window: min-max fallback
    np.testing.assert_allclose(y, [0, 0.5, 1])


@pytest.mark.parametrize("text", ["lungs", "40/0", "p99-1", "p0-101", "40:400"])
def test_bad_windows_name_the_choices(text):
    with pytest.raises(ConfigError, match="window="):
        parse_window(text)


def test_to_channels_replicates_or_keeps_one():
    g = np.random.default_rng(0).random((5, 6)).astype(np.float32)
    three = to_channels(g, 3, "x")
    assert three.shape == (3, 5, 6) and torch.equal(three[0], three[2])
    assert to_channels(g, 1, "x").shape == (1, 5, 6)
    with pytest.raises(DataError, match="channels=3"):
        to_channels(np.zeros((3, 5, 6)), 1, "colour.dcm")


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64])
def test_raw_integer_images_are_refused_by_every_normalisation(dtype):
    raw = torch.randint(0, 4096, (2, 3, 32, 32), dtype=dtype)
    with pytest.raises(DataError, match="windowing"):
        require_unit_range(raw)
    with pytest.raises(DataError, match="MultiCrop.*windowing"):
        MultiCrop(global_size=16, local_size=8, n_local=1)(raw, torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match="MAE"):
        to_float(raw)
    with pytest.raises(DataError, match="evaluation"):
        EvalTransform(16, (0.5,) * 3, (0.25,) * 3)(raw)


def test_uint16_tensor_is_refused():
    if not hasattr(torch, "uint16"):
        pytest.skip("this torch has no uint16 dtype")
    raw = torch.zeros(1, 3, 8, 8, dtype=torch.uint16)
    with pytest.raises(DataError, match="uint16"):
        require_unit_range(raw)


def test_uint8_and_float_pass():
    require_unit_range(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    require_unit_range(torch.zeros(1, 3, 4, 4))
