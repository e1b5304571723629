"""Flags, --help and presets generated from the command config dataclasses (explora.cli.config_args)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

from explora.cli.config_args import build
from explora.cli.main import build_parser, main
from explora.core.errors import ConfigError
from explora.models.adapt import PRESETS
from explora.recipes.evaluate import LinprobeConfig
from explora.recipes.export_config import ExportConfig, ParamsConfig

REQUIRED = ["--backbone", "test_dinov2", "--data", "imagefolder:/x", "--out", "o"]


def test_flags_come_from_the_fields():
    cfg = build(LinprobeConfig, [*REQUIRED, "--lrs", "0.1", "1e-3", "--bf16", "--weights", "0123", "epochs=3"])
    assert cfg.lrs == (0.1, 1e-3) and cfg.bf16 and cfg.epochs == 3 and cfg.weights == "0123"  # strings stay strings
    assert build(LinprobeConfig, [*REQUIRED, "--lrs", "0.1,0.2", "--no-bf16"]).lrs == (0.1, 0.2)


def test_flags_yaml_and_overrides_compose(tmp_path):
    (tmp_path / "lp.yaml").write_text("backbone: test_mae\nepochs: 4\nseed: 2\n")
    cfg = build(LinprobeConfig, ["--config", str(tmp_path / "lp.yaml"), *REQUIRED[2:], "--epochs", "5", "seed=7"])
    assert (cfg.backbone, cfg.epochs, cfg.seed) == ("test_mae", 5, 7)


def test_unknown_and_missing_keys_name_the_fix():
    with pytest.raises(ConfigError, match="unknown key 'epoch'.*Did you mean 'epochs'"):
        build(LinprobeConfig, [*REQUIRED, "epoch=3"])
    with pytest.raises(ConfigError, match="backbone is required"):
        build(LinprobeConfig, ["--data", "x", "--out", "o"])


def test_spec_section_flags_are_flattened():
    cfg = build(ParamsConfig, ["--preset", "D-[L]-r64-official", "--lora-rank", "8", "--unfrozen-blocks", "0,-1"],
                flatten=("adapt",), config_file=False)
    assert cfg.adapt.lora_alpha == PRESETS["D-[L]-r64-official"].lora_alpha == 1.0
    assert (cfg.adapt.lora_rank, cfg.adapt.unfrozen_blocks) == (8, (0, -1))
    assert build(ParamsConfig, [], flatten=("adapt",), config_file=False).adapt == PRESETS["D-[L]-r64"]
    assert build(ExportConfig, ["--model", "m", "--weights", "w", "--out", "o"], flatten=("adapt",)).adapt is None
    none = build(ParamsConfig, ["--unfrozen-blocks", ""], flatten=("adapt",), config_file=False)
    assert none.adapt.unfrozen_blocks == ()


def test_help_lists_the_nested_keys(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "adapt.lora_rank=int  (default: 64)" in out and "train.steps=" in out


def test_presets_list_and_load_by_name(capsys):
    from explora.recipes.pretrain import load_config

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "official_dinov2_vitl14_fmow" in out and "D-[L]-r64-official" in out
    assert load_config("dinov2_vits14_cpu").model.name == "dinov2_vits14"
    with pytest.raises(ConfigError, match="Did you mean the preset 'dinov2_vits14_cpu'"):
        load_config("dinov2_vits14_cpuu")


def test_quiet_and_verbose_set_the_level(monkeypatch):
    import logging

    seen = []
    monkeypatch.setattr("explora.cli.pretrain._presets", lambda args: seen.append(logging.getLogger("explora").level))
    assert main(["-q", "presets"]) == 0 and main(["--verbose", "presets"]) == 0
    assert seen == [logging.WARNING, logging.DEBUG]


def test_a_closed_pipe_ends_the_listing_quietly():
    """``explora presets | head -1``: the reader stops early; explora exits 0 without a BrokenPipeError trace."""
    proc = subprocess.Popen([sys.executable, "-m", "explora", "presets"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err
