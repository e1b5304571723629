from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from explora.core.config import from_dict, load_yaml, merge_overrides, parse_override, save_yaml
from explora.core.errors import ConfigError
from explora.engine.trainer import OptimConfig, TrainConfig


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"unknown key 'stesp'.*Did you mean 'steps'"):
        from_dict(TrainConfig, {"stesp": 10})


def test_wrong_type_names_field_and_expectation():
    with pytest.raises(ConfigError, match=r"config.batch_size: got 'many', expected an integer"):
        from_dict(TrainConfig, {"batch_size": "many"})
    with pytest.raises(ConfigError, match=r"precision: got 'fp16', expected one of"):
        from_dict(TrainConfig, {"precision": "fp16"})


def test_range_validation():
    with pytest.raises(ConfigError, match=r"train.steps: got 0"):
        from_dict(TrainConfig, {"steps": 0})
    with pytest.raises(ConfigError, match=r"optim.layer_decay"):
        from_dict(OptimConfig, {"layer_decay": 1.5})


def test_overrides_are_parsed_as_yaml():
    data = merge_overrides({"train": {"steps": 5}}, ["train.steps=12", "optim.betas=[0.9,0.95]", "a.b.c=null"])
    assert data == {"train": {"steps": 12}, "optim": {"betas": [0.9, 0.95]}, "a": {"b": {"c": None}}}
    cfg = from_dict(OptimConfig, data["optim"])
    assert cfg.betas == (0.9, 0.95)


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.steps")


def test_yaml_round_trip_and_base(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 7\nbatch_size: 3\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nbatch_size: 4\n")
    cfg = from_dict(TrainConfig, load_yaml(tmp_path / "child.yaml"))
    assert (cfg.steps, cfg.batch_size) == (7, 4)
    save_yaml(cfg, tmp_path / "out.yaml")
    assert from_dict(TrainConfig, load_yaml(tmp_path / "out.yaml")) == cfg


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "code.yaml").write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError):
        load_yaml(tmp_path / "code.yaml")


@given(st.dictionaries(st.text(min_size=1, max_size=12), st.one_of(st.integers(), st.text(), st.floats(), st.none())))
def test_config_parsing_never_crashes_with_foreign_errors(data):
    with contextlib.suppress(ConfigError):
        from_dict(TrainConfig, data)


# -- lengths: accumulation, epochs, default warm-up and freeze (explora.engine.lengths) ----------------------------


def test_effective_batch_gives_the_accumulation():
    from explora.engine.lengths import accumulation_steps

    assert accumulation_steps(16, 4, 1, 1024) == 16  # ExPLoRA DinoV2: 8/GPU x 4 GPUs x 32 = 1024
    assert accumulation_steps(16, 4, 16, 1024) == 16  # both given and consistent
    assert accumulation_steps(16, 4, 3, None) == 3
    with pytest.raises(ConfigError, match=r"effective_batch 1000 is not a multiple of train.batch_size 16 x 4 proc"):
        accumulation_steps(16, 4, 1, 1000)
    with pytest.raises(ConfigError, match=r"effective_batch 32 is not a multiple"):
        accumulation_steps(16, 4, 1, 32)  # smaller than one micro-step
    with pytest.raises(ConfigError, match=r"accum_steps 8 disagrees with train.effective_batch 1024"):
        accumulation_steps(16, 4, 8, 1024)


def _resolved(train: dict, optim: dict | None = None, n: int = 1000, world: int = 1):
    from explora.engine.lengths import resolve_lengths

    return resolve_lengths(from_dict(OptimConfig, optim or {}), from_dict(TrainConfig, train), n, world)


def test_epochs_become_optimiser_steps_at_the_effective_batch():
    # 1000 samples / (16 x 2 processes x 2 micro-batches = 64) = 15.625 steps per epoch
    optim, train = _resolved({"epochs": 2.5, "batch_size": 16, "accum_steps": 2}, {"warmup_epochs": 1}, world=2)
    assert (train.steps, train.epochs, train.accum_steps) == (40, None, 2)  # ceil(39.06)
    assert (optim.warmup_steps, optim.warmup_epochs) == (16, None)  # ceil(15.625)
    assert optim.freeze_last_layer_steps == 0  # default 1 % of 40 steps
    assert _resolved({"epochs": 0.3, "batch_size": 100}, n=1000)[1].steps == 3  # 3.0000000000000004 -> 3
    # resolving again changes nothing
    assert _resolved({"steps": 40, "batch_size": 16, "effective_batch": 64}, world=2)[1].accum_steps == 2


def test_default_warmup_and_freeze_follow_dinov2_proportions():
    optim, train = _resolved({"steps": 125000})
    assert (optim.warmup_steps, optim.freeze_last_layer_steps) == (12500, 1250)  # 10 and 1 of 100 epochs
    optim, _ = _resolved({"steps": 125000}, {"warmup_steps": 0, "freeze_last_layer_steps": 0})
    assert (optim.warmup_steps, optim.freeze_last_layer_steps) == (0, 0)  # an explicit 0 disables
    # DinoV2's epoch of 1250 iterations (OFFICIAL_EPOCH_LENGTH) as the epoch length
    optim, train = _resolved({"epochs": 100, "steps_per_epoch": 1250},
                             {"warmup_epochs": 10, "freeze_last_layer_epochs": 1})
    assert (train.steps, optim.warmup_steps, optim.freeze_last_layer_steps) == (125000, 12500, 1250)


def test_steps_default_and_conflicts():
    assert TrainConfig().steps == 1000 and TrainConfig(epochs=2).steps is None
    with pytest.raises(ConfigError, match=r"train.steps \(10\) and train.epochs \(2.0\) are both set.*steps=null"):
        from_dict(TrainConfig, {"steps": 10, "epochs": 2})
    with pytest.raises(ConfigError, match=r"optim.warmup_steps \(5\) and optim.warmup_epochs \(1.0\) are both set"):
        from_dict(OptimConfig, {"warmup_steps": 5, "warmup_epochs": 1})
    with pytest.raises(ConfigError, match=r"train.accum_steps: got 0"):
        from_dict(TrainConfig, {"accum_steps": 0})
    with pytest.raises(ConfigError, match=r"train.epochs: got -1"):
        from_dict(TrainConfig, {"epochs": -1, "steps": None})


def test_a_base_config_in_steps_overridden_with_epochs_asks_to_unset_steps(tmp_path):
    from explora.recipes.pretrain import load_config

    (tmp_path / "run.yaml").write_text("train:\n  steps: 500\n")
    with pytest.raises(ConfigError, match=r"both set.*train.steps=null"):
        load_config(tmp_path / "run.yaml", ["train.epochs=3"])
    assert load_config(tmp_path / "run.yaml", ["train.epochs=3", "train.steps=null"]).train.epochs == 3


# -- OmegaConf mechanics, atomic saving, generated help ------------------------------------------------------------


def test_override_values_use_omegaconf_grammar_and_interpolate(tmp_path):
    from explora.core.config import compose, parse_value

    assert parse_value("1e-3") == 1e-3 and parse_value("[1,2]") == [1, 2] and parse_value("") == ""
    assert parse_value("fmow:/d/train.csv") == "fmow:/d/train.csv"
    (tmp_path / "c.yaml").write_text("steps: 8\nlog_every: ${steps}\n")
    cfg = compose(TrainConfig, tmp_path / "c.yaml", ["steps=12"])
    assert (cfg.steps, cfg.log_every) == (12, 12)  # resolved after the overrides
    with pytest.raises(ConfigError, match="config"):
        compose(TrainConfig, None, ["log_every=${nope}"])


def test_save_yaml_is_atomic(tmp_path):
    path = tmp_path / "run" / "config.yaml"
    save_yaml(TrainConfig(steps=3), path)
    save_yaml(TrainConfig(steps=4), path)
    assert from_dict(TrainConfig, load_yaml(path)).steps == 4
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left behind


def test_describe_lists_every_key_with_its_comment():
    from explora.core.config import describe, field_docs
    from explora.recipes.pretrain import PretrainConfig

    rows = {key: (default, doc) for key, _, default, doc in describe(PretrainConfig)}
    assert rows["adapt.lora_rank"][0] == 64 and rows["adapt.preset"][0] == "D-[L]-r64"
    assert "adapt.depth" not in rows  # derived fields are not settings
    assert "checkpoint grid" in rows["model.img_size"][1]
    assert "per process" in field_docs(TrainConfig)["batch_size"]
