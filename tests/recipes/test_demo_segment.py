"""The demo's optional segmentation part: frozen encoders under a linear head, numbers in the report."""

from __future__ import annotations

import json
from dataclasses import replace

from data_fixtures import idx_files, seg_folder

from explora.recipes.demo.run import DemoConfig, run_demo


def test_demo_with_a_dense_dataset_adds_a_segmentation_section(tmp_path):
    idx_files(tmp_path / "fm", n=32, prefix="train")
    idx_files(tmp_path / "fm", n=16, prefix="t10k")
    seg_folder(tmp_path / "seg", n=4, classes=2)
    cfg = replace(DemoConfig.smoke(out=str(tmp_path / "out"), data=f"fashion_mnist:{tmp_path / 'fm'}:rgb=true"),
                  variants=("explora",), seg_data=f"seg_folder:{tmp_path / 'seg'}:classes=2", seg_steps=2,
                  seg_batch_size=2)
    report = run_demo(cfg).read_text()
    assert "## Segmentation (frozen encoder, linear head)" in report
    for name, label in (("frozen", "DinoV2 (frozen)"), ("explora", "ExPLoRA")):
        m = json.loads((tmp_path / "out" / "seg" / name / "metrics.json").read_text())
        assert m["protocol"] == "segment-frozen-linear" and m["trainable"]["backbone"] == 0
        row = next(line for line in report.splitlines() if line.startswith(f"| {label}") and "±" in line)
        assert f"| {m['miou']:.2f} |" in row
