"""Patient-level splits: every group in exactly one split, deterministic, available to any spec through by=."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from explora.core.errors import ConfigError, DataError
from explora.data.specs import build_dataset
from explora.data.splits import assign_groups, group_keys


def test_assignment_is_disjoint_deterministic_and_sized():
    sizes = {f"patient{i:02d}": 1 + i % 4 for i in range(40)}
    a = assign_groups(sizes, 0.2, 0.1, seed=3)
    assert a == assign_groups(dict(reversed(sizes.items())), 0.2, 0.1, seed=3)  # order of discovery is irrelevant
    assert set(a) == set(sizes) and set(a.values()) == {"train", "val", "test"}
    total = sum(sizes.values())
    share = Counter()
    for g, split in a.items():
        share[split] += sizes[g]
    assert 0.2 * total <= share["val"] <= 0.2 * total + 4 and 0.1 * total <= share["test"] <= 0.1 * total + 4
    assert a != assign_groups(sizes, 0.2, 0.1, seed=4)


def test_one_group_stays_in_train_and_bad_fractions():
    assert assign_groups({"only": 5}, 0.5) == {"only": "train"}
    with pytest.raises(ConfigError, match="val_fraction"):
        assign_groups({"a": 1}, 0.7, 0.4)


@pytest.fixture
def patient_folder(tmp_path):
    """imagefolder layout <class>/<patient>_<n>.png is not grouped by folder; a CSV with <patient>/<image>.png is."""
    rows = ["path,label"]
    for p in range(10):
        for k in range(3):
            f = tmp_path / f"p{p}" / f"{k}.png"
            f.parent.mkdir(exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), p * 20, np.uint8)).save(f)
            rows.append(f"p{p}/{k}.png,{p % 2}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "list.csv"


def test_spec_option_splits_a_csv_by_patient_folder(patient_folder):
    spec = f"csv:{patient_folder}:by=parent,val_fraction=0.3,seed=1"
    train, val = build_dataset(spec, split="train"), build_dataset(spec, split="val")
    assert len(train) + len(val) == 30 and len(val) >= 9
    assert len(set(group_keys(train.inner, "parent"))) == 10
    t = {train.inner.items[i][0].parent for i in train.indices}
    v = {val.inner.items[i][0].parent for i in val.indices}
    assert not t & v and len(t | v) == 10
    assert train.mean == val.mean and train.classes == val.classes == ["0", "1"]
    assert train[0][0].shape == (3, 8, 8)
    with pytest.raises(ConfigError, match="without by="):
        build_dataset(f"csv:{patient_folder}:val_fraction=0.3")


def test_dicom_split_by_patient_id(tmp_path):
    pydicom = pytest.importorskip("pydicom", minversion="3.0")
    from pydicom.data import get_testdata_file

    root = tmp_path / "d"
    root.mkdir()
    for i in range(6):  # 6 files, 3 patients (2 files each)
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PatientID = f"P{i // 2}"
        ds.save_as(root / f"img{i}.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), root / "mr.dcm")  # PatientID 4MR1
    spec = f"dicom:{root}:by=PatientID,val_fraction=0.25,seed=0"
    train, val = build_dataset(spec, split="train"), build_dataset(spec, split="val")
    assert len(train) + len(val) == 7
    assert not set(train.groups) & set(val.groups)
    assert set(train.groups) | set(val.groups) == {"P0", "P1", "P2", "4MR1"}
    with pytest.raises(DataError, match="split 'test'.*test_fraction"):
        build_dataset(f"dicom:{root}:by=PatientID", split="test")  # no test_fraction: no test part


def test_nifti_split_by_volume(tmp_path):
    nib = pytest.importorskip("nibabel")
    for i in range(4):
        nib.save(nib.Nifti1Image(np.random.default_rng(i).random((4, 4, 3)).astype(np.float32), np.eye(4)),
                 tmp_path / f"v{i}.nii")
    spec = f"nifti:{tmp_path}:by=volume,val_fraction=0.25"
    train, val = build_dataset(spec, split="train"), build_dataset(spec, split="val")
    assert (len(train), len(val)) == (9, 3) and not set(train.groups) & set(val.groups)
