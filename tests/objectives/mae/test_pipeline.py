"""`explora pretrain objective=mae` end to end (rgb, group-channel, temporal), wrapper export/load, presets."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO
from data_fixtures import fmow_sentinel, fmow_temporal, idx_files
from safetensors.torch import load_file
from timm.layers import resample_patch_embed
from tolerances import FP32_ONE_OP, scaled

from explora.cli.main import main
from explora.models.backbone import build_backbone
from explora.models.export import is_wrapped_export, load_encoder
from explora.models.group_channel import GroupChannelViT
from explora.models.temporal import TemporalViT
from explora.objectives.mae import MAEConfig, MAEObjective, build_mae_objective
from explora.recipes.pretrain import load_config, objective_config

CONFIGS = sorted((REPO / "explora" / "presets").glob("*.yaml"))
SENTINEL_PRESET = REPO / "explora" / "presets" / "mae_vitl16_fmow_sentinel_M-1-L-r32.yaml"

# Tiny model + decoder on top of any MAE config; fp32 and no workers so runs are bitwise reproducible.
TINY = [
    "model.name=test_mae", "model.weights=null", "model.img_size=32", "data.image_size=32", "mae.img_size=32",
    "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=4", "train.num_workers=0", "train.log_every=1",
    "train.tensorboard=false", "train.precision=fp32", "optim.warmup_steps=1",
]
KINDS = {
    # the official MAE ExPLoRA script's decoder: LoRA on Q, V of every decoder block (rank 8, alpha 1 there)
    "rgb": ["objective=mae", "mae.kind=rgb", "adapt.preset=D-[L]-r64", "train.batch_size=4",
            "mae.decoder_lora_rank=2", "mae.decoder_lora_alpha=1.0"],
    # the Sentinel preset itself, shrunk: patch 4 on the 8-px backbone mirrors SatMAE's 8 on the 16-px MAE
    "group_channel": ["mae.patch_size=4", "mae.group_dim=16", "mae.decoder_group_dim=8", "train.batch_size=4"],
    "temporal": ["objective=mae", "mae.kind=temporal", "adapt.preset=M-[1,L]-r32", "mae.time_dim=16",
                 "mae.decoder_time_dim=8", "train.batch_size=2"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mae_data")
    idx_files(root / "fm", n=8, prefix="train")
    return {
        "rgb": f"fashion_mnist:{root / 'fm'}:rgb=true",
        "group_channel": f"fmow_sentinel:{fmow_sentinel(root / 'sentinel', n=8)}",
        "temporal": f"fmow_temporal:{fmow_temporal(root / 'temporal')}",
    }


def _pretrain(kind: str, data: dict[str, str], out: Path, *extra: str) -> int:
    config = ["--config", str(SENTINEL_PRESET)] if kind == "group_channel" else []
    args = ["pretrain", *config, *TINY, *KINDS[kind], f"data.spec={data[kind]}", f"output_dir={out}", *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "decoder freshly initialised": the tiny model has no checkpoint
        return main(args)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads(path):
    cfg = load_config(path)
    section = objective_config(cfg)
    if cfg.objective == "mae":  # MAE optimiser recipe: AdamW (0.9, 0.95), constant wd 0.05, blr x batch / 256
        assert tuple(cfg.optim.betas) == (0.9, 0.95)
        wd = 0.0 if path.name.startswith("official_") else 0.05  # official ExPLoRA MAE script: weight decay 0
        assert cfg.optim.weight_decay == cfg.optim.weight_decay_end == wd
        assert cfg.optim.lr_scaling == "linear" and cfg.optim.reference_batch == 256
        assert section.mask_ratio == 0.75
    if path.name.startswith("mae_vitl16_fmow_sentinel"):
        assert section.kind == "group_channel" and section.drop_bands == (0, 9, 10)
        assert section.groups == ((0, 1, 2, 6), (3, 4, 5, 7), (8, 9))
        assert section.img_size == 96 and section.patch_size == 8 and cfg.adapt.preset == "M-[1,L]-r32"
    if path.name.startswith("mae_vitb16_fmow_rgb") or path.name.startswith("mae_vitl16_fmow_rgb"):
        assert cfg.optim.base_lr == 1.5e-4 and section.kind == "rgb"


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Uninterrupted 2-step runs (checkpoint every step), made once per kind and shared by the tests below."""
    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            out = tmp_path_factory.mktemp(f"ref_{kind}")
            assert _pretrain(kind, data, out, *STEPS) == 0
            done[kind] = out
        return done[kind]

    return get


STEPS = ["train.steps=2", "train.ckpt_every=1"]


@pytest.mark.parametrize("kind", ["rgb", "group_channel", "temporal"])
def test_mae_pretrain_checkpoints_resumes_exactly_and_exports(kind, data, runs, tmp_path):
    ref = runs(kind)
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["last_terms"]["mask_ratio"] == pytest.approx(0.75, abs=0.07)

    # The checkpoint holds the decoder and every new tensor, but not the frozen pre-trained weights.
    state = torch.load(ref / "checkpoints" / "ckpt-00000002.pt", weights_only=False)["objective"]
    assert "decoder.decoder_pred.weight" in state or "decoder.decoder_pred.0.weight" in state
    assert "decoder.mask_token" in state and "decoder.decoder_blocks.0.attn.qkv.weight" in state
    assert any(k.startswith("encoder.blocks.1.attn.qkv.lora_") for k in state)  # LoRA on Q, V of block 1
    assert "encoder.blocks.1.attn.qkv.weight" not in state  # frozen pre-trained tensor: rebuilt on resume
    if kind == "group_channel":
        assert state["encoder.patch_embed.proj.0.weight"].shape == (64, 4, 4, 4)  # 4 bands, patch 4
        assert {"encoder.patch_embed.pos_embed", "encoder.patch_embed.group_embed"} <= set(state)
    if kind == "temporal":
        assert "encoder.pos_embed" in state
    if kind == "rgb":  # decoder LoRA factors and the decoder norms that train with them
        assert {"decoder.decoder_blocks.0.attn.qkv.lora_A", "decoder.decoder_blocks.0.attn.qkv.lora_B",
                "decoder.decoder_norm.weight"} <= set(state)

    # A run killed right after its step-1 checkpoint (its directory as the reference left it then), resumed to
    # step 2: the export is bitwise equal to the uninterrupted run's.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(ref / "config.yaml", run / "config.yaml")
    for p in (ref / "checkpoints").glob("ckpt-00000001.*"):
        shutil.copy(p, run / "checkpoints" / p.name)
    assert _pretrain(kind, data, run, *STEPS, "--resume") == 0
    a, b = load_file(ref / "export" / "model.safetensors"), load_file(run / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... and so is everything else that trained (decoder, its LoRA, mask token), which the export leaves out
    resumed = torch.load(run / "checkpoints" / "ckpt-00000002.pt", weights_only=False)["objective"]
    assert resumed.keys() == state.keys() and all(torch.equal(resumed[k], state[k]) for k in state)
    step1 = torch.load(ref / "checkpoints" / "ckpt-00000001.pt", weights_only=False)["objective"]
    assert any(not torch.equal(step1[k], state[k]) for k in state if "decoder." in k)  # the decoder did train

    encoder = load_encoder(run / "export")
    assert is_wrapped_export(run / "export") == (kind != "rgb")
    with torch.no_grad():
        if kind == "rgb":
            assert encoder.forward_features(torch.rand(2, 3, 32, 32)).shape == (2, 17, 64)
        elif kind == "group_channel":
            assert isinstance(encoder, GroupChannelViT) and encoder.export_config()["drop_bands"] == [0, 9, 10]
            assert encoder.forward_features(torch.rand(2, 13, 32, 32)).shape == (2, 1 + 3 * 64, 64)  # 3 groups x 8x8
        else:
            assert isinstance(encoder, TemporalViT) and encoder.time_offset == (2002.0, 1.0, 0.0)  # SatMAE
            ts = torch.tensor([[[2014, 2, 9], [2015, 3, 11], [2016, 5, 10]]] * 2)
            assert encoder(torch.rand(2, 9, 32, 32), ts).shape == (2, 64)


def test_group_channel_export_drives_linprobe_and_knn(data, runs, tmp_path):
    common = ["--backbone", "test_mae", "--weights", str(runs("group_channel") / "export"),
              "--data", data["group_channel"], "--image-size", "32", "--batch-size", "8", "--num-workers", "0"]
    assert main(["linprobe", *common, "--epochs", "2", "--probe-batch-size", "4", "--lrs", "0.1",
                 "--out", str(tmp_path / "lp")]) == 0
    m = json.loads((tmp_path / "lp" / "metrics.json").read_text())
    assert 0.0 <= m["top1"] <= 100.0 and m["best_n_blocks"] == 1 and m["best_avgpool"] is False  # pooled feature
    assert main(["knn", *common, "--ks", "1", "--out", str(tmp_path / "knn")]) == 0
    m = json.loads((tmp_path / "knn" / "metrics.json").read_text())
    assert m["top1"] == 100.0  # val = train and every feature is distinct: the 1-NN is the sample itself


def test_temporal_export_drives_knn_with_timestamps(data, runs, tmp_path):
    assert main(["knn", "--backbone", "test_mae", "--weights", str(runs("temporal") / "export"),
                 "--data", data["temporal"], "--image-size", "32", "--batch-size", "5", "--num-workers", "0",
                 "--ks", "1", "--out", str(tmp_path / "knn")]) == 0
    assert json.loads((tmp_path / "knn" / "metrics.json").read_text())["top1"] == 100.0


def _tiny_objective(**kw) -> MAEObjective:
    cfg = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_mae_objective(build_backbone("test_mae"), MAEConfig(**cfg, **kw))


def test_parameter_report_counts_the_decoder_when_it_trains():
    # Hand count, 1-block 32-wide decoder on a 64-wide encoder, patch 8, RGB:
    # embed 64*32+32 = 2080; mask token 32; block: norms 2*64, qkv 32*96+96, proj 32*32+32, fc1 32*128+128,
    # fc2 128*32+32 -> 12704; decoder_norm 64; pred 32*192+192 = 6336. Total 21216 (pos-embed is a fixed buffer).
    report = _tiny_objective().parameter_report()
    assert report.extra == {"decoder": 21216}
    assert report.trainable_total == report.paper_count + 21216
    frozen = _tiny_objective(train_decoder=False).parameter_report()
    assert frozen.extra == {"decoder": 0}


def test_temporal_time_offset_is_subtracted_before_encoding(tiny_mae):
    ts = torch.tensor([[[2016, 1, 10], [2017, 6, 12], [2018, 11, 15]]])
    offset = MAEConfig().time_offset
    shifted = TemporalViT(tiny_mae, num_frames=3, time_dim=16, time_offset=offset)
    plain = TemporalViT(tiny_mae, num_frames=3, time_dim=16)
    x = torch.rand(1, 9, 32, 32)
    a, _ = shifted.embed(x, ts)
    b, _ = plain.embed(x, ts - torch.tensor([2002, 1, 0]))
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain.embed(x, ts)[0])
    assert shifted.shift_timestamps(ts)[0, 0].tolist() == [14.0, 0.0, 10.0]  # SatMAE: year - 2002, month - 1


def test_group_patch_resized_from_rgb_filter(tiny_mae):
    """Each group projection is the RGB filter's band mean, resized 8 -> 4 px with timm's resample_patch_embed
    (FlexiViT pseudo-inverse), times 3/n for n bands; the RGB bias is copied."""
    enc = GroupChannelViT(tiny_mae, groups=((0, 1), (2,)), patch_size=4, group_dim=16)
    assert enc.patch_embed.proj[0].weight.shape == (64, 2, 4, 4) and enc.patch_embed.grid == (8, 8)
    # each band's filter: the mean RGB 8x8 filter, FlexiViT-resized to 4x4 (timm), scaled by 3 / bands in the group
    rgb = tiny_mae.patch_embed.proj
    resized = resample_patch_embed(rgb.weight.detach().mean(1, keepdim=True), [4, 4])  # (D, 1, 4, 4)
    tol = scaled(FP32_ONE_OP, resized)  # filter weights are ~0.01, far from order 1
    torch.testing.assert_close(enc.patch_embed.proj[0].weight.detach(), resized.repeat(1, 2, 1, 1) * 1.5, **tol)
    torch.testing.assert_close(enc.patch_embed.proj[1].weight.detach(), resized * 3.0, **tol)
    assert all(torch.equal(p.bias, rgb.bias) for p in enc.patch_embed.proj)
    # A constant image: every group's token is the same (the 3/n scale makes it independent of the group size)
    x = torch.ones(1, 3, 32, 32)
    tokens, grid = enc.patch_embed(x)
    assert grid == (8, 8) and tokens.shape == (1, 2, 64, 64)
    content = tokens - enc.patch_embed.encoding(grid)  # (1, G, L, D) without the position/group encoding
    expected = resized.sum(dim=(1, 2, 3)) * 3 + rgb.bias  # (D,)
    torch.testing.assert_close(content[0], expected.expand(2, 64, -1), **FP32_ONE_OP)
    cfg = enc.export_config()
    assert GroupChannelViT.from_config(build_backbone("test_mae"), cfg).export_config() == cfg
