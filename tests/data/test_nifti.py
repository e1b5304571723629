"""`nifti:` on a small generated volume: slices along an axis, empty slices skipped, windowing, volume + index kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from explora.core.errors import ConfigError, DataError  # noqa: E402
from explora.data.check import check_dataset  # noqa: E402
from explora.data.specs import build_dataset  # noqa: E402


@pytest.fixture
def volume(tmp_path):
    """(8, 9, 6) int16 CT-like volume scaled by scl_slope=2, scl_inter=-1024: slices 1..3 along axis 2 hold data."""
    raw = np.zeros((8, 9, 6), np.int16)
    raw[2:6, 3:7, 1:4] = (np.arange(4 * 4 * 3).reshape(4, 4, 3) * 20 + 400).astype(np.int16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    return path, raw.astype(np.float64) * 2.0 - 1024.0


def test_slices_along_each_axis(volume):
    path, hu = volume
    for axis, n, plane in ((0, 8, (9, 6)), (1, 9, (8, 6)), (2, 6, (8, 9))):
        data = build_dataset(f"nifti:{path}:axis={axis}")
        assert len(data) == n and data[0][0].shape == (3, *plane) and data[0][1] == -1


def test_skip_empty_keeps_volume_and_index(volume):
    path, _ = volume
    data = build_dataset(f"nifti:{path}:skip_empty=1")
    assert [data.slice_of(i)[1] for i in range(len(data))] == [1, 2, 3]
    assert data.slice_of(0)[0] == path and data.describe(0) == f"{path} slice 1 (axis 2)"


def test_scaled_values_and_a_fixed_window_by_hand(volume):
    path, hu = volume
    data = build_dataset(f"nifti:{path}:skip_empty=1,window=soft_tissue")  # center 40, width 400
    values, _, _ = data.raw(1)
    np.testing.assert_allclose(values, hu[:, :, 2])  # scl_slope / scl_inter applied
    expected = np.clip((hu[:, :, 2] - 39.5) / 399 + 0.5, 0, 1)
    x = data[1][0]
    assert x.dtype == torch.float32
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-6)


def test_default_percentile_window_and_one_channel(volume):
    path, _ = volume
    data = build_dataset(f"nifti:{path}:skip_empty=1,channels=1")
    x = data[0][0]
    assert x.shape == (1, 8, 9) and float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert data.mean == pytest.approx((0.449,), abs=1e-3)  # the mean of ImageNet's RGB statistics


def test_folder_of_volumes_and_4d(tmp_path):
    for i in range(2):
        nib.save(nib.Nifti1Image(np.random.default_rng(i).random((4, 5, 3)).astype(np.float32), np.eye(4)),
                 tmp_path / f"v{i}.nii")
    nib.save(nib.Nifti1Image(np.random.default_rng(2).random((4, 5, 3, 2)).astype(np.float32), np.eye(4)),
             tmp_path / "t.nii.gz")
    data = build_dataset(f"nifti:{tmp_path}")
    assert len(data) == 9
    assert len(build_dataset(f"nifti:{tmp_path / 't.nii.gz'}:frame=1")) == 3
    with pytest.raises(DataError, match="frame=5"):
        build_dataset(f"nifti:{tmp_path / 't.nii.gz'}:frame=5")


def test_bad_input(tmp_path, volume):
    path, _ = volume
    with pytest.raises(ConfigError, match="axis=3"):
        build_dataset(f"nifti:{path}:axis=3")
    with pytest.raises(DataError, match="not a NIfTI file"):
        build_dataset(f"nifti:{tmp_path / 'nothing.png'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.nii").write_bytes(b"garbage")
    nib.save(nib.Nifti1Image(np.ones((3, 3, 2), np.float32), np.eye(4)), tmp_path / "bad" / "ok.nii")
    data = build_dataset(f"nifti:{tmp_path / 'bad'}", on_error="skip")
    report = check_dataset(data)
    assert any("x.nii: unreadable NIfTI file" in m for m in report.unreadable)
    assert report.medical["intensity"]["before"] == [1.0, 1.0]
