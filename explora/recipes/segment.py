"""Semantic segmentation on any explora encoder: frozen (PANGAEA's protocol), LoRA-r8 (the paper's) or full
fine-tuning, with a linear or UPerNet head, trained by the engine and evaluated by mIoU.

The backbone is prepared by :func:`explora.recipes.finetune.prepare_backbone` (the same LoRA-r8 preset as
fine-tuning), the model is :class:`explora.models.seg_heads.SegmentationModel`, the loss and the paired
augmentation are :class:`explora.objectives.segmentation.SegmentationObjective`; the loop, checkpoints and exact
resume are the engine's (:func:`explora.engine.trainer.train`), as for ``explora finetune``. Evaluation runs every
``eval_every`` steps (default one epoch) on the validation chips; the best model by validation mIoU is kept in
``<out>/best/``. The run directory gets ``metrics.json`` (``explora report`` lists its mIoU),
``confusion_matrix.png``, ``eval_history.json``, ``segmenter.json`` (what ``explora predict`` rebuilds the model
from) and the report (:func:`write_segment_report`).

Default optimisation (:data:`SEGMENT_OPTIM`): AdamW lr 1e-3 (no batch scaling), weight decay 0.05, warm-up 10 %,
cosine to 1e-6, layer decay 1.0, global gradient clipping at 3 -- a setting that trains the heads and LoRA alike;
for full fine-tuning lower ``base_lr`` (PANGAEA fine-tunes at 1e-4).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from explora.core.errors import ConfigError, DataError
from explora.core.io import atomic_write_bytes
from explora.data.dense import IGNORE_INDEX, is_dense
from explora.data.dense_augment import DenseAugConfig
from explora.data.stats import spread_indices
from explora.engine import parallel as D
from explora.engine.lengths import resolve_lengths, run_length
from explora.engine.trainer import OptimConfig, TrainConfig, train
from explora.eval.metrics import save_metrics
from explora.eval.seg_metrics import mean_and_se, pixel_confusion, plot_per_class_iou, segmentation_metrics
from explora.models.classifier import trainable_counts
from explora.models.encoder import as_encoder, encoder_kind
from explora.models.export import export_backbone, is_wrapped
from explora.models.model_card import write_model_card
from explora.models.seg_heads import SegmentationModel
from explora.objectives.base import Objective
from explora.objectives.segmentation import SegLossConfig, SegmentationObjective, SegmentationSettings, normalise
from explora.recipes.finetune import prepare_backbone, save_best_model

SegMode = Literal["frozen", "lora", "full"]
SEG_MODES = ("frozen", "lora", "full")
SEGMENT_OPTIM: dict[str, Any] = dict(
    base_lr=1e-3, lr_scaling="none", min_lr=1e-6, weight_decay=0.05, weight_decay_end=0.05, layer_decay=1.0,
    patch_embed_lr_mult=1.0, clip_grad=3.0, clip_grad_mode="global", freeze_last_layer_steps=0,
)
OVERLAY_CHIPS = 4  # validation chips drawn in the report (evenly spread: the same set in every run)
REPORT_MD = "report.md"
IOU_PNG = "per_class_iou.png"
OVERLAY_PNG = "overlays.png"
SEGMENTER_FILE = "segmenter.json"  # what `explora predict` needs besides the weights
ENCODER_DIR = "encoder"  # best/encoder/: the adapted encoder alone, a timm local-dir export


def prepare_segmenter(backbone: nn.Module, num_classes: int, mode: SegMode = "lora", head: str = "linear",
                      blocks: tuple[int, ...] | None = None, lora_rank: int | None = None,
                      preset: str = "LoRA-r8", channels: int = 256) -> SegmentationModel:
    """Freeze/adapt ``backbone`` for ``mode`` (``frozen``: no backbone parameter trains) and add the head
    (always trainable)."""
    if mode not in SEG_MODES:
        raise ConfigError(f"segment mode: got {mode!r}, expected one of {SEG_MODES}")
    prepare_backbone(backbone, "head" if mode == "frozen" else mode, lora_rank=lora_rank, preset=preset)
    model = SegmentationModel(backbone, num_classes, head=head, blocks=blocks, channels=channels)
    model.head.requires_grad_(True)
    return model


@torch.no_grad()
def predict_batches(model: nn.Module, dataset, mean, std, batch_size: int = 16, device: str | torch.device = "cpu"):
    """Yield ``(images (B, C, H, W) as loaded, masks (B, H, W), predicted classes (B, H, W))`` over ``dataset``."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    try:
        for images, masks in loader:
            logits = model(normalise(images.to(device), tuple(mean), tuple(std)))  # (B, K, H, W)
            yield images, masks, logits.argmax(1).cpu()
    finally:
        model.train(was_training)


def evaluate_segmentation(model: nn.Module, dataset, mean, std, num_classes: int, batch_size: int = 16,
                          device: str | torch.device = "cpu", class_names: list[str] | None = None) -> dict[str, Any]:
    """mIoU & co. over every pixel of ``dataset`` (:func:`explora.eval.seg_metrics.segmentation_metrics`) plus the
    mean and standard error over chips of each chip's own mIoU (``miou_chip_mean``, ``miou_chip_se``)."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    chips: list[float] = []
    for _, masks, preds in predict_batches(model, dataset, mean, std, batch_size, device):
        for m, p in zip(masks, preds, strict=True):
            c = pixel_confusion(p, m, num_classes)
            cm += c
            if c.sum() > 0:
                chips.append(segmentation_metrics(c)["miou"])
    out = segmentation_metrics(cm, class_names)
    out["miou_chip_mean"], out["miou_chip_se"] = mean_and_se(chips)
    out["num_samples"] = len(dataset)
    return out


def _colours(k: int) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    table = np.array([cmap(i % cmap.N)[:3] for i in range(k)] + [(0.0, 0.0, 0.0)])
    return table  # (K + 1, 3); the last row is ignored pixels


def plot_overlays(model: nn.Module, dataset, mean, std, path: Path, n: int = OVERLAY_CHIPS,
                  device: str | torch.device = "cpu") -> Path:
    """A grid of image / ground truth / prediction for ``n`` chips evenly spread over ``dataset`` (PNG); ignored
    pixels are black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subset = torch.utils.data.Subset(dataset, spread_indices(len(dataset), n))
    images, masks, preds = next(predict_batches(model, subset, mean, std, len(subset), device))
    table = _colours(dataset.num_classes)
    fig, axes = plt.subplots(len(subset), 3, figsize=(7.5, 2.5 * len(subset)), squeeze=False)
    for i in range(len(subset)):
        x = images[i].float() / (255.0 if images.dtype == torch.uint8 else 1.0)
        x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
        lo, hi = x.amin(), x.amax()
        rgb = ((x - lo) / (hi - lo).clamp(min=1e-6)).permute(1, 2, 0).numpy()
        m = masks[i].clone()
        m[m == IGNORE_INDEX] = dataset.num_classes
        for ax, img, title in ((axes[i, 0], rgb, "image"), (axes[i, 1], table[m.numpy()], "ground truth"),
                               (axes[i, 2], table[preds[i].numpy()], "prediction")):
            ax.imshow(img)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_segment_report(metrics: dict[str, Any], out_dir: Path, model: nn.Module | None = None, dataset=None,
                         mean=None, std=None, device: str | torch.device = "cpu") -> dict[str, Path]:
    """``report.md`` (metric table + per-class IoU), ``per_class_iou.png`` and, given the model and validation
    set, ``overlays.png`` of the fixed validation chips."""
    out_dir = Path(out_dir)
    names = metrics.get("class_names") or [str(i) for i in range(len(metrics["per_class_iou"]))]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        f"# Segmentation: {metrics.get('protocol', 'segment')}", "",
        "| mIoU | mIoU over chips (± SE) | mean F1 | pixel acc. | pixels |", "|---:|---:|---:|---:|---:|",
        f"| {metrics['miou']:.2f} | {metrics.get('miou_chip_mean', 0):.2f} ± {metrics.get('miou_chip_se', 0):.2f} "
        f"| {metrics['mean_f1']:.2f} | {metrics['pixel_accuracy']:.2f} | {metrics['num_pixels']} |", "",
        "| class | IoU | F1 |", "|---|---:|---:|",
        *(f"| {n} | {fmt(i)} | {fmt(f)} |" for n, i, f in
          zip(names, metrics["per_class_iou"], metrics["per_class_f1"], strict=True)),
        "", f"![per-class IoU]({IOU_PNG})",
    ]
    paths = {"markdown": out_dir / REPORT_MD, "iou": out_dir / IOU_PNG}
    plot_per_class_iou(metrics, paths["iou"])
    if model is not None and dataset is not None:
        paths["overlays"] = plot_overlays(model, dataset, mean, std, out_dir / OVERLAY_PNG, device=device)
        lines += ["", f"![validation chips: image, ground truth, prediction]({OVERLAY_PNG})"]
    atomic_write_bytes(paths["markdown"], ("\n".join(lines) + "\n").encode())
    return paths


def segment_optim(**overrides: Any) -> OptimConfig:
    """:data:`SEGMENT_OPTIM` with the non-``None`` ``overrides``."""
    return OptimConfig(**(SEGMENT_OPTIM | {k: v for k, v in overrides.items() if v is not None}))


def run_segment(
    backbone: nn.Module,
    train_set,
    val_set,
    out_dir: str | Path,
    *,
    image_size: int,
    mode: SegMode = "lora",
    head: str = "linear",
    blocks: tuple[int, ...] | None = None,
    lora_rank: int | None = None,
    channels: int = 256,
    aug: DenseAugConfig | None = None,
    loss: SegLossConfig | None = None,
    optim: OptimConfig | None = None,
    train_cfg: TrainConfig | None = None,
    eval_batch_size: int = 16,
    resume: bool = False,
) -> dict[str, Any]:
    """Train a segmentation model with the engine's loop, evaluating on ``val_set``; returns the final metrics.

    ``train_set`` / ``val_set`` yield ``(image, mask)`` pairs (:mod:`explora.data.dense`). Both are normalised
    with ``train_set``'s statistics. ``train_cfg.eval_every`` defaults to one pass over ``train_set``; ``resume``
    continues a killed run from its newest intact checkpoint (as ``explora finetune``).
    """
    out_dir = Path(out_dir)
    for name, ds in (("train", train_set), ("validation", val_set)):
        if not is_dense(ds):
            raise DataError(f"{name} dataset {getattr(ds, 'source', type(ds).__name__)} yields image labels; "
                            "segmentation needs (image, mask) pairs: seg_folder:, seg_csv: or spacenet:")
    num_classes = int(train_set.num_classes)
    if val_set.num_classes != num_classes:
        raise DataError(f"validation data has {val_set.num_classes} classes but training data has {num_classes}; "
                        "expected the same class list")
    model = prepare_segmenter(backbone, num_classes, mode, head, blocks, lora_rank, channels=channels)
    model.train()
    mean, std = tuple(train_set.mean), tuple(train_set.std)
    settings = SegmentationSettings(num_classes, image_size, mean, std, aug or DenseAugConfig(),
                                    loss or SegLossConfig())
    objective = SegmentationObjective(model, settings)
    if D.is_main():
        info = {"num_classes": num_classes, "class_names": list(getattr(train_set, "classes", [])), "mean": mean,
                "std": std, "image_size": image_size, "head": head, "blocks": list(model.blocks),
                "channels": channels, "in_chans": len(mean), "patch_size": int(as_encoder(backbone).patch_size[0])}
        atomic_write_bytes(out_dir / SEGMENTER_FILE, json.dumps(info, indent=2).encode())
    device = next(model.parameters()).device
    cfg = train_cfg or TrainConfig(steps=1000, batch_size=16)
    D.init_distributed()
    optim, cfg = resolve_lengths(optim or segment_optim(), cfg, len(train_set), D.world_size())
    if not cfg.eval_every:
        epoch = run_length(cfg, optim, len(train_set), D.world_size()).epoch_steps
        cfg = replace(cfg, eval_every=max(1, int(epoch)))
    history_path = out_dir / "eval_history.json"
    history: list[dict[str, Any]] = json.loads(history_path.read_text()) if resume and history_path.is_file() else []
    names = list(getattr(train_set, "classes", []) or []) or None

    def eval_fn(obj: Objective, step: int) -> dict[str, Any]:
        m = evaluate_segmentation(obj.model, val_set, mean, std, num_classes, eval_batch_size,
                                  next(obj.parameters()).device, names)
        if D.is_main():
            history[:] = [h for h in history if h["step"] < step]
            best = max((h["miou"] for h in history), default=-1.0)
            history.append({"step": step, "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"]})
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(history_path, json.dumps(history, indent=2).encode())
            if m["miou"] > best:
                save_best_model(obj.model, out_dir, m, step, keys=("miou", "pixel_accuracy", "mean_f1"))
                export_encoder(obj.model.backbone, out_dir / "best" / ENCODER_DIR, step)
        return m

    result = train(objective, train_set, optim, cfg, out_dir, eval_fn=eval_fn, resume=resume)
    metrics = dict(result.eval_metrics or eval_fn(objective, result.steps_done))
    best = max(history, key=lambda h: h["miou"]) if history else None
    metrics.update(
        protocol=f"segment-{mode}-{head}",
        mode=mode,
        head=head,
        blocks=list(model.blocks),
        backbone_kind=encoder_kind(backbone),
        steps=result.steps_done,
        trainable=trainable_counts(model),
        device=str(device),
        best_miou=best["miou"] if best else metrics["miou"],
        best_step=best["step"] if best else result.steps_done,
    )
    if D.is_main():
        save_metrics(metrics, out_dir, class_names=names)
        write_segment_report(metrics, out_dir, objective.model, val_set, mean, std, device)
        if (out_dir / "best" / ENCODER_DIR / "model.json").is_file():
            write_model_card(out_dir / "best" / ENCODER_DIR, out_dir)
    return metrics


def export_encoder(backbone: nn.Module, export_dir: Path, step: int) -> None:
    """The best model's encoder (LoRA merged) as a timm export (``config.json``, ``model.safetensors``,
    ``model.json``), which timm, TerraTorch and torchgeo load by ``local-dir:`` name as a backbone for their own
    decoders; a group-channel / temporal encoder (not a timm model) stays in ``best/model.safetensors`` only."""
    arch = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture")
    if is_wrapped(backbone) or not arch:
        return
    export_backbone(backbone, export_dir, timm_name=arch, formats=("safetensors",),
                    metadata={"task": "segmentation", "step": step})


__all__ = [
    "ENCODER_DIR", "SEGMENTER_FILE", "SEGMENT_OPTIM", "SEG_MODES", "SegMode", "evaluate_segmentation", "export_encoder",
    "plot_overlays", "predict_batches", "prepare_segmenter", "run_segment", "segment_optim", "write_segment_report",
]
