"""``dinov2.split_backward: auto``: the fastest setting whose predicted peak fits the device, recorded with the run."""

from __future__ import annotations

import json

import pytest
import torch

from explora.core.errors import ConfigError
from explora.objectives.dinov2 import DinoV2Config, DinoV2Objective
from explora.recipes.memory import (
    AUTO_SETTINGS,
    MIB,
    auto_choice,
    available_memory,
    choose_setting,
    estimate_pretrain_memory,
    resolve_auto_memory,
)
from explora.recipes.pretrain import load_config, resolve_memory_settings

TINY = ["model.name=test_dinov2", "model.weights=null", "train.batch_size=16", "train.precision=fp32",
        "dinov2.global_size=64", "dinov2.local_size=32", "dinov2.n_local=4", "dinov2.n_prototypes=1024",
        "dinov2.hidden_dim=128", "dinov2.bottleneck_dim=32", "dinov2.mean=[0.5,0.5,0.5]", "dinov2.std=[0.2,0.2,0.2]"]


def test_choose_setting_takes_the_first_that_fits_the_budget():
    est = [900, 600, 300]
    assert choose_setting(est, 1000, margin=0.0) == (0, True)
    assert choose_setting(est, 1000, margin=0.1) == (0, True)  # 900 <= 900: the boundary fits
    assert choose_setting(est, 1000, margin=0.2) == (1, True)
    assert choose_setting(est, 400, margin=0.25) == (2, True)
    assert choose_setting(est, 300, margin=0.2) == (2, False)  # nothing fits: the smallest, flagged
    assert choose_setting([500, 200, 300], 100) == (1, False)
    with pytest.raises(ConfigError, match="margin"):
        choose_setting(est, 1000, margin=1.0)
    with pytest.raises(ValueError):
        choose_setting([], 1000)


def test_auto_choice_follows_the_estimates():
    cfg = load_config(None, TINY)
    assert cfg.dinov2.get("split_backward", "auto") == "auto"  # the default
    roomy = auto_choice(cfg, 1 << 40, precision="fp32")
    assert (roomy["split_backward"], roomy["grad_checkpointing"], roomy["fits"]) == ("none", False, True)
    est = roomy["estimates_mib"]
    assert list(est) == ["none", "crop_size", "view", "none + checkpointing", "crop_size + checkpointing",
                         "view + checkpointing"]
    joint = estimate_pretrain_memory(load_config(None, [*TINY, "dinov2.split_backward=none"]), precision="fp32")
    assert est["none"] == round(joint.peak / MIB, 1)
    assert est["view"] < est["crop_size"] < est["none"]
    # a budget between the view and the crop_size estimates picks view
    available = int((est["view"] + est["crop_size"]) / 2 * MIB / 0.8)
    tight = auto_choice(cfg, available, precision="fp32", source="test")
    assert (tight["split_backward"], tight["grad_checkpointing"], tight["fits"]) == ("view", False, True)
    assert tight["available_source"] == "test" and tight["margin"] == 0.2
    # smaller than every estimate: the smallest, and it says it does not fit
    tiny = auto_choice(cfg, MIB, precision="fp32")
    smallest = min(est, key=est.get)
    assert not tiny["fits"] and tiny["predicted_peak_mib"] == est[smallest]


def test_auto_keeps_a_users_gradient_checkpointing():
    cfg = load_config(None, [*TINY, "model.grad_checkpointing=true"])
    choice = auto_choice(cfg, 1 << 40, precision="fp32")
    assert choice["grad_checkpointing"] and choice["split_backward"] == "none"
    assert all("checkpointing" in k for k in choice["estimates_mib"])
    assert len(choice["estimates_mib"]) == sum(c for _, c in AUTO_SETTINGS)


def test_resolve_writes_the_choice_and_leaves_explicit_modes(tmp_path):
    cpu = torch.device("cpu")
    explicit = load_config(None, [*TINY, "dinov2.split_backward=view"])
    assert resolve_auto_memory(explicit, cpu) == (explicit, None)
    mae = load_config(None, ["model.name=test_mae", "model.weights=null", "objective=mae"])
    assert resolve_auto_memory(mae, cpu)[1] is None
    resolved = resolve_memory_settings(load_config(None, TINY), cpu, tmp_path)
    saved = json.loads((tmp_path / "run_metadata.json").read_text())["memory_choice"]
    assert resolved.dinov2["split_backward"] == saved["split_backward"] in ("none", "crop_size", "view")
    assert resolved.model.grad_checkpointing == saved["grad_checkpointing"]
    available, source = available_memory(cpu)
    assert saved["available_source"] == source and available > 0
    assert saved["predicted_peak_mib"] in saved["estimates_mib"].values()


def test_objective_built_directly_with_auto_splits_by_view(tiny_dinov2):
    obj = DinoV2Objective(tiny_dinov2, DinoV2Config(n_prototypes=64, hidden_dim=32, bottleneck_dim=16, global_size=32,
                                                    local_size=16, n_local=2), total_steps=10)
    assert obj.config.split_backward == "view" and obj.backward_stages() == 3


def test_params_cli_reports_the_auto_choice_for_a_given_memory(capsys):
    import argparse

    from explora.cli.export import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["params", "--model", "test_dinov2", "--memory", "--json", "--available-gib", "1000",
                              *TINY[2:]])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    auto = out["auto_choice"]
    assert auto["split_backward"] == "none" and auto["available_source"] == "--available-gib"
    assert out["configured"]["details"]["split_backward"] == "none"
