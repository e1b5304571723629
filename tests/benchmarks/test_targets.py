"""The verdicts benchmarks print for the performance targets: met / missed, by how much, and the computed why."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from targets import PRETRAIN_TARGETS, speedup_ceiling, step_targets, verdict  # noqa: E402


def test_verdict_min_and_max_targets():
    assert verdict(1.5, "min", 1.25) == {"target": ">= 1.25", "measured": 1.5, "met": True, "shortfall": 1.2}
    missed = verdict(1.0, "min", 1.25)
    assert missed["met"] is False and missed["shortfall"] == 0.8
    assert verdict(0.9, "max", 0.8)["met"] is False and verdict(0.9, "max", 0.8)["shortfall"] == 0.889
    assert verdict(None, "max", 0.8)["met"] is None


def test_speed_miss_is_explained_by_the_matmul_ceiling():
    ours = {"gflop_per_step": 100.0, "fraction_of_matmul_peak": 0.86}
    base = {"gflop_per_step": 101.0, "fraction_of_matmul_peak": 0.85, "runtime_rss_mib": 800.0}
    assert speedup_ceiling(ours, base) == round(1.01 / 0.85, 3)
    out = step_targets(PRETRAIN_TARGETS["fp32"], {"ours": ours, "baseline": base},
                       {"speedup": 1.01, "peak_rss_ratio": 0.85, "step_memory_ratio": 0.7}, "fp32")
    why = out["speedup"]["why"]
    assert out["speedup"]["met"] is False and "105% of the peak" in why and "1.188x" in why
    assert out["peak_rss_ratio"]["met"] is False and "800 MiB runtime" in out["peak_rss_ratio"]["why"]
    assert out["step_memory_ratio"]["met"] is True and "why" not in out["step_memory_ratio"]
    assert out["speedup_ceiling_at_equal_flops"] == 1.188
