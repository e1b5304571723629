from __future__ import annotations

import pytest
import torch

from explora.core.errors import DataError
from explora.core.schedules import cosine, linspace_warmup, scaled_lr, warmup_cosine
from explora.engine.loader import StepBatchSampler


def test_resumed_sampler_continues_the_same_order():
    full = list(StepBatchSampler(50, 4, 30, seed=3))
    resumed = list(StepBatchSampler(50, 4, 30, seed=3, start_step=17))
    assert resumed == full[17:]
    # each epoch (12 steps of 4) visits distinct samples
    first_epoch = [i for batch in full[:12] for i, _ in batch]
    assert len(set(first_epoch)) == 48


def test_ranks_split_the_global_batch():
    r0 = list(StepBatchSampler(40, 4, 5, seed=0, rank=0, world_size=2))
    r1 = list(StepBatchSampler(40, 4, 5, seed=0, rank=1, world_size=2))
    single = list(StepBatchSampler(40, 8, 5, seed=0))
    for a, b, s in zip(r0, r1, single):
        assert [i for i, _ in a] + [i for i, _ in b] == [i for i, _ in s]
        assert a[0][1] != b[0][1]  # different augmentation seeds per rank


def test_dataset_smaller_than_batch():
    with pytest.raises(DataError, match="dataset has 3 samples but one step needs 8"):
        StepBatchSampler(3, 4, 10, seed=0, world_size=2)


def test_schedules():
    assert warmup_cosine(0, 100, 1.0, 0.0, warmup_steps=10) == 0.0
    assert warmup_cosine(10, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.1)
    assert warmup_cosine(55, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.5)
    assert linspace_warmup(15, 31, 0.04, 0.07) == pytest.approx(0.055)
    assert linspace_warmup(30, 31, 0.04, 0.07) == 0.07 and linspace_warmup(0, 1, 0.04, 0.07) == 0.04
    assert cosine(0, 100, 0.992, 1.0) == 0.992 and cosine(100, 100, 0.992, 1.0) == 1.0
    assert cosine(50, 100, 0.992, 1.0) == pytest.approx(0.996) and cosine(200, 100, 0.992, 1.0) == 1.0
    assert scaled_lr(4e-3, 256, 1024, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(1.5e-4, 512, 256, "linear") == pytest.approx(3e-4)
    assert torch.tensor(1.0).item() == 1.0


def test_auto_precision_follows_the_hardware(monkeypatch):
    from explora.core import precision as P

    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: False)
    assert P.resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: True)
    assert P.resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert P.resolve_precision("fp32", torch.device("cpu")) == "fp32"
