from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from explora.engine.config import from_dict, load_yaml, merge_overrides, parse_override, save_yaml
from explora.engine.trainer import OptimConfig, TrainConfig
from explora.errors import ConfigError


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
