"""The model card: Hugging Face front matter and a body whose every number comes from the run's files."""

from __future__ import annotations

import json

import pytest
import yaml

from explora.core.errors import CheckpointError
from explora.models.adapt import apply_preset
from explora.models.backbone import build_backbone
from explora.models.export import export_backbone
from explora.models.model_card import model_card, write_model_card


def _front(card: str) -> dict:
    head, sep, _ = card[4:].partition("\n---\n")
    assert card.startswith("---\n") and sep
    return yaml.safe_load(head)


def _run(tmp_path, name="test_dinov2", timm_name="vit_small_patch14_dinov2"):
    model = build_backbone(name)
    apply_preset(model, "D-[L]-r64", lora_rank=4)
    run = tmp_path / "run"
    export_backbone(model, run / "export", timm_name, formats=("safetensors",), metadata={"steps": 37})
    summary = {"steps": 37, "objective": "dinov2", "preset": "D-[L]-r64", "data": "fmow:/data/fmow/train.csv",
               "images": 1234, "effective_batch": 96, "precision": "bf16", "processes": 2,
               "hardware": "NVIDIA H200", "wall_time_s": 150.0,
               "parameters": {"groups": {"lora": 8192, "unfrozen_block": 50000}, "trainable_backbone": 58192,
                              "percentage": 3.21}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.csv").write_text("step,loss,lr\n10,5.5,0.1\n37,4.25,0.2\n38,,0.2\n")
    probe = tmp_path / "linprobe"
    probe.mkdir()
    (probe / "metrics.json").write_text(json.dumps({"protocol": "linear_probe", "top1": 71.234, "top5": 93.5,
                                                    "num_samples": 500}))
    return run, probe


def test_card_front_matter_and_numbers_from_the_run(tmp_path) -> None:
    run, probe = _run(tmp_path)
    path = write_model_card(run / "export", run, [probe])
    card = path.read_text()
    front = _front(card)
    assert front["library_name"] == "timm" and front["license"] == "apache-2.0"
    assert front["base_model"] == "timm/vit_small_patch14_dinov2.lvd142m"
    assert front["datasets"] == ["fmow"] and front["metrics"] == ["accuracy"]
    assert {"timm", "explora", "image-feature-extraction", "dinov2"} <= set(front["tags"])
    for text in ("| images | 1,234 |", "| optimiser steps | 37 |", "| effective batch | 96 |", "| precision | bf16 |",
                 "| hardware | NVIDIA H200 |", "| wall time | 2.5 min |", "4.2500 (step 37)", "| lora | 8,192 |",
                 "| backbone total (paper count) | 58,192 |", "3.21 %", "| linear_probe | 71.23 | 93.50 |",
                 "arXiv 2406.10973", "Preset `D-[L]-r64`: LoRA rank 4", 'create_model("hf-hub:'):
        assert text in card, text


def test_facts_no_file_holds_are_left_out(tmp_path) -> None:
    run, _ = _run(tmp_path)
    (run / "summary.json").unlink()
    (run / "metrics.csv").unlink()
    card = model_card(run / "export", run)
    assert "wall time" not in card and "hardware" not in card and "## Evaluation" not in card
    assert "metrics" not in _front(card)
    with pytest.raises(CheckpointError, match="metrics.json"):
        model_card(run / "export", run, [tmp_path / "nowhere"])
    with pytest.raises(CheckpointError, match="model.json"):
        model_card(tmp_path, run)


@pytest.mark.parametrize("name,timm_name,license", [
    ("test_mae", "vit_base_patch16_224", {"license": "cc-by-nc-4.0"}),  # MAE weights: CC-BY-NC (timm, MAE LICENSE)
    ("vit_small_patch16_dinov3", "vit_small_patch16_dinov3",  # not an id the Hub knows: `other` + license_name
     {"license": "other", "license_name": "dinov3-license"}),
])
def test_licence_of_the_base_model(tmp_path, name, timm_name, license) -> None:
    kw = {} if name.startswith("test_") else dict(embed_dim=64, depth=2, num_heads=4, img_size=32)
    model = build_backbone(name, **kw)
    export_backbone(model, tmp_path, timm_name, formats=("safetensors",), metadata={"family": "mae"}
                    if name == "test_mae" else None)
    front = _front(model_card(tmp_path))
    assert {k: front.get(k) for k in license} == license
