"""Checkpoint reading and conversion: every upstream layout, written from tiny models, converts back bit for bit.

The helpers below write fake upstream checkpoints: a timm state dict re-laid out as each upstream project stores it
(DinoV2 hub files, DinoV2 teacher checkpoints, MAE ``{'model': ...}``, released ExPLoRA full / encoder-only), each
inverting one conversion of :mod:`explora.models.checkpoints`. ``tests/models/test_backbone.py`` reuses them.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from checkpoint_layouts import (
    assert_same,
    fake_mae_decoder,
    randomized,
    state,
    tiny,
    to_dinov2_hub,
    to_dinov2_train,
    to_explora_full,
    to_mae,
)
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from tolerances import FP32_ONE_OP

from explora.core.errors import CheckpointError
from explora.models.backbone import build_backbone
from explora.models.checkpoints import BackboneTarget, convert_checkpoint, load_checkpoint_file


def test_dinov2_hub_flat_dict_keeps_mask_token(tiny_dinov2):
    model = randomized(tiny_dinov2)
    mask = torch.randn(1, 64)
    parts = convert_checkpoint(to_dinov2_hub(state(model), mask), model, source="hub.pth")
    assert parts.layout == "dinov2-hub"
    assert_same(parts.encoder, model.state_dict())
    assert parts.mask_token.shape == (1, 64) and torch.equal(parts.mask_token, mask)
    assert parts.decoder is None


def test_dinov2_reg4_folds_cls_pos_embed_and_renames_registers():
    model = tiny("vit_small_patch14_reg4_dinov2")
    sd = state(model)
    cls_pos = torch.randn(1, 1, 64)
    raw = to_dinov2_hub(sd, torch.randn(1, 64), cls_pos=cls_pos)
    assert raw["pos_embed"].shape == (1, 17, 64) and raw["register_tokens"].shape == (1, 4, 64)
    parts = convert_checkpoint(raw, model)
    assert parts.encoder["pos_embed"].shape == (1, 16, 64)
    assert torch.equal(parts.encoder["pos_embed"], sd["pos_embed"])
    assert torch.equal(parts.encoder["reg_token"], sd["reg_token"])
    assert torch.equal(parts.encoder["cls_token"], raw["cls_token"] + cls_pos)  # the fold, exactly as computed
    assert torch.allclose(parts.encoder["cls_token"], sd["cls_token"], **FP32_ONE_OP)  # (a - b) + b


def test_dinov2_giant_swiglu_w12_w3_become_fc1_fc2():
    model = tiny("vit_giant_patch14_dinov2", mlp_ratio=4)  # SwiGLUPacked: fc1 64 -> 256 (w12), fc2 128 -> 64 (w3)
    raw = to_dinov2_hub(state(model), torch.randn(1, 64))
    assert "blocks.1.mlp.w12.weight" in raw and raw["blocks.1.mlp.w3.weight"].shape == (64, 128)
    parts = convert_checkpoint(raw, model)
    assert_same(parts.encoder, model.state_dict())


@pytest.mark.parametrize("chunks", [0, 2])
def test_dinov2_training_checkpoint_takes_teacher_backbone(tiny_dinov2, chunks):
    model = randomized(tiny_dinov2)
    mask = torch.randn(1, 64)
    parts = convert_checkpoint(to_dinov2_train(state(model), mask, chunks=chunks), model)
    assert parts.layout == "dinov2-train"
    assert_same(parts.encoder, model.state_dict())
    assert torch.equal(parts.mask_token, mask)
    assert any("dino_head" in n and "ibot_head" in n for n in parts.notes)


def test_full_ssl_meta_arch_with_module_prefix(tiny_dinov2):
    model = randomized(tiny_dinov2)
    flat = {"module.teacher.backbone." + k: v for k, v in state(model).items()}
    flat |= {"module.student.backbone." + k: torch.zeros_like(v) for k, v in state(model).items()}
    flat["module.teacher.dino_head.mlp.0.weight"] = torch.randn(8, 64)
    parts = convert_checkpoint({"model": flat, "optimizer": {"state": {}}}, model)
    assert_same(parts.encoder, model.state_dict())


@pytest.mark.parametrize("with_decoder", [True, False])
def test_mae_model_dict_splits_decoder(tiny_mae, with_decoder):
    model = randomized(tiny_mae)
    decoder = fake_mae_decoder() if with_decoder else None
    parts = convert_checkpoint(to_mae(state(model), decoder), model)
    assert_same(parts.encoder, model.state_dict())
    assert parts.mask_token is None  # the MAE (1, 1, Dd) token is the decoder's, never DinoV2's
    if with_decoder:
        assert parts.layout == "mae+decoder"
        assert_same(parts.decoder, decoder)
        assert parts.decoder["mask_token"].shape == (1, 1, 32)
    else:
        assert parts.layout == "encoder-only" and parts.decoder is None


@pytest.mark.parametrize("keep_qkv", [True, False])
def test_explora_full_checkpoint_qkv_or_rebuilt_from_q_k_v(tiny_dinov2, keep_qkv):
    model = randomized(tiny_dinov2)
    sd = state(model)
    raw = to_explora_full(sd, torch.randn(1, 64), keep_qkv=keep_qkv)
    if keep_qkv:  # the fused tensor wins over the split ones: make the split ones wrong to prove it
        raw["teacher"]["backbone.blocks.0.attn.q_proj.weight"].zero_()
    parts = convert_checkpoint(raw, model)
    assert parts.layout == "explora-full"
    assert_same(parts.encoder, model.state_dict())
    assert parts.encoder["blocks.3.attn.qkv.weight"].shape == (192, 64)


def test_explora_encoder_only_and_state_dict_wrapper(tiny_dinov2):
    model = randomized(tiny_dinov2)
    raw = {"model": {**state(model), "mask_token": torch.randn(1, 64)}}
    parts = convert_checkpoint(raw, model)
    assert parts.layout == "encoder-only" and parts.mask_token is not None
    assert_same(parts.encoder, model.state_dict())
    parts = convert_checkpoint({"state_dict": {"module." + k: v for k, v in state(model).items()}}, model)
    assert parts.layout == "timm" and parts.mask_token is None
    assert_same(parts.encoder, model.state_dict())


def test_classifier_head_is_dropped(tiny_mae):
    model = randomized(tiny_mae)
    raw = {**state(model), "head.weight": torch.randn(10, 64), "head.bias": torch.randn(10)}
    assert_same(convert_checkpoint(raw, model).encoder, model.state_dict())


def test_pos_embed_resampled_to_model_grid(tiny_dinov2):
    model = randomized(tiny_dinov2)  # 32 px / patch 8 -> 4x4 grid
    big = build_backbone("test_dinov2", pos_embed_grid=6)  # position embedding stored on a 6x6 grid
    parts = convert_checkpoint(state(model), big)
    want = resample_abs_pos_embed(model.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
    assert parts.encoder["pos_embed"].shape == (1, 37, 64)
    assert torch.equal(parts.encoder["pos_embed"], want)
    assert torch.equal(parts.encoder["pos_embed"][:, :1], model.pos_embed[:, :1].detach())  # cls slot untouched
    nearest = convert_checkpoint(state(model), big, interpolation="nearest", antialias=False)
    assert torch.equal(nearest.encoder["pos_embed"][:, 1:2], model.pos_embed[:, 1:2].detach())


def test_keep_grid_keeps_the_checkpoint_grid_and_reports_it(tiny_dinov2):
    big = randomized(build_backbone("test_dinov2", pos_embed_grid=(6, 5)))
    parts = convert_checkpoint(state(big), tiny_dinov2, grid_size=(6, 5), keep_grid=True)  # into a 4x4 target
    assert parts.pos_embed_grid == (6, 5) and torch.equal(parts.encoder["pos_embed"], big.pos_embed.detach())
    assert not any("resampled" in n for n in parts.notes)
    resampled = convert_checkpoint(state(big), tiny_dinov2, grid_size=(6, 5))
    assert resampled.pos_embed_grid == (4, 4) and resampled.encoder["pos_embed"].shape == (1, 17, 64)
    target = BackboneTarget.from_model(tiny_dinov2).with_grid((6, 5))
    assert target.grid_size == (6, 5) and target.shapes["pos_embed"] == (1, 31, 64)
    assert target.shapes["cls_token"] == (1, 1, 64)


def test_rgb_patch_embed_adapted_to_more_channels(tiny_dinov2):
    model = randomized(tiny_dinov2)
    six = build_backbone("test_dinov2", in_chans=6)
    parts = convert_checkpoint(state(model), six)
    w = model.patch_embed.proj.weight.detach()
    assert parts.encoder["patch_embed.proj.weight"].shape == (64, 6, 8, 8)
    assert torch.equal(parts.encoder["patch_embed.proj.weight"], adapt_input_conv(6, w))
    assert torch.allclose(parts.encoder["patch_embed.proj.weight"][:, 3:], w / 2)  # repeat RGB, scale 3/6


def test_wrong_in_chans_is_refused():
    four = randomized(build_backbone("test_dinov2", in_chans=4))
    with pytest.raises(CheckpointError, match=r"ms\.pth.*in_chans=4.*in_chans=6"):
        convert_checkpoint(state(four), build_backbone("test_dinov2", in_chans=6), source="ms.pth")


def test_wrong_depth_or_width_names_file_and_architecture(tiny_dinov2):
    shallow = build_backbone("test_dinov2", depth=2)
    with pytest.raises(CheckpointError, match=r"deep\.pth.*depth=4.*expected test_dinov2 .*embed_dim=64, depth=2"):
        convert_checkpoint(state(tiny_dinov2), BackboneTarget.from_model(shallow, "test_dinov2"), source="deep.pth")
    narrow = build_backbone("test_dinov2", embed_dim=32, num_heads=2)
    with pytest.raises(CheckpointError, match=r"wide\.pth.*embed_dim=64.*embed_dim=32"):
        convert_checkpoint(state(tiny_dinov2), narrow, source="wide.pth")


def test_other_family_lists_offending_keys_with_shapes(tiny_dinov2, tiny_mae):
    # same width and depth, but DinoV2 has LayerScale and MAE does not
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(state(tiny_dinov2), BackboneTarget.from_model(tiny_mae, "test_mae"), source="d.pth")
    msg = str(err.value)
    assert "d.pth" in msg and "test_mae (embed_dim=64, depth=4, in_chans=3" in msg
    assert "8 unexpected key(s): blocks.0.ls1.gamma (64,)" in msg
    sd = state(tiny_mae)
    del sd["norm.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): norm\.weight \(64,\)"):
        convert_checkpoint(sd, tiny_mae)


def test_unmerged_lora_is_explained(tiny_mae):
    sd = state(tiny_mae) | {"blocks.0.attn.qkv.lora_A": torch.zeros(8, 64)}
    with pytest.raises(CheckpointError, match="unmerged LoRA"):
        convert_checkpoint(sd, tiny_mae)


def test_non_square_pos_embed_needs_grid(tiny_dinov2):
    wide = randomized(build_backbone("test_dinov2", pos_embed_grid=(4, 6)))
    with pytest.raises(CheckpointError, match="not a square grid"):
        convert_checkpoint(state(wide), tiny_dinov2)
    parts = convert_checkpoint(state(wide), tiny_dinov2, grid_size=(4, 6))
    assert parts.encoder["pos_embed"].shape == (1, 17, 64)


def test_load_checkpoint_file_refuses_arbitrary_objects(tmp_path, tiny_mae):
    bad = tmp_path / "evil.pth"
    torch.save({"model": state(tiny_mae), "obj": _Opaque()}, bad)
    with pytest.raises(
        CheckpointError, match=r"evil\.pth: .*pickled (?:[\w.]+\.)?test_checkpoints\._Opaque object.*weights_only=True"
    ):
        load_checkpoint_file(bad)
    ok = tmp_path / "mae.pth"  # MAE's misc.save_model stores args as a Namespace: allowed
    torch.save({"model": state(tiny_mae), "args": argparse.Namespace(lr=1.5e-4), "epoch": 3}, ok)
    assert load_checkpoint_file(ok)["args"].lr == 1.5e-4


def test_load_checkpoint_file_reports_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth: checkpoint file not found"):
        load_checkpoint_file(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        load_checkpoint_file(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"junk\.safetensors"):
        load_checkpoint_file(tmp_path / "junk.safetensors")
    (tmp_path / "meta.json").write_text('{"a": 1}')
    with pytest.raises(CheckpointError, match=r"meta\.json: not a readable PyTorch checkpoint"):
        load_checkpoint_file(tmp_path / "meta.json")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        load_checkpoint_file(tmp_path / "list.pth")


class _Opaque:
    """A class torch.load(weights_only=True) must refuse to rebuild."""
