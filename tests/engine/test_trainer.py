"""The loop on a small objective of its own: resume equality, divergence guards, frozen tensors kept out of ckpts."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from explora.core.errors import CheckpointError, DivergenceError
from explora.engine.trainer import OptimConfig, TrainConfig, train, training_state
from explora.objectives.base import Objective, ObjectiveOutput


class NoisyTransform:
    def __call__(self, images, g):
        x = images.float().flatten(1)
        return {"x": x + 0.1 * torch.randn(x.shape, generator=g)}


class ToyObjective(Objective):
    """Regress a fixed random projection; a frozen first layer, dropout (global RNG), an EMA copy."""

    def __init__(self, fail_at: int | None = None, nan_from: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(12, 16), nn.Linear(16, 4)])
        self.blocks[0].requires_grad_(False)
        self.drop = nn.Dropout(0.2)
        self.register_buffer("ema", torch.zeros(4, 16))
        self.fail_at, self.nan_from = fail_at, nan_from

    def batch_transform(self):
        return NoisyTransform()

    def forward(self, batch, step):
        if self.fail_at is not None and step == self.fail_at:
            raise RuntimeError("simulated crash")
        h = self.drop(torch.relu(self.blocks[0](batch["x"])))
        loss = (self.blocks[1](h) - batch["x"][:, :4]).pow(2).mean()
        if self.nan_from is not None and step >= self.nan_from:
            loss = loss * float("nan")
        return ObjectiveOutput(loss, {"mse": loss.detach()})

    def on_optimizer_step(self, step):
        self.ema.lerp_(self.blocks[1].weight.detach(), 0.1)


class Data(torch.utils.data.Dataset):
    def __init__(self, n=40):
        self.x = torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], -1


def _cfg(**kw):
    base = dict(steps=12, batch_size=4, ckpt_every=4, log_every=1, num_workers=0, precision="fp32", tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def _optim():
    return OptimConfig(base_lr=1e-2, lr_scaling="none", warmup_steps=2, layer_decay=1.0)


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [(float(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_resume_after_crash_equals_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    ref = ToyObjective()
    train(ref, Data(), _optim(), _cfg(), tmp_path / "ref")

    torch.manual_seed(0)
    crashed = ToyObjective(fail_at=7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, Data(), _optim(), _cfg(), tmp_path / "run")
    torch.manual_seed(0)
    resumed = ToyObjective()  # fresh process: same construction, state from the checkpoint at step 4
    train(resumed, Data(), _optim(), _cfg(), tmp_path / "run", resume=True)

    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert _losses(tmp_path / "ref") == _losses(tmp_path / "run")


def test_checkpoints_leave_out_frozen_weights(tmp_path):
    obj = ToyObjective()
    state = training_state(obj)
    assert "blocks.0.weight" not in state and "blocks.1.weight" in state and "ema" in state


def test_frozen_state_names_are_the_frozen_parameters_unless_recorded():
    obj = ToyObjective()
    assert obj.frozen_state_names() == {"blocks.0.weight", "blocks.0.bias"}
    obj.record_frozen([obj.blocks[0].weight])  # e.g. the bias was frozen by the objective itself: checkpointed
    assert obj.frozen_state_names() == {"blocks.0.weight"}
    assert "blocks.0.bias" in training_state(obj) and "blocks.0.weight" not in training_state(obj)


def test_resume_with_other_trainable_tensors_names_the_checkpoint(tmp_path):
    train(ToyObjective(), Data(), _optim(), _cfg(steps=4), tmp_path / "run")
    other = ToyObjective()
    other.blocks[1].bias.requires_grad_(False)  # e.g. a checkpoint written before a tensor became trainable
    with pytest.raises(CheckpointError, match=r"ckpt-00000004\.pt: its optimiser state does not match .*tensors"):
        train(other, Data(), _optim(), _cfg(steps=8), tmp_path / "run", resume=True)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    obj = ToyObjective(nan_from=6)
    with pytest.raises(DivergenceError, match=r"3 steps in a row up to step 8 had non-finite loss.*mse="):
        train(obj, Data(), _optim(), _cfg(max_nonfinite_steps=3), tmp_path)
    # the checkpoint at step 4 is intact and nothing was written after the divergence started
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["ckpt-00000004.pt"]
