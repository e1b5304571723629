"""DDP with 2 gloo processes on CPU trains a DINOv3 (timm Eva) ExPLoRA model exactly as one process does on the same
global batch (the protocol of tests/engine/test_parallel.py: per-sample views so every rank augments alike, KoLeo
off because it is per-process upstream)."""

from __future__ import annotations

import csv
import functools
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dinov2_fixtures import FixedImages, PerSampleViews
from safetensors.torch import load_file
from tolerances import FP32_TRAINING

pytestmark = pytest.mark.dist

TINY = [
    "model.name=test_dinov3", "model.weights=null", "adapt.preset=D3-[L]-r64-reg", "adapt.lora_rank=4",
    "data.image_size=32", "dinov2.n_prototypes=64", "dinov2.hidden_dim=32", "dinov2.bottleneck_dim=16",
    "dinov2.separate_head=true", "dinov2.centering=sinkhorn_knopp", "dinov2.global_size=32",
    "dinov2.local_size=16", "dinov2.n_local=2", "dinov2.koleo_loss_weight=0", "dinov2.warmup_teacher_temp_steps=2",
    "optim.base_lr=0.05", "train.num_workers=0", "train.log_every=1", "train.tensorboard=false",
    "train.precision=fp32", "train.ckpt_every=1000", "train.steps=2",
]
COMPARED = ("loss", "dino_local", "dino_global", "ibot", "grad_norm")


def _run(out: Path, strategy: str, batch_size: int) -> None:
    from explora.engine import parallel as D
    from explora.engine.trainer import train
    from explora.models.export import export_backbone
    from explora.recipes.pretrain import build_objective, load_config

    cfg = load_config(None, [*TINY, f"train.batch_size={batch_size}", f"train.strategy={strategy}"])
    objective = build_objective(cfg)
    objective.batch_transform = functools.partial(PerSampleViews, patch=16)  # a 2x2 grid of 16-px patches
    train(objective, FixedImages(24, seed=5), cfg.optim, cfg.train, out)
    if D.is_main():
        export_backbone(objective.export_backbone(), out / "export", timm_name="vit_small_patch16_dinov3",
                        formats=("safetensors",))
    D.barrier()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from explora.engine import parallel as D

    try:
        _run(Path(out), "ddp", 8 // world)
    finally:
        D.cleanup()


def _curves(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: float(row[k]) for k in COMPARED} for row in csv.DictReader(f)]


def test_ddp_dinov3_matches_single_process(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path / "ddp")), nprocs=2, join=True)
    torch.set_num_threads(1)
    _run(tmp_path / "single", "none", 8)
    a, b = _curves(tmp_path / "ddp"), _curves(tmp_path / "single")
    assert len(a) == len(b) == 2 and a[0]["ibot"] > 0
    for row_a, row_b in zip(a, b):
        assert row_a == pytest.approx(row_b, rel=FP32_TRAINING["rtol"], abs=FP32_TRAINING["atol"])
    wa, wb = (load_file(tmp_path / r / "export" / "model.safetensors") for r in ("ddp", "single"))
    assert wa.keys() == wb.keys() and "reg_token" in wa
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
