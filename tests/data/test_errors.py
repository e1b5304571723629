"""Bad input gives a DataError naming the file (and CSV row); skip mode skips deterministically and counts."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from data_fixtures import fmow_rgb, fmow_sentinel, fmow_temporal, idx_files, image_folder, truncate, write_tif
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explora.core.errors import ConfigError, DataError
from explora.data.io import read_image
from explora.data.specs import build_dataset


def test_fmow_missing_and_truncated_files(tmp_path):
    csv = fmow_rgb(tmp_path, n=4)
    victim = tmp_path / "train/airport_hangar/airport_hangar_1/airport_hangar_1_0_rgb.jpg"
    truncate(victim, 0.3)
    (tmp_path / "train/amusement_park/amusement_park_3/amusement_park_3_0_rgb.jpg").unlink()
    ds = build_dataset(f"fmow:{csv}")
    with pytest.raises(DataError, match=r"row 3: .*airport_hangar_1_0_rgb\.jpg.*truncated"):
        ds[1]
    with pytest.raises(DataError, match=r"row 5: .*not found"):
        ds[3]
    skip = build_dataset(f"fmow:{csv}", on_error="skip")
    assert skip[1][1] == 2  # next good index
    assert skip[3][1] == 0  # wraps around
    assert skip.skipped == 2


def test_csv_malformed_rows_and_labels(tmp_path):
    csv = fmow_rgb(tmp_path, n=2)
    csv.write_text(csv.read_text() + "99,x.jpg\nonly_one_cell\nnot_a_class,y.jpg\n")
    with pytest.raises(DataError, match=r"row 4: label 99 outside the class list"):
        build_dataset(f"fmow:{csv}")
    ds = build_dataset(f"fmow:{csv}", on_error="skip")
    assert len(ds) == 2 and ds.skipped == 3 and len(ds.problems) == 3
    assert "row 5: malformed row" in ds.problems[1] and "row 6" in ds.problems[2]


def test_sentinel_wrong_band_count_and_corrupt(tmp_path):
    csv = fmow_sentinel(tmp_path)
    bad = next(tmp_path.rglob("*_1_0.tif"))
    write_tif(bad, bands=12)
    truncate(next(tmp_path.rglob("*_2_0.tif")), 0.2)
    ds = build_dataset(f"fmow_sentinel:{csv}")
    with pytest.raises(DataError, match=r"row 3 .*12 bands; expected 13"):
        ds[1]
    with pytest.raises(DataError, match=r"row 4: .*_2_0\.tif"):
        ds[2]
    skip = build_dataset(f"fmow_sentinel:{csv}", on_error="skip")
    assert skip[1][1] == skip[3][1] and skip.skipped == 2


def test_temporal_bad_timestamp_and_frame(tmp_path):
    csv = fmow_temporal(tmp_path)
    csv.write_text(csv.read_text() + "zoo,3,9,yesterday,zoo/x.png\n")
    with pytest.raises(DataError, match="row 7: timestamp 'yesterday'"):
        build_dataset(f"fmow_temporal:{csv}")
    ds = build_dataset(f"fmow_temporal:{csv}", on_error="skip")
    assert ds.skipped == 1
    truncate(next(tmp_path.rglob("zoo_3_2_rgb.png")), 0.3)
    with pytest.raises(DataError, match="zoo_3_2_rgb.png"):
        ds.sample(4)
    assert ds[4][1] == 0  # the last item needs the bad frame: wraps to index 0 (airport)
    assert ds[2][1] == 0 and ds.skipped == 3  # zoo item 2 needs it too: 2 -> 3 (airport)


def test_folders_corrupt_empty_and_band_mismatch(tmp_path):
    image_folder(tmp_path / "f")
    truncate(tmp_path / "f" / "dog" / "dog_2.png", 0.4)
    ds = build_dataset(f"imagefolder:{tmp_path / 'f'}")
    with pytest.raises(DataError, match="dog_2.png"):
        ds[4]
    skip = build_dataset(f"imagefolder:{tmp_path / 'f'}", on_error="skip")
    assert [skip[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1] and skip.skipped == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        build_dataset(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="no images in class sub-folders"):
        build_dataset(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="folder not found"):
        build_dataset(f"eurosat:{tmp_path / 'nope'}")
    write_tif(tmp_path / "m" / "a.tif", bands=4, size=(16, 16))
    write_tif(tmp_path / "m" / "b.tif", bands=3, size=(16, 16))
    mixed = build_dataset(f"folder:{tmp_path / 'm'}")
    with pytest.raises(DataError, match=r"b\.tif.*expected 4 bands"):
        mixed[1]


def test_chips_small_and_corrupt_scene(tmp_path):
    write_tif(tmp_path / "s" / "big.tif", bands=2, size=(32, 32), dtype=np.uint8)
    write_tif(tmp_path / "s" / "small.tif", bands=2, size=(8, 8), dtype=np.uint8)
    with pytest.raises(DataError, match=r"small\.tif: image is 8x8; expected at least one 16x16 chip"):
        build_dataset(f"folder:{tmp_path / 's'}:chip=16")
    ds = build_dataset(f"folder:{tmp_path / 's'}:chip=16", on_error="skip")
    assert len(ds) == 4 and ds.skipped == 1


def test_idx_truncated_and_wrong_magic(tmp_path):
    idx_files(tmp_path, n=5, gz=False)
    truncate(tmp_path / "train-images-idx3-ubyte", 0.5)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: IDX body has"):
        build_dataset(f"fashion_mnist:{tmp_path}")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(12))
    with pytest.raises(DataError, match="IDX magic"):
        build_dataset(f"fashion_mnist:{tmp_path}")
    with pytest.raises(DataError, match="not found"):
        build_dataset(f"mnist:{tmp_path / 'none'}")


def test_unknown_name_suggests_close_match(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'fmow_sentinel'"):
        build_dataset(f"fmow_sentinal:{tmp_path}/x.csv")
    with pytest.raises(ConfigError, match="expected 'name:path"):
        build_dataset("just_a_path")


def test_skip_counter_sums_over_workers(tmp_path):
    image_folder(tmp_path, per_class=4)
    for name in ("cat/cat_2.png", "dog/dog_1.png", "dog/dog_4.png"):
        truncate(tmp_path / name, 0.4)
    ds = build_dataset(f"imagefolder:{tmp_path}", on_error="skip")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)  # fork (spawn: slow here)
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 0]  # bad indices replaced by the next good one
    assert ds.skipped == 3  # counted in the workers, read in the main process
    assert pickle.loads(pickle.dumps(ds)).skipped == 3  # plain pickles snapshot the count


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".tif", ".jpg", ".png"]),
       header=st.sampled_from([b"", b"II*\x00", b"MM\x00*", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"]))
def test_fuzz_random_bytes_raise_data_error(tmp_path, data, suffix, header):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(header + data)
    try:
        image = read_image(path)
    except DataError as e:
        assert str(path) in str(e)
    else:  # a random blob that happens to decode must still be a valid (C, H, W) tensor
        assert image.ndim == 3
