"""Experiment trackers (`train.loggers`): W&B and MLflow get every row the CSV gets, continue their run on resume,
and a missing package is a ConfigError naming the extra. The CSV stays the record.

The fake-module tests run everywhere; the real-package tests run wandb in offline mode and MLflow on a local store
when those packages are installed, and skip otherwise."""

from __future__ import annotations

import csv
import sys
import types

import pytest

from explora.core.errors import ConfigError
from explora.engine.logs import MetricLogger
from explora.engine.trainer import TrainConfig


def _fake_wandb(calls: list) -> types.ModuleType:
    mod = types.ModuleType("wandb")

    class Run:
        def log(self, values, step):
            calls.append(("log", step, dict(values)))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    mod.init = init
    return mod


def _rows(logger: MetricLogger, steps: range) -> None:
    for s in steps:
        logger.log(s, {"loss": 1.0 / (s + 1), "lr": 0.1})
    logger.close()


def test_wandb_gets_every_row_and_resumes_the_same_run(tmp_path, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    _rows(MetricLogger(tmp_path, 0, 4, tensorboard=False, trackers=["wandb"], config={"train.steps": 4}), range(3))
    init = calls[0][1]
    assert init["id"] == (tmp_path / "wandb_run_id").read_text().strip() and init["resume"] == "allow"
    assert init["config"] == {"train.steps": 4}
    assert [c[1] for c in calls if c[0] == "log"] == [0, 1, 2] and calls[-1] == ("finish",)
    calls.clear()
    _rows(MetricLogger(tmp_path, 2, 4, tensorboard=False, trackers=["wandb"]), range(2, 4))  # resumed at step 2
    assert calls[0][1]["id"] == init["id"] and [c[1] for c in calls if c[0] == "log"] == [2, 3]
    with open(tmp_path / "metrics.csv", newline="") as f:  # the CSV, cut back at the resume step: the record
        assert [float(r["step"]) for r in csv.DictReader(f)] == [0, 1, 2, 3]


def test_missing_tracker_and_unknown_names_are_config_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import fails as for an absent package
    with pytest.raises(ConfigError, match=r"explora\[mlflow\]"):
        MetricLogger(tmp_path, 0, 2, tensorboard=False, trackers=["mlflow"])
    with pytest.raises(ConfigError, match="train.loggers"):
        TrainConfig(loggers=["tensorbored"]).validate()
    cfg = TrainConfig(loggers=["csv", "wandb", "tensorboard", "wandb"])
    assert cfg.trackers() == ["wandb"] and cfg.use_tensorboard()
    assert not TrainConfig(loggers=["csv"]).use_tensorboard() and not TrainConfig(tensorboard=False).use_tensorboard()
    from explora.recipes.pretrain import load_config

    assert load_config(None, ["train.loggers=[tensorboard,mlflow]"]).train.trackers() == ["mlflow"]  # a config key


def test_real_wandb_offline(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    _rows(MetricLogger(tmp_path, 0, 3, tensorboard=False, trackers=["wandb"], config={"a": 1}), range(3))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert any(p.name.endswith(run_id) for p in (tmp_path / "wandb").glob("offline-run-*"))


def test_real_mlflow_local_store(tmp_path, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _rows(MetricLogger(tmp_path, 0, 3, tensorboard=False, trackers=["mlflow"], config={"a": 1}), range(3))
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2] and history[-1].value == pytest.approx(1 / 3)
