"""`dicom:` on pydicom's real test files: rescale + windowing against a hand computation from the tags, MONOCHROME1,
multi-frame files, compressed transfer syntaxes, labels by tag, `explora data check`, and a tiny pre-training run."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom", minversion="3.0")
from pydicom.data import get_testdata_file  # noqa: E402

from explora.cli.main import main  # noqa: E402
from explora.core.errors import DataError  # noqa: E402
from explora.data.check import check_dataset  # noqa: E402
from explora.data.dicom import DicomDataset  # noqa: E402
from explora.data.specs import build_dataset  # noqa: E402

warnings.filterwarnings("ignore", module="pydicom")


def _copy(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(get_testdata_file(name), folder / name)
    return folder


def _hand_window(x: float, center: float, width: float) -> float:
    """DICOM PS3.3 C.11.2.1.2.1, written out."""
    if x <= center - 0.5 - (width - 1) / 2:
        return 0.0
    if x > center - 0.5 + (width - 1) / 2:
        return 1.0
    return (x - (center - 0.5)) / (width - 1) + 0.5


def test_ct_hounsfield_units_windowed_by_hand(tmp_path):
    root = _copy(tmp_path / "ct", "CT_small.dcm")
    ds = pydicom.dcmread(root / "CT_small.dcm")
    raw = ds.pixel_array.astype(np.float64)
    hu_max = raw.max() * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # 2191 * 1 - 1024 = 1167 HU
    assert (raw.max(), hu_max) == (2191, 1167)
    data = build_dataset(f"dicom:{root}:window=bone")  # bone: center 400, width 1800
    image, label = data[0]
    assert image.dtype == torch.float32 and image.shape == (3, 128, 128) and label == -1
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert float(image.max()) == pytest.approx(_hand_window(hu_max, 400, 1800), abs=1e-6)  # 0.92663
    assert float(image.max()) == pytest.approx((1167 - 399.5) / 1799 + 0.5, abs=1e-6)
    # every pixel, not only the max
    hu = raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.vectorize(_hand_window)(hu, 400.0, 1800.0)
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-6)
    assert torch.equal(image[0], image[2])  # grayscale replicated


def test_raw_16_bit_values_never_reach_the_backbone(tmp_path):
    """The raw CT values are 128..2191; what the model is fed is windowed float in [0, 1] for every window kind."""
    root = _copy(tmp_path / "ct", "CT_small.dcm", "MR_small.dcm")
    for window in ("file", "soft_tissue", "40/400", "p1-99", "minmax"):
        data = build_dataset(f"dicom:{root}:window={window}")
        for i in range(len(data)):
            x = data[i][0]
            assert x.is_floating_point() and float(x.min()) >= 0 and float(x.max()) <= 1, window
    from explora.data.multicrop import MultiCrop

    raw = torch.from_numpy(pydicom.dcmread(root / "CT_small.dcm").pixel_array[None, None].astype(np.int32))
    with pytest.raises(DataError, match="windowing"):
        MultiCrop(global_size=16, local_size=8, n_local=1, photometric="multispectral", mean=(0.5,),
                  std=(0.2,))(raw, torch.Generator().manual_seed(0))


def test_mr_file_window_and_compressed_copies_agree(tmp_path):
    root = _copy(tmp_path / "mr", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm")
    ds = pydicom.dcmread(root / "MR_small.dcm")
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)  # 600, 1600
    data = DicomDataset(root, on_error="skip")
    by_name = {data.items[i][0].name: data[i][0] for i in range(len(data))}
    raw = ds.pixel_array.astype(np.float64)  # no rescale tags on this MR: the modality LUT is the identity
    np.testing.assert_allclose(by_name["MR_small.dcm"][0].numpy(), np.vectorize(_hand_window)(raw, c, w), atol=1e-6)
    assert torch.equal(by_name["MR_small_RLE.dcm"], by_name["MR_small.dcm"])  # RLE: decoded by pydicom itself
    if "MR_small_jp2klossless.dcm" in by_name:  # JPEG 2000 needs Pillow with OpenJPEG or pylibjpeg-openjpeg
        assert torch.equal(by_name["MR_small_jp2klossless.dcm"], by_name["MR_small.dcm"])


def test_monochrome1_is_inverted(tmp_path):
    root = _copy(tmp_path / "m2", "CT_small.dcm")
    ds = pydicom.dcmread(root / "CT_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    (tmp_path / "m1").mkdir()
    ds.save_as(tmp_path / "m1" / "inverted.dcm")
    normal = build_dataset(f"dicom:{root}:window=soft_tissue")[0][0]
    inverted = build_dataset(f"dicom:{tmp_path / 'm1'}:window=soft_tissue")[0][0]
    torch.testing.assert_close(inverted, 1.0 - normal, rtol=0, atol=1e-6)


def test_multi_frame_all_chosen_and_middle(tmp_path):
    root = _copy(tmp_path / "dose", "rtdose.dcm")  # 15 frames of 10x10
    frames = pydicom.dcmread(root / "rtdose.dcm").pixel_array.astype(np.float64)
    every = build_dataset(f"dicom:{root}:window=minmax")
    assert len(every) == 15 and every.describe(3).endswith("rtdose.dcm frame 3")
    one = build_dataset(f"dicom:{root}:window=minmax,frame=3")
    assert len(one) == 1
    f3 = frames[3]
    np.testing.assert_allclose(one[0][0][0].numpy(), (f3 - f3.min()) / (f3.max() - f3.min()), atol=1e-6)
    torch.testing.assert_close(one[0][0], every[3][0])
    assert build_dataset(f"dicom:{root}:frame=middle").items[0][1] == 7
    with pytest.raises(DataError, match="frame=20"):
        build_dataset(f"dicom:{root}:frame=20")


def test_compressed_without_decoder_names_the_package(tmp_path):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    root = _copy(tmp_path / "jls", "MR_small_jpeg_ls_lossless.dcm")
    data = build_dataset(f"dicom:{root}")
    with pytest.raises(DataError, match=r"JPEG-LS.*install pyjpegls, pylibjpeg-libjpeg or gdcm"):
        data[0]


def test_labels_by_patient_id_and_rows_without_files(tmp_path):
    root = _copy(tmp_path / "d", "CT_small.dcm", "MR_small.dcm")
    labels = tmp_path / "labels.csv"
    labels.write_text("PatientID,label\n1CT1,ct\n4MR1,mr\n")
    data = build_dataset(f"dicom:{root}:labels={labels},label_by=PatientID")
    assert data.classes == ["ct", "mr"]
    assert {data.items[i][0].name: data[i][1] for i in range(len(data))} == {"CT_small.dcm": 0, "MR_small.dcm": 1}
    by_file = tmp_path / "by_file.csv"
    by_file.write_text("file,label\nCT_small.dcm,1\nMR_small.dcm,0\nmissing.dcm,1\n")
    with pytest.raises(DataError, match="missing.dcm.*matches no DICOM file"):
        build_dataset(f"dicom:{root}:labels={by_file}")
    skipped = build_dataset(f"dicom:{root}:labels={by_file}", on_error="skip")
    assert len(skipped) == 2 and len(skipped.problems) == 1


def test_data_check_reports_problems_and_intensity_ranges(tmp_path, capsys):
    root = _copy(tmp_path / "d", "CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "MR_small_jpeg_ls_lossless.dcm")
    (root / "broken.dcm").write_bytes(b"not a dicom file at all")
    (root / "notes.txt").write_text("ignored: not a DICOM suffix")
    data = build_dataset(f"dicom:{root}:window=soft_tissue", on_error="skip")
    report = check_dataset(data)
    text = "\n".join(report.unreadable)
    assert "broken.dcm: unreadable DICOM file" in text
    assert "rtplan.dcm: no pixel data" in text
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if not get_decoder(JPEGLSLossless).is_available:
        assert "MR_small_jpeg_ls_lossless.dcm" in text and "pyjpegls" in text
    assert report.medical["bit_depths"] == {"16": 3}
    intensity = report.medical["intensity"]
    assert intensity["before"] == [-896.0, 2145.0]  # CT_small: 128 - 1024 HU; MR_small: 2145, no rescale tags
    assert intensity["after"] == [0.0, 1.0]
    assert any("inconsistent image sizes" in w for w in report.warnings) and not report.clean
    assert main(["data", "check", f"dicom:{root}:window=soft_tissue", "--json"]) == 1
    printed = json.loads(capsys.readouterr().out)[0]
    assert printed["medical"]["intensity"]["window"].startswith("soft_tissue")


TINY_DINO = [
    "model.name=test_dinov2", "model.weights=null", "data.image_size=32", "dinov2.n_prototypes=64",
    "dinov2.hidden_dim=32", "dinov2.bottleneck_dim=16", "dinov2.global_size=32", "dinov2.local_size=16",
    "dinov2.n_local=2", "train.batch_size=4", "train.num_workers=0", "train.log_every=1", "train.tensorboard=false",
    "train.precision=fp32", "train.steps=2", "dinov2.warmup_teacher_temp_steps=0",
]


def _dicom_folder(tmp_path: Path) -> Path:
    _copy(tmp_path / "patients" / "a", "CT_small.dcm")
    _copy(tmp_path / "patients" / "b", "MR_small.dcm", "rtdose.dcm")
    return tmp_path / "patients"


def test_pretrain_one_dinov2_run_from_a_dicom_folder(tmp_path):
    """The existing recipe, end to end: DICOM folder -> windowed [0, 1] -> multi-crop -> train -> export."""
    root = _dicom_folder(tmp_path)
    out = tmp_path / "run"
    assert main(["pretrain", *TINY_DINO, f"data.spec=dicom:{root}:window=minmax", f"output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and all(np.isfinite(v) for v in summary["last_terms"].values())
    side = json.loads((out / "export" / "model.json").read_text())
    assert side["in_chans"] == 3 and side["input_channels"]["grayscale"] == "replicate"


@pytest.mark.filterwarnings("ignore:MAE checkpoint has no decoder")
def test_pretrain_mae_in_chans_1_from_a_dicom_folder(tmp_path):
    """channels=1 + model.in_chans=1: the RGB patch filters are summed, and the export records the choice."""
    root = _dicom_folder(tmp_path)
    out = tmp_path / "run1"
    args = ["pretrain", "objective=mae", "model.name=test_mae", "model.weights=null", "model.img_size=32",
            "model.in_chans=1", "data.image_size=32", "mae.img_size=32", "mae.decoder_dim=32", "mae.decoder_depth=1",
            "mae.decoder_heads=4", "train.batch_size=4", "train.num_workers=0", "train.tensorboard=false",
            "train.precision=fp32", "train.steps=2", "optim.warmup_steps=1",
            f"data.spec=dicom:{root}:window=minmax,channels=1", f"output_dir={out}"]
    assert main(args) == 0
    side = json.loads((out / "export" / "model.json").read_text())
    assert side["in_chans"] == 1 and side["input_channels"]["channels"] == 1
    assert side["input_channels"]["grayscale"].startswith("in_chans_1")
