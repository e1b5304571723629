"""The two rooflines of the step benchmarks: the linear shapes a step runs, the peak at those shapes, and the
fractions of both peaks in a variant's summary."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO
from torch import nn

sys.path.insert(0, str(REPO / "benchmarks"))

from matmul_peak import measure_linear_shapes_peak  # noqa: E402
from pretrain_step import linear_shapes, summarise  # noqa: E402


def test_linear_shapes_records_rows_widths_and_calls():
    model = nn.Sequential(nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 8))
    x = torch.randn(2, 5, 8)
    shapes = linear_shapes(lambda: model(model(x)))  # each layer called twice on 2 x 5 = 10 rows
    assert shapes == [[10, 8, 24, 2], [10, 24, 8, 2]]
    assert linear_shapes(lambda: model(x)) == [[10, 8, 24, 1], [10, 24, 8, 1]]  # the hook was removed


def test_shape_peak_is_flop_weighted_and_feeds_the_summary():
    out = measure_linear_shapes_peak([[16, 8, 24, 3], [16, 24, 8, 1]], torch.float32, repeats=2, budget_s=1.0)
    assert out["threads"] == torch.get_num_threads()
    assert [s["count"] for s in out["shapes"]] == [3, 1] and all(s["gflops"] > 0 for s in out["shapes"])
    # weighted by FLOPs x count: between the slowest and the fastest shape
    lo, hi = min(s["gflops"] for s in out["shapes"]), max(s["gflops"] for s in out["shapes"])
    assert lo - 0.1 <= out["gflops"] <= hi + 0.1
    runs = [{"times": [2.0, 4.0], "flops": int(8e9), "peak_rss_mib": 10.0, "runtime_rss_mib": 5.0}]
    summary = summarise(runs, 4, peak_gflops=8.0, shape_peak={"gflops": 4.0})
    assert summary["achieved_gflops"] == pytest.approx(8 / 3, abs=1e-3)  # 8 GFLOP in the median 3 s
    assert summary["fraction_of_matmul_peak"] == pytest.approx(8 / 3 / 8, abs=1e-3)
    assert summary["fraction_of_step_shape_peak"] == pytest.approx(8 / 3 / 4, abs=1e-3)
    assert "fraction_of_step_shape_peak" not in summarise(runs, 4, peak_gflops=8.0)
