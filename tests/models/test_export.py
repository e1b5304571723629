"""Merged exports: timm loads the safetensors file, the upstream layouts round-trip, writes are atomic, CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from tolerances import FP32_NETWORK

from explora.cli.export import add_commands
from explora.core.errors import ConfigError
from explora.models.adapt import apply_preset
from explora.models.backbone import build_backbone
from explora.models.export import export_backbone, load_exported, split_qkv, to_upstream_layout
from explora.models.record import record_of
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
    assert set(paths) == {"safetensors", "timm_config", "encoder", "teacher", "sidecar"}
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
    torch.testing.assert_close(loaded(x), expected, **FP32_NETWORK)  # merged weights vs the LoRA path
    torch.testing.assert_close(load_exported(tmp_path).eval()(x), expected, **FP32_NETWORK)

    # (b) encoder-only {'model': ...} and (c) {'teacher': {'backbone.*'}} load back through our checkpoint reader
    enc = torch.load(paths["encoder"], weights_only=True)
    assert set(enc) == {"model"}
    teacher = torch.load(paths["teacher"], weights_only=True)["teacher"]
    qkv = teacher["backbone.blocks.0.attn.qkv.weight"]
    torch.testing.assert_close(torch.cat([teacher[f"backbone.blocks.0.attn.{p}_proj.weight"] for p in "qkv"]), qkv)
    torch.testing.assert_close(qkv, tensors["blocks.0.attn.qkv.weight"], atol=0, rtol=0)
    for kind in ("encoder", "teacher"):
        back = build_backbone(name, weights=str(paths[kind]), **kw).eval()
        torch.testing.assert_close(back(x), expected, **FP32_NETWORK)


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
                "explora_spec": record_of(model).spec.to_dict()}, ckpt)
    out = tmp_path / "export"
    assert _cli(["export", "--model", "test_dinov2", "--weights", str(ckpt), "--out", str(out)]) == 0
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(load_exported(out).eval()(x), model(x), **FP32_NETWORK)


def _features(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Patch tokens after every block and the pooled feature: several layers, so one lucky match cannot pass."""
    with torch.no_grad():
        blocks = model.forward_intermediates(x, norm=False, output_fmt="NLC", intermediates_only=True)
        return [*blocks, model(x)]


def _assert_same_features(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5 * float(v.abs().max()), msg=f"layer {i}")


def test_built_small_exported_then_used_large_matches_the_original(tmp_path) -> None:
    """A DinoV2-hub-layout file with a grid larger than the input (like 37x37 at 112 px): building at a small size,
    exporting and loading at the large size gives the original's features at the large size."""
    from checkpoint_layouts import randomized, state, to_dinov2_hub

    original = randomized(build_backbone("test_dinov2", pos_embed_grid=10))  # "native" 10x10 = 80 px
    hub = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(to_dinov2_hub(state(original), torch.randn(1, 64)), hub)
    small = build_backbone("test_dinov2", weights=hub, img_size=16)  # 2x2 patches: the "112 px" run
    assert small.patch_embed.grid_size == (10, 10)
    paths = export_backbone(small, tmp_path / "export", "vit_small_patch14_dinov2")
    side = json.loads(paths["sidecar"].read_text())
    assert side["pos_embed_grid"] == [10, 10] and side["img_size"] == [16, 16]
    assert side["pos_embed_trained_grid"] is None and side["model_args"]["img_size"] == [80, 80]

    x = torch.randn(2, 3, 40, 40)  # 5x5 patches: the "224 px" use
    reference = _features(build_backbone("test_dinov2", weights=hub, img_size=40).eval(), x)
    for path in (paths["safetensors"], paths["encoder"], paths["teacher"]):
        _assert_same_features(_features(build_backbone("test_dinov2", weights=path, img_size=40).eval(), x), reference)
    plain = load_exported(paths["safetensors"]).eval()  # plain timm: the same per-forward interpolation
    assert plain.pretrained_cfg["input_size"] == (3, 16, 16)
    _assert_same_features(_features(plain, x), reference)
    lossy = build_backbone("test_dinov2", weights=hub, pos_embed_grid=2).eval()  # the stored grid of the old export
    assert not torch.allclose(_features(lossy, x)[0], reference[0], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_real_dinov2_built_at_112_exported_and_loaded_at_224_matches_the_original(tmp_path) -> None:
    from conftest import DINOV2_VITS14, require

    path = require(DINOV2_VITS14)
    small = build_backbone("dinov2_vits14", weights=path, img_size=112)
    paths = export_backbone(small, tmp_path, "vit_small_patch14_dinov2", formats=("safetensors",))
    assert json.loads(paths["sidecar"].read_text())["pos_embed_grid"] == [37, 37]
    x = torch.randn(1, 3, 224, 224)
    reference = _features(build_backbone("dinov2_vits14", weights=path, img_size=224).eval(), x)
    _assert_same_features(_features(build_backbone("dinov2_vits14", weights=paths["safetensors"]).eval(), x),
                          reference)
    _assert_same_features(_features(load_exported(tmp_path).eval(), x), reference)


def test_exports_written_before_pos_embed_grid_still_load(tmp_path) -> None:
    """Older sidecars had no pos_embed_grid: their img_size (and model_args) gave the stored grid."""
    model = _adapted("test_dinov2", img_size=(16, 24), pos_embed_grid=(2, 3))
    paths = export_backbone(model, tmp_path, "vit_small_patch14_dinov2")
    side = json.loads(paths["sidecar"].read_text())
    for key in ("pos_embed_grid", "pos_embed_trained_grid"):
        del side[key]
    paths["sidecar"].write_text(json.dumps(side))
    x = torch.randn(1, 3, 16, 24)
    for path in (paths["safetensors"], paths["encoder"]):
        old = build_backbone("test_dinov2", weights=path, img_size=(16, 24)).eval()
        assert old.patch_embed.grid_size == (2, 3)
        torch.testing.assert_close(old(x), model(x), rtol=1e-5, atol=1e-6)
    plain = load_exported(tmp_path).eval()
    assert plain.pretrained_cfg["input_size"] == (3, 16, 24)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-6)


def test_trained_pos_embed_learns_through_the_interpolation_and_states_its_grid(tmp_path) -> None:
    model = build_backbone("test_dinov2", img_size=16, pos_embed_grid=10)
    apply_preset(model, "D-[L]-r64", lora_rank=4, train_pos_embed=True)
    model(torch.randn(2, 3, 16, 16)).square().sum().backward()  # 2x2 input grid, 10x10 stored
    grad = model.pos_embed.grad
    assert grad is not None and grad.shape == (1, 101, 64) and grad[:, 1:].abs().sum() > 0
    side = json.loads(export_backbone(model, tmp_path, "vit_small_patch14_dinov2")["sidecar"].read_text())
    assert side["pos_embed_grid"] == [10, 10] and side["pos_embed_trained_grid"] == [2, 2]


@pytest.mark.parametrize("kind", ["group_channel", "temporal"])
def test_wrapped_exports_keep_their_trained_encoding_grid(tmp_path, kind) -> None:
    from explora.models.backbone import input_size
    from explora.models.export import export_wrapped_encoder, infer_model_args, load_encoder
    from explora.models.group_channel import GroupChannelViT
    from explora.models.temporal import TemporalViT

    vit = build_backbone("test_mae", img_size=16, pos_embed_grid=6)  # stored 6x6, encodings at 2x2
    if kind == "group_channel":
        encoder = GroupChannelViT(vit, ((0, 1), (2, 3)), group_dim=16)
        x, call = torch.randn(1, 4, 16, 16), (lambda m, x: m(x))
    else:
        encoder = TemporalViT(vit, num_frames=2, time_dim=8)
        ts = torch.tensor([[[2020, 1, 10], [2021, 6, 12]]])
        x, call = torch.randn(1, 6, 16, 16), (lambda m, x: m(x, ts))
    assert input_size(encoder) == (16, 16)
    paths = export_wrapped_encoder(encoder, tmp_path, "vit_base_patch16_224", infer_model_args(vit,
                                                                                                "vit_base_patch16_224"))
    side = json.loads(paths["sidecar"].read_text())
    assert side["pos_embed_grid"] == side["pos_embed_trained_grid"] == [2, 2] and side["img_size"] == [16, 16]
    assert side["wrapper"]["img_size"] == [16, 16] and side["model_args"]["img_size"] == [48, 48]
    loaded = load_encoder(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, x), call(encoder.eval(), x), rtol=1e-5, atol=1e-6)
    del side["wrapper"]["img_size"]  # written before the wrapper recorded it: the base was built at its size
    side["model_args"]["img_size"] = [16, 16]
    paths["sidecar"].write_text(json.dumps(side))
    assert input_size(load_encoder(tmp_path)) == (16, 16)


def test_group_channel_add_mode_takes_the_rgb_positions_at_the_input_grid(tmp_path) -> None:
    """'add' mode seeds its encoding with the RGB model's positions on its own grid: from a native 8x8 grid they
    are resampled as timm's forward does, the same values a backbone resampled at load time to 4x4 holds."""
    from checkpoint_layouts import randomized, state

    from explora.models.group_channel import GroupChannelViT

    path = tmp_path / "mae.pth"
    torch.save({"model": state(randomized(build_backbone("test_mae", pos_embed_grid=8)))}, path)
    native = build_backbone("test_mae", weights=path, img_size=32)
    at_load = build_backbone("test_mae", weights=path, img_size=32, pos_embed_grid=4)
    groups = ((0, 1), (2, 3))
    ours = GroupChannelViT(native, groups, pos_mode="add").patch_embed.pos_embed
    ref = GroupChannelViT(at_load, groups, pos_mode="add").patch_embed.pos_embed
    assert ours.shape == (1, 16, 64) and torch.equal(ours, ref)
