"""``explora segment`` then ``explora predict`` from the command line: class maps keep the georeferencing."""

from __future__ import annotations

import json

import numpy as np
import tifffile
import torch
from data_fixtures import geotiff_chip, seg_folder
from PIL import Image

from explora.cli.main import main
from explora.recipes.predict import GEO_TAGS, load_segmenter


def _train(tmp_path, head="linear"):
    seg_folder(tmp_path / "data", n=4, classes=3)
    out = tmp_path / "run"
    rc = main(["segment", "--backbone", "test_dinov2", "--data", f"seg_folder:{tmp_path / 'data'}:classes=3",
               "--image-size", "32", "--batch-size", "2", "--steps", "2", "--num-workers", "0", "--out", str(out),
               "--mode", "lora", "--head", head, "--precision", "fp32", "--device", "cpu", "--dice-weight", "0.5"])
    assert rc == 0
    return out


def test_segment_then_predict_geotiff_keeps_tags(tmp_path, capsys):
    run = _train(tmp_path)
    assert "mIoU" in capsys.readouterr().out
    assert json.loads((run / "segmenter.json").read_text())["num_classes"] == 3
    scene = tmp_path / "scene.tif"
    geotiff_chip(scene, origin=(500000.0, 4200000.0), pixel=0.5, size=(40, 56))
    rc = main(["predict", "--run", str(run), "--input", str(scene), "--out", str(tmp_path / "pred"), "--overlap", "8",
               "--probs", "--device", "cpu"])
    assert rc == 0
    with tifffile.TiffFile(scene) as src, tifffile.TiffFile(tmp_path / "pred" / "scene_classes.tif") as dst:
        src_tags = {c: src.pages[0].tags[c].value for c in GEO_TAGS if c in src.pages[0].tags}
        dst_tags = {c: dst.pages[0].tags[c].value for c in GEO_TAGS if c in dst.pages[0].tags}
        classes = dst.asarray()
    assert src_tags and dst_tags == src_tags
    assert classes.shape == (40, 56) and classes.dtype == np.uint8 and classes.max() < 3
    probs = tifffile.imread(tmp_path / "pred" / "scene_probs.tif")
    assert probs.shape == (3, 40, 56)
    np.testing.assert_allclose(probs.astype(float).sum(0), 255, atol=3)


def test_predict_on_a_chip_that_fits_is_the_model_forward(tmp_path):
    run = _train(tmp_path, head="upernet")
    chip = tmp_path / "data" / "images" / "chip0.png"
    args = ["predict", "--run", str(run), "--input", str(chip), "--out", str(tmp_path / "p"), "--device", "cpu"]
    assert main(args) == 0
    got = np.asarray(Image.open(tmp_path / "p" / "chip0_classes.png"))
    model, info = load_segmenter(run)
    x = torch.from_numpy(np.asarray(Image.open(chip).convert("RGB")).transpose(2, 0, 1).copy())[None].float() / 255
    mean, std = torch.tensor(info["mean"]).view(1, -1, 1, 1), torch.tensor(info["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        ref = model((x - mean) / std).argmax(1)[0].numpy()
    assert (got == ref).mean() > 0.999  # equal up to argmax ties within fp32 noise
