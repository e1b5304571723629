"""``run_segment`` through the engine: metrics, report files, best checkpoint by mIoU, exact resume."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from data_fixtures import seg_folder
from safetensors.torch import load_file

from explora.core.errors import DataError
from explora.data import build_dataset
from explora.engine.trainer import TrainConfig
from explora.eval.report import load_runs, markdown_table
from explora.models.backbone import build_backbone
from explora.recipes.segment import run_segment

PNG = b"\x89PNG\r\n\x1a\n"


def _run(root, out, head="linear", mode="lora", steps=4, resume=False):
    torch.manual_seed(0)
    ds = build_dataset(f"seg_folder:{root}:classes=3")
    cfg = TrainConfig(steps=steps, batch_size=2, num_workers=0, precision="fp32", tensorboard=False, ckpt_every=2,
                      eval_every=2, log_every=1)
    return run_segment(build_backbone("test_dinov2"), ds, ds, out, image_size=32, mode=mode, head=head,
                       train_cfg=cfg, resume=resume)


def test_segment_writes_metrics_report_and_best(tmp_path):
    seg_folder(tmp_path / "data", n=4, classes=3)
    m = _run(tmp_path / "data", tmp_path / "run", head="upernet", mode="frozen")
    assert m["protocol"] == "segment-frozen-upernet" and m["blocks"] == [0, 1, 2, 3] and m["steps"] == 4
    assert m["trainable"]["backbone"] == 0 and m["trainable"]["head"] > 0
    assert 0.0 <= m["miou"] <= 100.0 and len(m["per_class_iou"]) == 3
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["miou"] == m["miou"] and saved["class_names"] == ["0", "1", "2"]
    for name in ("confusion_matrix.png", "per_class_iou.png", "overlays.png"):
        assert (run / name).read_bytes()[:8] == PNG
    assert "| class | IoU | F1 |" in (run / "report.md").read_text()
    history = json.loads((run / "eval_history.json").read_text())
    assert [h["step"] for h in history] == [2, 4]
    best = json.loads((run / "best" / "metrics.json").read_text())
    assert best["miou"] == max(h["miou"] for h in history)
    state = load_file(run / "best" / "model.safetensors")
    assert "head.classifier.weight" in state and not any("lora_" in k for k in state)
    encoder = timm.create_model(f"local-dir:{run / 'best' / 'encoder'}", pretrained=True)  # the encoder alone
    torch.testing.assert_close(encoder.state_dict()["norm.weight"], state["backbone.norm.weight"])
    card = (run / "best" / "encoder" / "README.md").read_text()
    assert "library_name: timm" in card and f"{m['miou']:.2f}" in card
    rows = markdown_table(load_runs([run])).splitlines()
    assert "mIoU" in rows[0] and f"| {m['miou']:.2f} |" in rows[2]


def test_segment_resume_is_exact(tmp_path):
    seg_folder(tmp_path / "data", n=4, classes=3)
    ref = _run(tmp_path / "data", tmp_path / "ref")
    _run(tmp_path / "data", tmp_path / "cut")
    for p in (tmp_path / "cut" / "checkpoints").glob("ckpt-00000004.*"):
        p.unlink()
    resumed = _run(tmp_path / "data", tmp_path / "cut", resume=True)
    assert resumed["miou"] == ref["miou"] and resumed["confusion_matrix"] == ref["confusion_matrix"]
    assert resumed["best_step"] == ref["best_step"]


def test_segment_refuses_image_label_data(tmp_path):
    from data_fixtures import image_folder

    image_folder(tmp_path / "cls")
    ds = build_dataset(f"imagefolder:{tmp_path / 'cls'}", image_size=32)
    with pytest.raises(DataError, match="needs \\(image, mask\\) pairs"):
        run_segment(build_backbone("test_dinov2"), ds, ds, tmp_path / "out", image_size=32)
