"""`explora pretrain` end to end on the tiny architecture: train, checkpoint, export, resume, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import REPO
from safetensors.torch import load_file
from tolerances import FP32_TRAINING

from explora.cli.main import main
from explora.core.errors import ConfigError
from explora.models.record import record_of
from explora.recipes.pretrain import build_objective, load_config

TINY = [
    "model.name=test_dinov2",
    "model.weights=null",
    "data.image_size=32",
    "dinov2.n_prototypes=64",
    "dinov2.hidden_dim=32",
    "dinov2.bottleneck_dim=16",
    "dinov2.global_size=32",
    "dinov2.local_size=16",
    "dinov2.n_local=2",
    "train.batch_size=8",
    "train.num_workers=0",
    "train.log_every=1",
    "train.tensorboard=false",
    "train.precision=fp32",
]


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def _curves(run: Path) -> list[dict[str, str]]:
    """Every logged value except throughput (wall-clock dependent)."""
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in csv.DictReader(f)]


def _args(idx_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", *TINY, f"data.spec=fashion_mnist:{idx_dir}:rgb=true", f"output_dir={out}", *extra]


def test_pretrain_trains_exports_and_resumes_exactly(idx_dir, tmp_path):
    ref = tmp_path / "ref"
    assert main(_args(idx_dir, ref, "train.steps=6", "train.ckpt_every=3")) == 0
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["steps"] == 6 and set(summary["exports"]) >= {"safetensors", "encoder", "teacher"}
    assert (ref / "config.yaml").is_file() and (ref / "metrics.csv").is_file()
    assert summary["images"] == 64 and summary["effective_batch"] == 8 and summary["precision"] == "fp32"
    assert summary["preset"] == "D-[L]-r64" and summary["wall_time_s"] > 0 and summary["hardware"]
    card = (ref / "export" / "README.md").read_text()  # the model card, from the run's own files
    assert card.startswith("---\nlibrary_name: timm\nlicense: apache-2.0\n") and "| optimiser steps | 6 |" in card
    exported = timm.create_model(f"local-dir:{ref / 'export'}", pretrained=True)  # config.json: nothing else given
    assert exported.num_features == 64 and len(exported.pretrained_cfg["mean"]) == 3

    # Same run, cut at step 3 (as if killed right after its checkpoint), then resumed to step 6.
    run = tmp_path / "run"
    assert main(_args(idx_dir, run, "train.steps=6", "train.ckpt_every=3")) == 0
    for p in (run / "checkpoints").glob("ckpt-00000006.*"):
        p.unlink()
    (run / "summary.json").unlink()
    assert main(_args(idx_dir, run, "train.steps=6", "train.ckpt_every=3", "--resume")) == 0
    a = load_file(ref / "export" / "model.safetensors")
    b = load_file(run / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _curves(ref) == _curves(run)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(idx_dir, tmp_path):
    """A real process, killed with SIGKILL while training (possibly inside a checkpoint write).

    All three runs are fresh processes, so no state left in the test process by other tests (thread count, attention
    kernels) can make the reference differ from the resumed run.
    """
    ref, run = tmp_path / "ref", tmp_path / "run"
    steps = ["train.steps=12", "train.ckpt_every=2", "train.keep_last=1"]
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def explora(out: Path, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "explora", *_args(idx_dir, out, *steps), *extra]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    assert explora(ref).wait() == 0
    proc = explora(run)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "checkpoints").glob("ckpt-0000000[4-9].json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    assert explora(run, "--resume").wait() == 0
    a = load_file(ref / "export" / "model.safetensors")
    b = load_file(run / "export" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_exit_nonzero_with_a_named_message(idx_dir, tmp_path, capsys):
    assert main(["pretrain", "trian.steps=3"]) == 2
    assert "unknown key 'trian'" in _err(capsys)
    assert main(["pretrain", *TINY, "data.spec=fashion_mnist:/nonexistent/dir", f"output_dir={tmp_path}"]) == 2
    assert "/nonexistent/dir" in _err(capsys)
    # grayscale data into an RGB model
    assert main(["pretrain", *TINY, f"data.spec=fashion_mnist:{idx_dir}", f"output_dir={tmp_path / 'g'}"]) == 2
    assert "has 1 band(s) but the model takes model.in_chans=3" in _err(capsys)
    assert (
        main(
            [
                "pretrain",
                *TINY,
                f"data.spec=fashion_mnist:{idx_dir}:rgb=true",
                "adapt.preset=D-[L]-r46",
                f"output_dir={tmp_path / 'p'}",
            ]
        )
        == 2
    )
    assert "D-[L]-r64" in _err(capsys)


def test_compiled_blocks_train_like_eager(idx_dir, tmp_path, monkeypatch):
    """model.compile=true: every block compiled in place; same losses as eager, same export keys and weights."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # inductor's on-disk graph cache is not keyed by the vector ISA: a run under another ATEN_CPU_CAPABILITY would
    # load kernels generated for this CPU's ISA (NaN losses under avx2, C++ errors under default), so one cache per ISA
    isa = torch.backends.cpu.get_cpu_capability().lower()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", f"{default_cache_dir()}-{isa}")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    # no KoLeo: these near-duplicate images put CLS tokens ~1e-10 apart, where -log(distance) and its gradient turn
    # the fused kernels' rounding into percent-level differences (test_distributed.py does the same)
    common = ("train.steps=2", "dinov2.koleo_loss_weight=0")
    assert main(_args(idx_dir, eager, *common)) == 0
    assert main(_args(idx_dir, compiled, *common, "model.compile=true")) == 0
    for a, b in zip(_curves(eager), _curves(compiled), strict=True):
        a, b = ({k: float(v) for k, v in row.items() if k != "koleo"} for row in (a, b))
        assert b == pytest.approx(a, rel=FP32_TRAINING["rtol"])
    wa = load_file(eager / "export" / "model.safetensors")
    wb = load_file(compiled / "export" / "model.safetensors")
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    with pytest.raises(ConfigError, match="model.compile"):
        build_objective(load_config(None, [*TINY, "model.compile=true", "train.strategy=fsdp2"]))


def test_compiled_blocks_train_in_bf16(idx_dir, tmp_path, monkeypatch):
    """model.compile=true with bf16: the compiled blocks run inside the objective's frozen-weight cast cache and
    the engine's CPU bf16 attention (both torch-function modes; the cache stands aside in compiled graphs), global
    and local crops alike, and train as the eager blocks do up to bf16 rounding."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    isa = torch.backends.cpu.get_cpu_capability().lower()  # one inductor cache per ISA (as above)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", f"{default_cache_dir()}-{isa}")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = ("train.steps=2", "train.precision=bf16", "dinov2.koleo_loss_weight=0")
    assert main(_args(idx_dir, eager, *common)) == 0
    assert main(_args(idx_dir, compiled, *common, "model.compile=true")) == 0
    for a, b in zip(_curves(eager), _curves(compiled), strict=True):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=2e-2)


CONFIGS = REPO / "explora" / "presets"


def test_out_of_range_unfrozen_block_in_a_config_is_refused(idx_dir, tmp_path, capsys):
    """The ViT-L index 23 on a shallower model (the official script's ViT-B pitfall) stops the run with the range."""
    assert main(_args(idx_dir, tmp_path / "r", "adapt.unfrozen_blocks=[23]", "train.steps=1")) == 2
    assert "block index 23 is out of range for a model with 4 blocks (valid: -4..3" in _err(capsys)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_adapt_train_cls_token_from_the_config():
    objective = build_objective(load_config(None, [*TINY, "adapt.train_cls_token=true"]))
    backbone = objective.student["backbone"]
    assert backbone.cls_token.requires_grad and not backbone.pos_embed.requires_grad
    assert record_of(backbone).spec.train_cls_token and not record_of(backbone).spec.train_tokens


@pytest.mark.parametrize("name", ["official_dinov2_vitl14_fmow", "official_dinov2_vitb14_fmow"])
def test_official_dinov2_configs(name):
    """scripts/pretrain_dino.sh + DinoV2 ssl_default_config.yaml, official iterations (micro-batches of 32 images)
    converted to optimiser steps of 1024 images. Needs train.effective_batch."""
    import math

    from explora.core.schedules import scaled_lr

    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.name == ("dinov2_vitl14" if "vitl14" in name else "dinov2_vitb14")
    assert cfg.adapt.preset == "D-[L]-r64-official" and cfg.model.drop_path_rate == 0.0
    t, o, d = cfg.train, cfg.optim, cfg.dinov2
    assert (t.batch_size, t.effective_batch) == (8, 1024)
    per_step = t.effective_batch // 32  # 32 official iterations (8 x 4 GPUs each) per optimiser step
    assert t.steps == math.ceil(150_000 / per_step) == 4688
    assert o.warmup_steps == math.ceil(10 * 1000 / per_step) == 313
    assert o.freeze_last_layer_steps == math.ceil(3 * 1000 / per_step) == 94
    assert d["warmup_teacher_temp_steps"] == math.ceil(30 * 1000 / per_step) == 938
    assert scaled_lr(o.base_lr, t.effective_batch, o.reference_batch, o.lr_scaling) == 0.001
    assert (o.min_lr, o.weight_decay, o.weight_decay_end, tuple(o.betas)) == (1e-6, 0.04, 0.4, (0.9, 0.999))
    assert (o.layer_decay, o.patch_embed_lr_mult, o.clip_grad) == (0.9, 0.2, 3.0)
    assert {k: d[k] for k in ("n_prototypes", "bottleneck_dim", "hidden_dim", "head_nlayers", "separate_head")} == {
        "n_prototypes": 65536, "bottleneck_dim": 256, "hidden_dim": 2048, "head_nlayers": 3, "separate_head": False}
    assert (d["centering"], d["center_momentum"], d["momentum_teacher"], d["final_momentum_teacher"]) == (
        "centering", 0.9, 0.992, 1.0)
    assert (d["warmup_teacher_temp"], d["teacher_temp"], d["student_temp"], d["koleo_loss_weight"]) == (
        0.04, 0.07, 0.1, 0.1)
    assert (d["mask_probability"], d["mask_ratio_min_max"]) == (0.5, [0.1, 0.5])
    assert (d["global_size"], d["global_scale"], d["n_local"], d["local_size"], d["local_scale"]) == (
        224, [0.32, 1.0], 8, 98, [0.05, 0.32])


def test_official_mae_config():
    """scripts/pretrain_mae.sh + mae/pretrain.py. Needs train.epochs/effective_batch, optim.warmup_epochs,
    mae.decoder_lora_rank/_alpha and the named weights `visualize`."""
    from explora.core.schedules import scaled_lr

    cfg = load_config(CONFIGS / "official_mae_vitl16_fmow_rgb.yaml")
    assert cfg.model.name == "mae_vitl16" and cfg.model.weights == "visualize"
    assert cfg.adapt.preset == "M-[L]-r64-official"
    t, o, m = cfg.train, cfg.optim, cfg.mae
    assert (t.batch_size, t.effective_batch, t.epochs, t.seed) == (64, 1024, 400, 42)
    assert o.warmup_epochs == 1 and o.min_lr == 0.0
    assert scaled_lr(o.base_lr, t.effective_batch, o.reference_batch, o.lr_scaling) == pytest.approx(1.8e-3)
    assert (o.weight_decay, o.weight_decay_end, tuple(o.betas), o.layer_decay, o.clip_grad) == (
        0.0, 0.0, (0.9, 0.95), 1.0, 0.0)
    assert (m["mask_ratio"], m["norm_pix_loss"], m["decoder_lora_rank"], m["decoder_lora_alpha"]) == (
        0.75, True, 8, 1.0)


@pytest.mark.parametrize(
    "name,backbone,extra_key,extra",
    [
        # the paper's 18.7M: block 23 + LoRA r64 + norms (18,723,840) + the cls token (1,024)
        ("official_dinov2_vitl14_fmow", 18_724_864, None, None),
        ("official_dinov2_vitb14_fmow", 9_288_192, None, None),  # the paper's ~9M
        # encoder as D-[L]-r64-official without LayerScale; decoder: LoRA r8 on Q,V of 8 blocks of width 512
        # (8 x 2 x 8 x (512 + 512) = 131,072) + its norms (8 x 2 x 2 x 512 + 2 x 512 = 17,408)
        ("official_mae_vitl16_fmow_rgb", 18_722_816, "decoder", 131_072 + 17_408),
    ],
)
def test_official_configs_reproduce_the_paper_counts(name, backbone, extra_key, extra, capsys):
    assert main(["params", "--json", "--config", str(CONFIGS / f"{name}.yaml")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_backbone"] == backbone
    assert report["groups"]["embeddings"] == (768 if "vitb14" in name else 1024)  # the cls token
    if extra_key is not None:
        assert report["extra"][extra_key] == extra
