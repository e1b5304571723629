"""Configs of ``explora segment`` (train + evaluate a segmentation model) and ``explora predict`` (sliding-window
inference of a trained one on whole scenes), and the runs that hand them to :mod:`explora.recipes.segment` and
:mod:`explora.recipes.predict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from explora.core.errors import ConfigError, DataError
from explora.data import build_dataset
from explora.data.dense import is_dense
from explora.data.dense_augment import DenseAugConfig
from explora.engine.trainer import TrainConfig
from explora.models.seg_heads import HEADS
from explora.objectives.segmentation import SegLossConfig
from explora.recipes.evaluate import EvalRunConfig, eval_backbone, save_run_config
from explora.recipes.segment import SEG_MODES, run_segment, segment_optim


@dataclass
class SegmentConfig(EvalRunConfig):
    """Semantic segmentation: frozen / LoRA-r8 / full encoder, linear or UPerNet head, mIoU on --val-data."""

    data: str = ""  # dense dataset spec, e.g. seg_folder:/data/water:classes=2 or spacenet:/data/AOI_2_Vegas
    image_size: int = 224  # training crop / validation chip size (a multiple of the patch size)
    batch_size: int | None = 16  # per device
    mode: Literal["frozen", "lora", "full"] = "lora"  # frozen: PANGAEA's protocol; lora: the paper's LoRA-r8
    head: Literal["linear", "upernet"] = "linear"
    blocks: tuple[int, ...] | None = None  # blocks the head reads (null: linear the last; upernet by depth)
    channels: int = 256  # UPerNet width
    lora_rank: int | None = None  # null: the LoRA-r8 preset's 8
    steps: int | None = None  # optimiser steps (default 1000 unless epochs is given)
    epochs: float | None = None
    base_lr: float | None = None  # default 1e-3, no batch scaling (lower it for mode full)
    weight_decay: float | None = None  # default 0.05
    warmup_steps: int | None = None  # default 10 % of the run
    class_weights: tuple[float, ...] | None = None  # cross-entropy weight per class
    dice_weight: float = 0.0  # weight of a soft Dice term (0: cross-entropy only)
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop area range
    rot90: bool = True  # random 90-degree rotations (overhead imagery)
    eval_batch_size: int = 16
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    eval_every: int = 0  # steps between evaluations (0: one epoch)
    resume: bool = False  # continue from the newest intact checkpoint in out
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.mode not in SEG_MODES:
            raise ConfigError(f"config.mode: got {self.mode!r}, expected one of {list(SEG_MODES)}.")
        if self.head not in HEADS:
            raise ConfigError(f"config.head: got {self.head!r}, expected one of {list(HEADS)}.")
        if self.dice_weight < 0:
            raise ConfigError(f"config.dice_weight: got {self.dice_weight}, expected a number >= 0.")


def segment_datasets(cfg: SegmentConfig):
    """Train and validation dense datasets at ``image_size`` (masks resampled nearest-neighbour)."""
    train = build_dataset(cfg.data, split=cfg.train_split, image_size=cfg.image_size)
    val = build_dataset(cfg.val_data or cfg.data, split=cfg.val_split, image_size=cfg.image_size)
    for flag, spec, ds in (("--data", cfg.data, train), ("--val-data", cfg.val_data or cfg.data, val)):
        if not is_dense(ds):
            raise DataError(f"{flag} {spec!r} yields image labels; segmentation needs a dense spec "
                            "(seg_folder:, seg_csv:, spacenet:)")
    return train, val


def run_segment_config(cfg: SegmentConfig) -> dict[str, Any]:
    """Train and evaluate as configured; the metrics of :func:`explora.recipes.segment.run_segment`."""
    train, val = segment_datasets(cfg)
    backbone = eval_backbone(cfg, len(train.mean))
    save_run_config(cfg, cfg.out)
    optim = segment_optim(base_lr=cfg.base_lr, weight_decay=cfg.weight_decay, weight_decay_end=cfg.weight_decay,
                          warmup_steps=cfg.warmup_steps)
    steps = cfg.steps if cfg.steps is not None or cfg.epochs is not None else 1000
    train_cfg = TrainConfig(steps=steps, epochs=cfg.epochs, batch_size=cfg.batch_size or 16,
                            num_workers=cfg.num_workers, seed=cfg.seed, precision=cfg.precision,
                            eval_every=cfg.eval_every)
    aug = DenseAugConfig(scale=tuple(cfg.crop_scale), rot90=cfg.rot90)
    loss = SegLossConfig(class_weights=tuple(cfg.class_weights) if cfg.class_weights else None,
                         dice_weight=cfg.dice_weight)
    metrics = run_segment(backbone.to(cfg.torch_device()), train, val, cfg.out, image_size=cfg.image_size,
                          mode=cfg.mode, head=cfg.head, blocks=tuple(cfg.blocks) if cfg.blocks else None,
                          lora_rank=cfg.lora_rank, channels=cfg.channels, aug=aug, loss=loss, optim=optim,
                          train_cfg=train_cfg, eval_batch_size=cfg.eval_batch_size, resume=cfg.resume)
    return {**metrics, "best_dir": str(Path(cfg.out) / "best")}


@dataclass
class PredictConfig:
    """Class maps (and probabilities) of whole scenes with a model trained by ``explora segment``."""

    run: str = ""  # the `explora segment` run directory (config.yaml + best/model.safetensors)
    input: tuple[str, ...] = ()  # image files (PNG, JPEG, GeoTIFF of any size)
    out: str = ""  # output folder: <stem>_classes.png|tif (+ <stem>_probs.tif)
    window: int | None = None  # window size (null: the run's image_size)
    overlap: int | None = None  # pixels shared by neighbouring windows (null: window / 4)
    blend: Literal["hann", "linear", "none"] = "hann"  # weighting of overlapping windows
    batch_size: int = 8  # windows per forward
    probs: bool = False  # also write per-class probabilities (uint8, 255 = 1) as a GeoTIFF
    scratch: str | None = None  # folder for memory-mapped accumulators (scenes larger than memory)
    device: str = "auto"

    def validate(self) -> None:
        for key in ("run", "out"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is required: give --{key} VALUE (or {key}=VALUE).")
        if not self.input:
            raise ConfigError("input is required: give --input SCENE.tif [...]")


__all__ = ["PredictConfig", "SegmentConfig", "run_segment_config", "segment_datasets"]
