"""The prepared GPU check (benchmarks/gpu_step.py), dry-run on the CPU with a tiny model: it must not rot while no
GPU is at hand."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_step  # noqa: E402

TINY = ["--device", "cpu", "--model", "test_dinov2", "--global-size", "32", "--local-size", "16", "--n-local", "2",
        "--batch-size", "2", "--prototypes", "64", "--steps", "1", "--warmup", "1"]


def test_measure_reports_the_split_it_ran_and_its_flops(capsys):
    out = gpu_step.main([*TINY, "--variant", "view"])
    assert out["split_backward"] == "view" and out["grad_checkpointing"] is False
    assert out["tflop_per_step"] > 0 and out["images_per_s"] > 0 and out["peak_gpu_gib"] is None  # CPU: no GPU peak
    assert out["memory_choice"]["split_backward"] in ("none", "crop_size", "view")  # what auto would have picked
    assert out["machine"]["cpu_count"] >= 1
    assert '"variant": "view"' in capsys.readouterr().out  # one JSON line on stdout


def test_auto_takes_the_choice_of_explora_pretrain():
    out = gpu_step.main([*TINY, "--variant", "auto"])
    assert (out["split_backward"], out["grad_checkpointing"]) == (
        out["memory_choice"]["split_backward"], out["memory_choice"]["grad_checkpointing"])


def test_largest_batch_search_bisects_to_the_last_fitting_size(monkeypatch):
    args = gpu_step.parse_args(TINY)
    tried = []

    def fits(_args, batch_size, split, ckpt, device):
        tried.append(batch_size)
        return batch_size <= 11

    monkeypatch.setattr(gpu_step, "fits", fits)
    assert gpu_step.largest_batch(args, "none", False, None, limit=256) == 11
    assert tried == [1, 2, 4, 8, 16, 12, 10, 11]
    tried.clear()
    assert gpu_step.largest_batch(args, "none", False, None, limit=5) == 5  # never above the limit
    assert max(tried) <= 5
