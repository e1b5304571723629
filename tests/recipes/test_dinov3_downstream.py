"""DINOv3 backbones downstream: linear probe, kNN and LoRA fine-tuning through the CLI, from an export and from
random init (tiny DINOv3-configured Eva: cls + 4 registers, RoPE)."""

from __future__ import annotations

import json

import torch

from explora.cli.main import main
from explora.models.adapt import apply_preset
from explora.models.backbone import build_backbone
from explora.models.export import export_backbone
from explora.models.registry import get_backbone_spec


def test_linprobe_knn_and_finetune_accept_a_dinov3_export(idx_dir, tmp_path) -> None:
    torch.manual_seed(0)
    model = build_backbone("test_dinov3")
    apply_preset(model, "D3-[L]-r64", lora_rank=4)
    export_backbone(model, tmp_path / "export", get_backbone_spec("test_dinov3").timm_name, formats=("safetensors",))
    data = f"fashion_mnist:{idx_dir}:rgb=true"
    weights = str(tmp_path / "export" / "model.safetensors")
    common = ["--backbone", "test_dinov3", "--weights", weights, "--data", data, "--val-split", "test",
              "--image-size", "32", "--batch-size", "8", "--num-workers", "0"]
    assert main(["linprobe", *common, "--epochs", "2", "--probe-batch-size", "8", "--lrs", "0.1",
                 "--out", str(tmp_path / "lp")]) == 0
    lp = json.loads((tmp_path / "lp" / "metrics.json").read_text())
    assert 0.0 <= lp["top1"] <= 100.0 and lp["num_samples"] == 16
    assert main(["knn", *common, "--ks", "1", "--out", str(tmp_path / "knn")]) == 0
    assert 0.0 <= json.loads((tmp_path / "knn" / "metrics.json").read_text())["top1"] <= 100.0
    assert main(["finetune", *common, "--steps", "2", "--precision", "fp32", "--out", str(tmp_path / "ft")]) == 0
    ft = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert ft["pool"] == "cls" and ft["steps"] == 2
    assert ft["trainable"] == {"backbone": 4 * 2 * 8 * (64 + 64), "head": 64 * 10 + 10}  # LoRA r8 on Q,V, 4 blocks
