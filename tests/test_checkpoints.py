"""Checkpoint reading and conversion: every upstream layout, written from tiny models, converts back bit for bit.

The helpers below write fake upstream checkpoints: a timm state dict re-laid out as each upstream project stores it
(DinoV2 hub files, DinoV2 teacher checkpoints, MAE ``{'model': ...}``, released ExPLoRA full / encoder-only), each
inverting one conversion of :mod:`explora.models.checkpoints`. ``tests/test_backbones.py`` reuses them.
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from tolerances import FP32_ONE_OP
from torch import Tensor, nn

from explora.errors import CheckpointError
from explora.models.backbone import build_backbone
from explora.models.checkpoints import BackboneTarget, convert_checkpoint, load_checkpoint_file

TINY = dict(embed_dim=64, depth=2, num_heads=4, patch_size=8, img_size=32)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every tensor with distinct random values, so a swapped or dropped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g))
    return model


def tiny(name: str, **kwargs) -> nn.Module:
    """A tiny randomized backbone: registry ``test_*`` names as is, timm DinoV2 names shrunk to ``TINY``."""
    extra = {} if name.startswith("test_") else dict(TINY)
    extra.update(kwargs)
    return randomized(build_backbone(name, **extra))


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def to_dinov2_hub(sd: dict[str, Tensor], mask_token: Tensor, cls_pos: Tensor | None = None) -> dict[str, Tensor]:
    """timm -> official DinoV2 hub flat dict (``mask_token`` (1, D); registers with a cls pos slot; SwiGLU w12/w3)."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        k = re.sub(r"mlp\.fc1\.", "mlp.w12.", k) if _is_swiglu(sd) else k
        k = re.sub(r"mlp\.fc2\.", "mlp.w3.", k) if _is_swiglu(sd) else k
        out[k] = v
    if "reg_token" in out:
        assert cls_pos is not None, "register models need the cls position embedding to unfold"
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = out["cls_token"] - cls_pos  # timm's cls = DinoV2 cls + pos_embed[:, 0]
        out["pos_embed"] = torch.cat([cls_pos, out["pos_embed"]], dim=1)  # (1, 1 + N, D)
    out["mask_token"] = mask_token
    return out


def _is_swiglu(sd: dict[str, Tensor]) -> bool:
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def to_dinov2_train(sd: dict[str, Tensor], mask_token: Tensor, chunks: int = 0) -> dict:
    """timm -> ``{'teacher': {'backbone.*', 'dino_head.*', 'ibot_head.*'}, 'student': ...}`` (optionally chunked)."""
    teacher: dict[str, Tensor] = {}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    per_chunk = max(1, depth // chunks) if chunks else 0
    for k, v in {**sd, "mask_token": mask_token}.items():
        if chunks and k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // per_chunk}.{k[len('blocks.') :]}"
        teacher["backbone." + k] = v
    teacher["dino_head.mlp.0.weight"] = torch.randn(32, 64)
    teacher["ibot_head.last_layer.weight_g"] = torch.randn(128, 1)
    student = {k: torch.zeros_like(v) for k, v in teacher.items()}  # must not be picked
    return {"teacher": student | teacher, "student": student, "iteration": 7}


def to_mae(sd: dict[str, Tensor], decoder: dict[str, Tensor] | None) -> dict:
    """timm -> MAE ``{'model': encoder (+ decoder_*, mask_token (1, 1, Dd))}`` as ``misc.save_model`` writes it."""
    model = dict(sd)
    if decoder is not None:
        model.update(decoder)
    return {"model": model, "epoch": 799}


def fake_mae_decoder(dim: int = 64, dec_dim: int = 32, n: int = 17, patch_pixels: int = 8 * 8 * 3) -> dict:
    """A one-block MAE decoder in ``models_mae.py`` key names."""
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> Tensor:
        return torch.randn(shape, generator=g)

    return {
        "mask_token": r(1, 1, dec_dim),
        "decoder_embed.weight": r(dec_dim, dim),
        "decoder_embed.bias": r(dec_dim),
        "decoder_pos_embed": r(1, n, dec_dim),
        "decoder_blocks.0.norm1.weight": r(dec_dim),
        "decoder_blocks.0.attn.qkv.weight": r(3 * dec_dim, dec_dim),
        "decoder_norm.weight": r(dec_dim),
        "decoder_pred.weight": r(patch_pixels, dec_dim),
        "decoder_pred.bias": r(patch_pixels),
    }


def to_explora_full(sd: dict[str, Tensor], mask_token: Tensor, keep_qkv: bool = True) -> dict:
    """timm -> released ExPLoRA full ``{'teacher': {'backbone.*'}}`` with split q/k/v_proj (and ``qkv`` if kept)."""
    teacher: dict[str, Tensor] = {"backbone.mask_token": mask_token}
    for k, v in sd.items():
        m = re.match(r"^(blocks\.\d+\.attn\.)qkv\.(weight|bias)$", k)
        if m:
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                teacher[f"backbone.{m.group(1)}{name}_proj.{m.group(2)}"] = part.clone()
            if not keep_qkv:
                continue
        teacher["backbone." + k] = v
    teacher["dino_head.last_layer.weight"] = torch.randn(16, 64)
    return {"teacher": teacher}


# ------------------------------------------------------------------------------------------------------------ tests


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    """Bitwise equality of two state dicts (same keys, dtypes, shapes, values)."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


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
        CheckpointError, match=r"evil\.pth: .*pickled test_checkpoints\._Opaque object.*weights_only=True"
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
