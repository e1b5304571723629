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
    targets = {"speedup": ("min", 1.25), "peak_rss_ratio": ("max", 0.8), "step_memory_ratio": ("max", 0.8)}
    out = step_targets(targets, {"ours": ours, "baseline": base},
                       {"speedup": 1.01, "peak_rss_ratio": 0.85, "step_memory_ratio": 0.7}, "fp32")
    why = out["speedup"]["why"]
    assert out["speedup"]["met"] is False and "105% of the peak" in why and "1.188x" in why
    assert out["peak_rss_ratio"]["met"] is False and "800 MiB runtime" in out["peak_rss_ratio"]["why"]
    assert out["step_memory_ratio"]["met"] is True and "why" not in out["step_memory_ratio"]
    assert out["speedup_ceiling_at_equal_flops"] == 1.188


def test_peak_fraction_miss_is_named_for_the_memory_roofline_only_where_it_is_high():
    ours = {"gflop_per_step": 100.0, "fraction_of_matmul_peak": 0.2}
    base = {"gflop_per_step": 100.0, "fraction_of_matmul_peak": 0.13}
    targets = {"fraction_of_matmul_peak": ("min", 0.55)}
    high = step_targets(targets, {"ours": ours, "baseline": base}, {}, "fp32", ridge_flop_per_byte=99.3)
    assert high["fraction_of_matmul_peak"]["met"] is False and "99 FLOP per byte" in high[
        "fraction_of_matmul_peak"]["why"]
    low = step_targets(targets, {"ours": ours, "baseline": base}, {}, "fp32", ridge_flop_per_byte=9.0)
    assert low["fraction_of_matmul_peak"]["why"] == "not explained by this run's figures"


def test_targets_are_the_issues():
    """DinoV2 bf16 >= 1.25x and >= 55% of the bf16 matmul peak, MAE bf16 >= 1.2x, fp32 and fine-tuning >= 1.0x,
    peak memory <= 0.85x the baseline's."""
    from targets import FINETUNE_TARGETS

    d = PRETRAIN_TARGETS["dinov2"]
    assert d["bf16"]["speedup"] == ("min", 1.25) and d["bf16"]["fraction_of_matmul_peak"] == ("min", 0.55)
    assert d["fp32"]["speedup"] == ("min", 1.0) and FINETUNE_TARGETS["speedup"] == ("min", 1.0)
    assert PRETRAIN_TARGETS["mae"]["bf16"]["speedup"] == ("min", 1.2)
    assert PRETRAIN_TARGETS["mae"]["fp32"]["speedup"] == ("min", 1.0)
    assert all(d[p][k] == ("max", 0.85) for p in d for k in ("peak_rss_ratio", "step_memory_ratio"))


def test_machine_record_names_cpu_flags_threads_and_build():
    import torch
    from machine import BF16_FLAGS, machine

    m = machine()
    assert m["threads"] == torch.get_num_threads() and m["torch"] == torch.__version__
    assert set(m["cpu_flags"]) <= set(BF16_FLAGS) and isinstance(m["native_bf16_cpu"], bool)
    assert m["native_bf16_cpu"] == bool({"amx_bf16", "avx512_bf16"} & set(m["cpu_flags"]))
    assert m["torch_build"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and m["cpu"]
