"""Spec parsing, statistics, the check report, the `explora data` commands and loader defaults."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import tifffile
import torch
from data_fixtures import fmow_rgb, image_folder, truncate

from explora.cli.data import add_commands
from explora.core.errors import ConfigError
from explora.data.base import resize_square
from explora.data.check import check_dataset
from explora.data.specs import build_dataset, parse_spec
from explora.data.stats import BandMoments, compute_stats


def test_parse_spec_forms():
    assert parse_spec("fmow_sentinel:/d/train.csv:drop=0,9,10") == ("fmow_sentinel", ["/d/train.csv"],
                                                                    {"drop": [0, 9, 10]})
    assert parse_spec("fmow_sentinel:/d/train.csv:0,9,10")[2] == {"drop": [0, 9, 10]}
    assert parse_spec("folder:/s:chip=64,stride=32")[2] == {"chip": 64, "stride": 32}
    assert parse_spec("wilds:camelyon17:train:/root") == ("wilds", ["camelyon17", "train", "/root"], {})
    assert parse_spec("fashion_mnist:/d:rgb=true")[2] == {"rgb": True}
    with pytest.raises(ConfigError, match="chip='x'"):
        parse_spec("folder:/s:chip=x")


def test_spec_rejects_unknown_option(tmp_path):
    image_folder(tmp_path)
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_dataset(f"imagefolder:{tmp_path}:chip=3")


def test_resize_square_shorter_side_then_center_crop():
    img = torch.arange(2 * 4 * 8, dtype=torch.uint8).reshape(2, 4, 8)  # (C, H=4, W=8)
    out = resize_square(img, 4)
    assert out.shape == (2, 4, 4) and out.dtype == torch.uint8 and torch.equal(out, img[:, :, 2:6])
    assert resize_square(torch.rand(3, 10, 30), 5).shape == (3, 5, 5)


def test_band_moments_match_numpy_and_are_streaming():
    x = torch.randint(0, 256, (7, 3, 5, 6), dtype=torch.uint8)
    m = BandMoments()
    for chunk in (x[:2], x[2:3], x[3:]):
        m.update(chunk)
    ref = x.double().div(255).transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(m.result()["mean"], ref.mean(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(m.result()["std"], ref.std(1, correction=0).numpy(), rtol=1e-10)


def test_compute_stats_hand_values(tmp_path):
    # two 2-band float chips: band 0 all 0.2 / all 0.6 -> mean 0.4, std 0.2; band 1 constant 1.0 -> std 0
    for i, v in enumerate((0.2, 0.6)):
        arr = np.stack([np.full((4, 4), v), np.ones((4, 4))], axis=-1).astype(np.float32)  # (H, W, C)
        tifffile.imwrite(tmp_path / f"{i}.tif", arr, photometric="minisblack", planarconfig="contig")
    ds = build_dataset(f"folder:{tmp_path}")
    stats = compute_stats(ds, max_samples=10)
    np.testing.assert_allclose(stats["mean"], [0.4, 1.0], atol=1e-7)
    np.testing.assert_allclose(stats["std"], [0.2, 0.0], atol=1e-7)
    assert ds.mean == pytest.approx((0.4, 1.0)) and stats["samples"] == 2  # non-RGB data: computed lazily


def test_check_report_counts_and_unreadable(tmp_path):
    csv = fmow_rgb(tmp_path, n=4)
    csv.write_text(csv.read_text() + "77,nope.jpg\n")
    truncate(tmp_path / "train/airport/airport_0/airport_0_0_rgb.jpg", 0.3)
    ds = build_dataset(f"fmow:{csv}", on_error="skip")
    report = check_dataset(ds, split="train")
    assert report.samples == 4 and report.checked == 3 and not report.clean
    assert report.counts == {"airport_hangar": 1, "airport_terminal": 1, "amusement_park": 1}
    assert report.bands == {3: 3} and report.dtypes == {"uint8": 3} and report.sizes == {"40x48": 3}
    assert len(report.unreadable) == 2 and "row 6" in report.unreadable[0] and "airport_0" in report.unreadable[1]
    assert len(report.stats["mean"]) == 3


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="explora")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_check_and_stats(tmp_path, capsys):
    image_folder(tmp_path / "ok")
    assert _run_cli(["data", "check", f"imagefolder:{tmp_path / 'ok'}", "--json"]) == 0
    [report] = json.loads(capsys.readouterr().out)
    assert report["clean"] and report["counts"] == {"cat": 3, "dog": 3}
    truncate(tmp_path / "ok" / "cat" / "cat_1.png", 0.3)
    assert _run_cli(["data", "check", f"imagefolder:{tmp_path / 'ok'}"]) == 1
    out = capsys.readouterr().out
    assert "cat_1.png" in out and "NOT clean" in out
    assert _run_cli(["data", "check", f"imagefolde:{tmp_path}"]) == 2
    assert "did you mean 'imagefolder'" in capsys.readouterr().err
    assert _run_cli(["data", "stats", f"imagefolder:{tmp_path / 'ok'}", "--max-samples", "2"]) == 2  # raise mode
    image_folder(tmp_path / "ok2")
    assert _run_cli(["data", "stats", f"imagefolder:{tmp_path / 'ok2'}"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["in_chans"] == 3 and len(stats["std"]) == 3 and stats["samples"] == 6
