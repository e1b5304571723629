"""``explora linprobe`` and ``explora knn``: frozen-feature evaluations of a backbone, configured by dataclasses.

:class:`EvalRunConfig` holds what every evaluation needs (backbone, datasets, loader, output directory);
:class:`LinprobeConfig`, :class:`KnnConfig` (and ``finetune_config.FinetuneConfig``) add their own settings. Each run
writes ``metrics.json`` and the effective ``config.yaml`` into ``out``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from explora.core.config import save_yaml
from explora.core.errors import ConfigError, DataError
from explora.data import build_dataset
from explora.eval.features import EvalTransform, extract_features
from explora.eval.knn import UPSTREAM_KS, knn_classify
from explora.eval.linprobe import UPSTREAM_LRS, LinearProbeConfig, train_linear_probe
from explora.eval.metrics import save_metrics
from explora.models.backbone import build_backbone
from explora.models.export import is_wrapped_export, load_encoder

_log = logging.getLogger(__name__)

CROP_PCT = 224 / 256  # upstream eval transform: Resize 256 + CenterCrop 224


@dataclass
class EvalRunConfig:
    """Backbone, data and output of an evaluation run."""

    backbone: str = ""  # short name (dinov2_vitl14, mae_vitl16, ...) or a timm ViT name
    weights: str | None = None  # checkpoint path (any upstream layout); omitted: random init
    data: str = ""  # dataset spec for training, e.g. fmow:/data/fmow/train.csv
    val_data: str | None = None  # dataset spec for validation (default: data)
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 224  # crop size the backbone sees
    batch_size: int | None = 256  # per device (finetune: null = the recipe's)
    num_workers: int = 4
    device: str = "auto"  # torch device; auto: cuda when available, else cpu
    out: str = ""  # run directory for metrics.json, config.yaml and the confusion matrix

    def validate(self) -> None:
        for key in ("backbone", "data", "out"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is required: give --{key.replace('_', '-')} VALUE (or {key}=VALUE).")

    def torch_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


@dataclass
class LinprobeConfig(EvalRunConfig):
    """DinoV2-protocol linear probe: 28 heads at once on cached features."""

    epochs: int = 10
    iters_per_epoch: int | None = None  # default: one pass (upstream uses 1500)
    probe_batch_size: int = 256
    lrs: tuple[float, ...] = UPSTREAM_LRS  # learning rates tried at once (DinoV2's grid)
    cache_dir: str | None = None  # feature cache (safetensors); omitted: no cache
    bf16: bool = False  # bf16 autocast for feature extraction
    seed: int = 0


@dataclass
class KnnConfig(EvalRunConfig):
    """Weighted kNN (T=0.07) on L2-normalised CLS features."""

    ks: tuple[int, ...] = UPSTREAM_KS  # neighbour counts tried
    temperature: float = 0.07
    cache_dir: str | None = None  # feature cache (safetensors); omitted: no cache
    bf16: bool = False  # bf16 autocast for feature extraction


def eval_datasets(cfg: EvalRunConfig):
    """Train and validation datasets, loaded at the size the eval transform crops ``image_size`` out of."""

    load_size = round(cfg.image_size / CROP_PCT)
    train = build_dataset(cfg.data, split=cfg.train_split, image_size=load_size)
    val = build_dataset(cfg.val_data or cfg.data, split=cfg.val_split, image_size=load_size)
    if val.num_classes > train.num_classes:  # checked now, not after minutes of training
        raise DataError(
            f"--val-data {cfg.val_data or cfg.data!r} has {val.num_classes} classes but --data {cfg.data!r} has "
            f"{train.num_classes}: validation labels {train.num_classes}..{val.num_classes - 1} are out of range "
            "for the classifier; expected the same classes in both (a validation split of the same dataset)."
        )
    return train, val


def eval_backbone(cfg: EvalRunConfig, in_chans: int):

    if is_wrapped_export(cfg.weights):  # group-channel / temporal MAE export: the sidecar describes the model
        return load_encoder(cfg.weights)  # its base architecture comes from the sidecar, not --backbone
    return build_backbone(cfg.backbone, weights=cfg.weights, img_size=cfg.image_size, in_chans=in_chans)


def _features(cfg: LinprobeConfig | KnnConfig, n_blocks: int):

    train, val = eval_datasets(cfg)
    device = cfg.torch_device()
    model = eval_backbone(cfg, len(train.mean)).to(device)
    dtype = torch.bfloat16 if cfg.bf16 else None
    out = []
    for ds, spec, split in ((train, cfg.data, cfg.train_split), (val, cfg.val_data or cfg.data, cfg.val_split)):
        t = EvalTransform(cfg.image_size, tuple(ds.mean), tuple(ds.std), crop_pct=CROP_PCT)
        out.append(
            extract_features(
                model,
                ds,
                t,
                n_blocks=n_blocks,
                batch_size=cfg.batch_size or 256,
                num_workers=cfg.num_workers,
                device=device,
                autocast_dtype=dtype,
                cache_dir=cfg.cache_dir,
                dataset_key=f"{spec}|{split}|{cfg.image_size}",
            )
        )
    return train, out[0], out[1]


def save_run_config(cfg: Any, out: str | Path) -> Path:
    """The effective config of a run, saved atomically as ``<out>/config.yaml``."""
    path = Path(out) / "config.yaml"
    save_yaml(cfg, path)
    return path


def run_linprobe(cfg: LinprobeConfig) -> tuple[dict[str, Any], Path]:
    """Linear probe on frozen features; returns the metrics and the path of ``metrics.json``."""

    save_run_config(cfg, cfg.out)
    probe = LinearProbeConfig(
        batch_size=cfg.probe_batch_size,
        epochs=cfg.epochs,
        iters_per_epoch=cfg.iters_per_epoch,
        lrs=tuple(cfg.lrs),
        device=cfg.torch_device(),
        seed=cfg.seed,
    )
    train_ds, train, val = _features(cfg, max(probe.n_blocks))
    res = train_linear_probe(train, val, train_ds.num_classes, probe)
    metrics = {**res.metrics, "best_head": res.best_head}
    path = save_metrics({**res.metrics, "backbone": cfg.backbone, "weights": cfg.weights}, cfg.out)
    return metrics, path


def run_knn(cfg: KnnConfig) -> tuple[dict[str, Any], Path]:
    """Weighted kNN on frozen CLS features; returns the metrics and the path of ``metrics.json``."""

    save_run_config(cfg, cfg.out)
    train_ds, train, val = _features(cfg, 1)
    m = knn_classify(
        train.cls[:, -1],
        train.labels,
        val.cls[:, -1],
        val.labels,
        train_ds.num_classes,
        ks=tuple(cfg.ks),
        temperature=cfg.temperature,
    )
    path = save_metrics({**m, "backbone": cfg.backbone, "weights": cfg.weights}, cfg.out)
    return m, path


__all__ = ["EvalRunConfig", "KnnConfig", "LinprobeConfig", "eval_backbone", "eval_datasets", "run_knn",
           "run_linprobe", "save_run_config"]
