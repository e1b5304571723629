"""metrics.json, the confusion-matrix PNG and the side-by-side report render from saved metrics."""

from __future__ import annotations

import json

import pytest
import torch

from explora.core.errors import ExploraError
from explora.eval.metrics import classification_metrics, confusion_matrix, load_metrics, save_metrics
from explora.eval.report import load_runs, markdown_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def test_classification_metrics_hand_computed():
    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 1, 2], [2, 0, 1]])  # preds 0, 1, 2, 0
    labels = torch.tensor([0, 1, 1, 2])
    m = classification_metrics(logits, labels, 4)
    assert m["top1"] == 50.0 and m["top5"] == 100.0 and m["num_samples"] == 4
    assert m["per_class_accuracy"] == [100.0, 50.0, 0.0, None]  # class 3 absent
    assert m["confusion_matrix"] == [[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    top2 = classification_metrics(logits[:, :3], labels, 3)
    assert top2["top5"] == 100.0  # k clipped to 3 classes
    assert confusion_matrix(torch.tensor([1]), torch.tensor([0]), 2).tolist() == [[0, 1], [0, 0]]


def test_save_metrics_writes_json_and_confusion_png(tmp_path):
    m = classification_metrics(torch.eye(3), torch.tensor([0, 1, 2]))
    path = save_metrics({**m, "protocol": "knn", "best_k": 20, "temperature": 0.07}, tmp_path / "run")
    assert json.loads(path.read_text())["top1"] == 100.0
    assert (tmp_path / "run" / "confusion_matrix.png").read_bytes()[:8] == PNG
    assert load_metrics(tmp_path / "run")["best_k"] == 20


def test_report_table_and_chart(tmp_path):
    runs = {
        "lp": {
            "protocol": "linear_probe",
            "top1": 77.484,
            "top5": 95.0,
            "num_samples": 10,
            "best_head": "h",
            "best_n_blocks": 4,
            "best_avgpool": True,
            "best_lr": 0.01,
        },
        "knn": {"protocol": "knn", "top1": 70.0, "top5": 90.0, "num_samples": 10, "best_k": 20, "temperature": 0.07},
        "ft": {
            "protocol": "finetune-lora",
            "top1": 79.28,
            "top5": 96.5,
            "num_samples": 10,
            "trainable": {"backbone": 786432, "head": 63550},
        },
    }
    for name, m in runs.items():
        save_metrics(m, tmp_path / name)
    table = markdown_table(load_runs([tmp_path / n for n in runs]))
    rows = table.strip().splitlines()
    assert len(rows) == 5
    assert rows[2] == "| lp | linear_probe | 77.48 | 95.00 | 10 | n=4+avgpool, lr=0.01 |"
    assert rows[3] == "| knn | knn | 70.00 | 90.00 | 10 | k=20, T=0.07 |"
    assert rows[4] == "| ft | finetune-lora | 79.28 | 96.50 | 10 | trainable 0.79M + head 0.064M |"
    out = write_report([tmp_path / n for n in runs], tmp_path / "report")
    assert out["chart"].read_bytes()[:8] == PNG
    assert "| ft | finetune-lora |" in out["markdown"].read_text()


def test_report_missing_metrics_names_the_path(tmp_path):
    with pytest.raises(ExploraError, match="metrics.json"):
        load_runs([tmp_path / "nope"])


def test_report_command(tmp_path, capsys):
    import argparse

    from explora.cli.evaluate import add_commands

    save_metrics({"protocol": "knn", "top1": 50.0, "top5": 75.0, "num_samples": 4}, tmp_path / "a")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["report", str(tmp_path / "a"), "--out", str(tmp_path / "r")])
    assert args.func(args) == 0
    assert "| a | knn | 50.00 | 75.00 | 4 |" in capsys.readouterr().out
    assert (tmp_path / "r" / "report.png").is_file()
