"""Merged exports: timm loads the safetensors file, the upstream layouts round-trip, writes are atomic, CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from explora.adapt import apply_preset
from explora.errors import ConfigError
from explora.export import export_backbone, load_exported, split_qkv, to_upstream_layout
from explora.export_cli import add_commands
from explora.models.backbone import build_backbone
from explora.models.registry import get_backbone_spec

REG4 = dict(embed_dim=64, depth=2, num_heads=4, patch_size=8, img_size=32)


def _adapted(name: str, **kw) -> torch.nn.Module:
    """A tiny backbone after D-[L]-r4 with every trainable tensor perturbed, so LoRA and the block are non-trivial."""
    model = build_backbone(name, **kw).eval()
    apply_preset(model, "D-[L]-r64", lora_rank=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("name,kw", [("test_dinov2", {}), ("test_mae", {}), ("vit_small_patch14_reg4_dinov2", REG4)])
def test_exports_load_and_match(tmp_path, name, kw) -> None:
    model = _adapted(name, **kw)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    timm_name = get_backbone_spec(name).timm_name
    paths = export_backbone(model, tmp_path, timm_name, metadata={"run": "unit-test"})
    assert set(paths) == {"safetensors", "encoder", "teacher", "sidecar"}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # exported from a copy
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())  # no temp files

    # (a) plain timm: no lora keys, no mask_token, loads through timm's own pretrained path
    tensors = load_file(paths["safetensors"])
    assert not any("lora_" in k for k in tensors) and "mask_token" not in tensors
    side = json.loads(paths["sidecar"].read_text())
    assert side["architecture"] == timm_name and side["img_size"] == [32, 32] and side["in_chans"] == 3
    assert side["provenance"]["metadata"] == {"run": "unit-test"}
    assert side["provenance"]["explora_spec"]["lora_rank"] == 4
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in side["model_args"].items()}
    loaded = timm.create_model(
        timm_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(paths["safetensors"])), **args
    ).eval()
    torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(load_exported(tmp_path).eval()(x), expected, atol=1e-5, rtol=0)

    # (b) encoder-only {'model': ...} and (c) {'teacher': {'backbone.*'}} load back through our checkpoint reader
    enc = torch.load(paths["encoder"], weights_only=True)
    assert set(enc) == {"model"}
    teacher = torch.load(paths["teacher"], weights_only=True)["teacher"]
    qkv = teacher["backbone.blocks.0.attn.qkv.weight"]
    torch.testing.assert_close(torch.cat([teacher[f"backbone.blocks.0.attn.{p}_proj.weight"] for p in "qkv"]), qkv)
    torch.testing.assert_close(qkv, tensors["blocks.0.attn.qkv.weight"], atol=0, rtol=0)
    for kind in ("encoder", "teacher"):
        back = build_backbone(name, weights=str(paths[kind]), **kw).eval()
        torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=0)


def test_dinov2_upstream_layout_keys() -> None:
    sd = {
        "cls_token": torch.randn(1, 1, 4),
        "reg_token": torch.randn(1, 2, 4),
        "pos_embed": torch.randn(1, 9, 4),
        "blocks.0.mlp.fc1.weight": torch.randn(16, 4),
        "blocks.0.mlp.fc2.weight": torch.randn(4, 8),
        "blocks.0.attn.qkv.weight": torch.randn(12, 4),
    }
    up = to_upstream_layout(sd, "dinov2")
    assert set(up) == {"cls_token", "register_tokens", "pos_embed", "mask_token", "blocks.0.mlp.w12.weight",
                       "blocks.0.mlp.w3.weight", "blocks.0.attn.qkv.weight"}
    assert up["pos_embed"].shape == (1, 10, 4) and torch.count_nonzero(up["pos_embed"][:, 0]) == 0
    assert torch.equal(up["mask_token"], torch.zeros(1, 4))
    assert to_upstream_layout(sd, "mae") == sd
    split = split_qkv(sd)
    assert torch.equal(split["blocks.0.attn.v_proj.weight"], sd["blocks.0.attn.qkv.weight"][8:])


def test_heads_and_bad_formats(tmp_path, tiny_dinov2) -> None:
    head = torch.nn.Linear(64, 5)
    paths = export_backbone(tiny_dinov2, tmp_path, "vit_small_patch14_dinov2", formats=("teacher",),
                            heads={"dino_head": head})
    teacher = torch.load(paths["teacher"], weights_only=True)["teacher"]
    assert torch.equal(teacher["dino_head.weight"], head.weight.detach())
    assert set(paths) == {"teacher", "sidecar"}
    with pytest.raises(ConfigError, match="export formats"):
        export_backbone(tiny_dinov2, tmp_path, "vit_small_patch14_dinov2", formats=("onnx",))


def test_cli_params_and_export(tmp_path, capsys) -> None:
    assert _cli(["params", "--model", "dinov2_vits14", "--json", "--memory"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_backbone"] == 2_874_240 and report["memory_bytes"]["gradients"] == 4 * 2_874_240
    assert _cli(["params", "--model", "test_mae", "--preset", "LoRA-r8"]) == 0
    assert "| lora | 8,192 |" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="did you mean"):
        _cli(["params", "--model", "test_mae", "--preset", "LoRA-r9"])

    model = _adapted("test_dinov2")
    ckpt = tmp_path / "adapted.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "explora_spec": model.explora_spec.to_dict()}, ckpt)
    out = tmp_path / "export"
    assert _cli(["export", "--model", "test_dinov2", "--weights", str(ckpt), "--out", str(out)]) == 0
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(load_exported(out).eval()(x), model(x), atol=1e-5, rtol=0)
