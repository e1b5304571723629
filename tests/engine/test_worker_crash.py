"""Data robustness of the engine: a data-loader worker that dies, and unreadable samples under on_error=skip.

A worker crash (OOM kill, a segfault in a decoder) must not end a multi-hour run: the loop rebuilds the loader at the
current step (the data order is a function of (seed, step)), so the final weights equal an uninterrupted run's.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from data_fixtures import image_folder, truncate
from log_capture import explora_log
from torch import nn
from torch.utils.data import Dataset, get_worker_info

from explora.cli.main import main
from explora.core.errors import DataError
from explora.engine.trainer import OptimConfig, TrainConfig, train
from explora.objectives.base import Objective, ObjectiveOutput


class Noisy:
    """Batch transform drawing from the batch's own generator (as the real objectives do)."""

    def __call__(self, images, g):
        x = images.float().flatten(1)  # (B, 12)
        return {"x": x + 0.1 * torch.randn(x.shape, generator=g)}


class Toy(Objective):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(12, 16), nn.Linear(16, 4)])
        self.drop = nn.Dropout(0.2)  # draws from the global RNG of the main process

    def batch_transform(self):
        return Noisy()

    def forward(self, batch, step):
        h = self.drop(torch.relu(self.blocks[0](batch["x"])))  # (B, 16)
        loss = (self.blocks[1](h) - batch["x"][:, :4]).pow(2).mean()
        return ObjectiveOutput(loss, {"mse": loss.detach()})


class CrashingData(Dataset):
    """Reading sample ``crash_at`` inside a worker kills the worker (``os._exit``): once, or every time."""

    def __init__(self, marker: Path | None = None, crash_at: int = 5, always: bool = False, n: int = 40) -> None:
        self.x = torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(1))
        self.marker, self.crash_at, self.always = marker, crash_at, always

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        crash = self.marker is not None and i == self.crash_at and get_worker_info() is not None
        if crash and (self.always or not self.marker.exists()):
            self.marker.touch()
            os._exit(1)
        return self.x[i], -1


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=4, ckpt_every=6, log_every=1, num_workers=0, precision="fp32",
                tensorboard=False)
    return TrainConfig(**{**base, **kw})


def _optim() -> OptimConfig:
    return OptimConfig(base_lr=1e-2, lr_scaling="none", warmup_steps=2, layer_decay=1.0)


def _losses(run: Path) -> list[tuple[float, float]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(float(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_crashed_worker_is_replaced_and_weights_equal_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    ref = Toy()
    train(ref, CrashingData(), _optim(), _cfg(), tmp_path / "ref")

    marker = tmp_path / "crashed"
    torch.manual_seed(0)
    obj = Toy()
    with explora_log() as messages:
        result = train(obj, CrashingData(marker), _optim(), _cfg(num_workers=1), tmp_path / "run")
    assert marker.exists(), "the worker never reached the crashing sample"
    assert result.loader_restarts == 1 and result.steps_done == 12
    out = "\n".join(messages)
    assert "data-loader worker crashed" in out and "restart 1/3" in out
    for (k, a), b in zip(ref.state_dict().items(), obj.state_dict().values()):
        assert torch.equal(a, b), k
    assert _losses(tmp_path / "ref") == _losses(tmp_path / "run")


def test_crash_inside_an_accumulated_step_rebuilds_at_that_micro_batch(tmp_path):
    """The crashing sample sits in the 2nd micro-batch of a step: the loader is rebuilt in the middle of the step,
    the step's gradients so far are kept, and the weights equal the uninterrupted run's."""
    from explora.engine.loader import StepBatchSampler

    order = list(StepBatchSampler(40, 2, 12, seed=0, accum_steps=2))  # micro-batches, step-major
    crash_at = order[2 * 3 + 1][0][0]  # first sample of micro-batch 1 of step 3
    torch.manual_seed(0)
    ref = Toy()
    train(ref, CrashingData(crash_at=crash_at), _optim(), _cfg(batch_size=2, accum_steps=2), tmp_path / "ref")
    marker = tmp_path / "crashed"
    torch.manual_seed(0)
    obj = Toy()
    result = train(obj, CrashingData(marker, crash_at=crash_at), _optim(),
                   _cfg(batch_size=2, accum_steps=2, num_workers=1), tmp_path / "run")
    assert marker.exists() and result.loader_restarts == 1 and result.steps_done == 12
    for (k, a), b in zip(ref.state_dict().items(), obj.state_dict().values()):
        assert torch.equal(a, b), k
    assert _losses(tmp_path / "ref") == _losses(tmp_path / "run")


def test_worker_that_keeps_crashing_stops_the_run_with_a_named_error(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(DataError, match=r"worker died 2 times.*train.max_loader_restarts=1.*num_workers=0"):
        train(Toy(), CrashingData(tmp_path / "m", always=True), _optim(),
              _cfg(num_workers=1, max_loader_restarts=1), tmp_path / "run")


def test_skip_mode_survives_a_corrupt_sample_and_reports_the_count(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs", per_class=4)  # 8 RGB pngs, 16x20
    truncate(root / "cat" / "cat_2.png", keep=0.3)
    out = tmp_path / "run"
    argv = ["pretrain", "model.name=test_dinov2", "model.weights=null", "data.image_size=32",
            "dinov2.n_prototypes=64", "dinov2.hidden_dim=32", "dinov2.bottleneck_dim=16", "dinov2.global_size=32",
            "dinov2.local_size=16", "dinov2.n_local=2", "train.batch_size=4", "train.num_workers=0",
            "train.log_every=1", "train.tensorboard=false", "train.precision=fp32", "train.steps=2",
            "train.ckpt_every=2", f"data.spec=imagefolder:{root}", "data.on_error=skip", f"output_dir={out}"]
    with explora_log() as messages:
        assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_samples"] >= 1 and summary["loader_restarts"] == 0
    with open(out / "metrics.csv", newline="") as f:
        counts = [int(float(r["skipped_samples"])) for r in csv.DictReader(f)]
    assert counts[-1] == summary["skipped_samples"] and counts == sorted(counts)
    assert any("samples skipped so far (data.on_error=skip)" in m for m in messages)
    capsys.readouterr()

    # the same corrupt file with the default policy ends the run with the file named, in one paragraph
    assert main([*argv[:-2], "train.num_workers=1", "data.on_error=raise", f"output_dir={tmp_path / 'r2'}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cat_2.png: unreadable or truncated image" in err and "Traceback" not in err
