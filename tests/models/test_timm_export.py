"""Exports in timm's Hugging Face layout: ``timm.create_model("local-dir:<export>", pretrained=True)`` rebuilds the
adapted backbone or the fine-tuned classifier (head and class names) from ``config.json`` alone."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from tolerances import FP32_NETWORK
from torch.utils.data import TensorDataset

from explora.core.errors import ConfigError
from explora.models.adapt import apply_preset
from explora.models.backbone import build_backbone
from explora.models.classifier import ClassifierModel
from explora.models.export import export_backbone, export_classifier, load_exported, write_timm_config
from explora.models.registry import base_license, get_backbone_spec

REG4 = dict(embed_dim=64, depth=2, num_heads=4, patch_size=8, img_size=32)


def _adapted(name: str, **kw) -> torch.nn.Module:
    """A tiny backbone after D-[L]-r4 with every trainable tensor perturbed, so LoRA and the block are non-trivial."""
    torch.manual_seed(0)
    model = build_backbone(name, **kw).eval()
    apply_preset(model, "D-[L]-r64", lora_rank=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name,kw,license", [
    ("test_dinov2", {}, "apache-2.0"),
    ("test_mae", {}, "cc-by-nc-4.0"),  # timm's vit_base_patch16_224.mae: the MAE weights' CC-BY-NC licence
    ("vit_small_patch14_reg4_dinov2", REG4, "apache-2.0"),
])
def test_backbone_export_loads_by_local_dir_name(tmp_path, name, kw, license) -> None:
    model = _adapted(name, **kw)
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    paths = export_backbone(model, tmp_path, get_backbone_spec(name).timm_name,
                            data_config={"mean": mean, "std": std})
    config = json.loads(paths["timm_config"].read_text())
    assert config["architecture"] == get_backbone_spec(name).timm_name and config["num_classes"] == 0
    assert config["num_features"] == 64 and config["model_args"]["dynamic_img_size"] is True
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()  # nothing else given
    assert loaded.pretrained_cfg["license"] == license == json.loads(paths["sidecar"].read_text())["license"]
    assert load_exported(tmp_path).pretrained_cfg["license"] == license
    data = timm.data.resolve_data_config(model=loaded)
    assert data["input_size"] == (3, 32, 32) and data["interpolation"] == "bicubic"
    assert data["mean"] == pytest.approx(mean) and data["std"] == pytest.approx(std)
    for size in (32, 48):  # the stored grid interpolated per forward, as the adapted model does
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(loaded(x), model(x), **FP32_NETWORK)


@pytest.mark.parametrize("pool", ["cls", "avg", "avg_fc_norm"])
def test_classifier_export_keeps_head_and_class_names(tmp_path, pool) -> None:
    classifier = ClassifierModel(_adapted("test_mae"), 3, pool=pool).eval()
    with torch.no_grad():
        classifier.head.weight.normal_()
        if classifier.fc_norm is not None:
            classifier.fc_norm.weight.add_(0.5)
    paths = export_classifier(classifier, tmp_path, label_names=["road", "river", "farm"])
    state = load_file(paths["safetensors"])
    assert "head.weight" in state and not any("lora_" in k or k.startswith("backbone.") for k in state)
    assert ("norm.weight" in state) == (pool != "avg_fc_norm")
    assert ("fc_norm.weight" in state) == (pool == "avg_fc_norm")
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert loaded.num_classes == 3 and loaded.pretrained_cfg["label_names"] == ["road", "river", "farm"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), classifier(x), **FP32_NETWORK)
    side = json.loads(paths["sidecar"].read_text())
    assert side["head"] == {"pool": pool, "num_classes": 3} and side["license"] == "cc-by-nc-4.0"  # MAE-derived


def test_classifier_export_refuses_what_timm_cannot_build(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cls\\+avg"):
        export_classifier(ClassifierModel(_adapted("test_dinov2"), 3, pool="cls+avg"), tmp_path)
    with pytest.raises(ConfigError, match="label names"):
        export_classifier(ClassifierModel(_adapted("test_dinov2"), 3), tmp_path, label_names=["a"])
    with pytest.raises(ConfigError, match="bands"):
        write_timm_config(tmp_path, _adapted("test_dinov2"), "vit_small_patch14_dinov2", {}, mean=[0.5], std=[0.5])


def test_licence_follows_the_base_model() -> None:
    assert base_license("vit_small_patch14_dinov2") == "apache-2.0"
    assert base_license("vit_large_patch16_224", family="mae") == "cc-by-nc-4.0"
    assert base_license("vit_large_patch16_dinov3.sat493m") == "dinov3-license"  # from timm's pretrained_cfg
    assert base_license("vit_base_patch16_224", "mae", source="/ckpt/satmae_fmow_pretrain.pth") == "cc-by-nc-4.0"
    assert base_license("not_a_timm_model") is None


class _Named(TensorDataset):
    mean, std, num_classes, classes = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 2, ["sea", "land"]


def test_finetune_best_is_a_timm_classifier(tmp_path) -> None:
    from explora.engine.trainer import TrainConfig
    from explora.recipes.finetune import run_finetune

    g = torch.Generator().manual_seed(1)
    ds = _Named(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(8) % 2)
    cfg = TrainConfig(steps=2, batch_size=4, num_workers=0, precision="fp32", tensorboard=False, log_every=1)
    run_finetune(build_backbone("test_dinov2"), ds, ds, tmp_path, image_size=32, train_cfg=cfg)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'best'}", pretrained=True).eval()
    assert loaded.num_classes == 2 and loaded.pretrained_cfg["label_names"] == ["sea", "land"]
    assert timm.data.resolve_data_config(model=loaded)["mean"] == pytest.approx((0.5, 0.5, 0.5))
