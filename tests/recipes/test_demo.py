"""The demo pipeline end to end on the tiny architecture and a generated IDX dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from data_fixtures import idx_files
from log_capture import explora_log

from explora.recipes.demo.run import VARIANTS, DemoConfig, run_demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    idx_files(root / "fm", n=64, prefix="train")
    idx_files(root / "fm", n=32, prefix="t10k")
    cfg = DemoConfig.smoke(out=str(root / "out"), data=f"fashion_mnist:{root / 'fm'}:rgb=true")
    return cfg, run_demo(cfg)


def test_every_artefact_is_written(demo_run):
    cfg, report = demo_run
    out = report.parent
    for name in (
        "report.md",
        "params.json",
        "results.json",
        "figures/accuracy.png",
        "figures/loss_curves.png",
        "figures/before_after.png",
    ):
        assert (out / name).is_file(), name
    for variant in ("frozen", *cfg.variants):
        assert (out / "eval" / variant / "summary.json").is_file()
    for variant in cfg.variants:
        assert (out / "runs" / variant / "metrics.csv").is_file()
        assert (out / "runs" / variant / "export" / "model.safetensors").is_file()


def test_every_number_in_the_report_comes_from_the_metrics_files(demo_run):
    _, report = demo_run
    out = report.parent
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "top-1" not in line and "---" not in line]
    params = json.loads((out / "params.json").read_text())
    checked = 0
    labels = {"frozen": "DinoV2 (frozen)", **{k: v[1] for k, v in VARIANTS.items()}}
    for name in ("frozen", "explora", "lora_only", "unfreeze_only"):
        summary = json.loads((out / "eval" / name / "summary.json").read_text())
        row = next(r for r in rows if r.startswith(f"| {labels[name]} |"))
        assert f"| {summary['linear_top1']:.2f} | {summary['knn_top1']:.2f} (k={summary['knn_best_k']}) |" in row
        assert f"{params[name]['trainable'] / 1e6:.2f}M" in row
        checked += 1
    assert checked == 4
    # every percentage-like number in the table appears in some summary
    values = {
        f"{v:.2f}"
        for name in ("frozen", "explora", "lora_only", "unfreeze_only")
        for k, v in json.loads((out / "eval" / name / "summary.json").read_text()).items()
        if k in ("linear_top1", "knn_top1")
    }
    table_numbers = set(re.findall(r"\| (\d+\.\d\d) ", "\n".join(rows)))
    assert table_numbers <= values


def test_rerun_reuses_finished_stages(demo_run):
    cfg, report = demo_run
    with explora_log() as messages:
        run_demo(cfg)
    out = "\n".join(messages)
    assert "demo: figures" in out and "demo: report" in out
    assert "pre-training:" not in out  # every variant had finished


def test_step_plan_fits_the_budget():
    from explora.recipes.demo.run import FIGURES_RESERVE_S, plan_steps

    assert FIGURES_RESERVE_S == 15.0

    cfg = DemoConfig(budget_minutes=20)
    steps = plan_steps(cfg, elapsed_s=120, eval_s=90, step_s=10)
    used = 120 + 3 * 90 + FIGURES_RESERVE_S + 3 * steps * 10
    assert steps == 26 and used <= 20 * 60  # (1200 - 120 - 270 - 15) / 30 = 26.5
    assert plan_steps(cfg, elapsed_s=1190, eval_s=90, step_s=10) == cfg.min_steps
    assert plan_steps(cfg, elapsed_s=0, eval_s=0, step_s=0.01) == cfg.max_steps
    from explora.recipes.demo.run import planned_seconds

    steps = plan_steps(cfg, elapsed_s=100, eval_s=60, step_s=2.0, setup_s=5)  # (1200-100-195-15) / 6 = 148.3
    assert steps == 148 and 1190 < planned_seconds(cfg, steps, 100, 60, 2.0, 5) <= 1200


def test_a_step_overlaps_its_transform_with_data_loader_workers():
    from explora.recipes.demo.run import overlapped_step_seconds

    assert overlapped_step_seconds(0.2, 0.5, num_workers=0) == pytest.approx(0.7)  # transform in the main process
    assert overlapped_step_seconds(0.2, 0.5, num_workers=1) == 0.5  # prefetched by a worker: the step bounds it
    assert overlapped_step_seconds(0.8, 0.5, num_workers=1) == 0.8  # a slow transform bounds it
    assert overlapped_step_seconds(0.8, 0.5, num_workers=2) == 0.5


def test_plan_and_actual_time_are_recorded(demo_run):
    cfg, report = demo_run
    plan = json.loads((Path(cfg.out) / "plan.json").read_text())
    assert len(plan["step_samples"]) == 4  # timed warm steps, the median planned with
    assert 1 <= len(plan["warmup_samples"]) <= 8  # untimed: until steps stop getting faster
    assert plan["step_seconds"] == pytest.approx(min(plan["step_samples"]), abs=2e-3)
    assert plan["transform_seconds"] > 0 and plan["compute_seconds"] > 0
    assert plan["planned_seconds"] > 0 and plan["actual_seconds"] > 0
    assert f"Planned {plan['planned_seconds'] / 60:.1f} min, took {plan['actual_seconds'] / 60:.1f} min" in \
        report.read_text()
