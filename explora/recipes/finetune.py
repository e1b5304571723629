"""Supervised fine-tuning of a (possibly ExPLoRA-adapted) ViT: LoRA-r8 (the paper's main setting), full, or head-only.

Two named recipes (:data:`FINETUNE_RECIPES`, ``explora finetune --recipe``) give every setting; explicit arguments
override their part:

- ``official``: the official ExPLoRA ``scripts/finetune.sh`` / ``finetune/finetune.py`` (paper-notes §9): LoRA r8 on
  Q,V of every block with loralib alpha 1 (preset ``LoRA-r8-official``) + the head, everything else frozen; global
  average pool of the last block's patch tokens + ``fc_norm`` (timm/MAE ``global_pool='avg'``); 120 epochs, blr 1e-3
  at batch 128, warm-up 5 epochs, weight decay 0, layer decay 1.0, drop path 0.2, label smoothing 0.1, RandAugment
  ``rand-m9-mstd0.5-inc1``, no mixup/cutmix, no random erasing, no clipping.
- ``explora`` (the default): explora's own, from the SatMAE/MAE fine-tuning recipe (MAE ``main_finetune.py``,
  SatMAE README), chosen before the official scripts were public: preset ``LoRA-r8`` (alpha = rank), final-norm CLS
  token, RandomResizedCrop (0.08, 1) + flip, mixup 0.8 / cutmix 1.0 (switch 0.5), label smoothing 0.1, AdamW blr
  1e-3 (linear /256), layer decay 0.75, weight decay 0.05, 1,000 steps.

Both: head weight trunc-normal std 2e-5 (MAE ``main_finetune.py``), evaluation every epoch, best epoch kept.

The training loop is the engine's (:func:`explora.engine.trainer.train`); the model is
:class:`explora.models.classifier.ClassifierModel`, the objective and its batch transform are in
:mod:`explora.objectives.classification` (re-exported here); this module holds the recipes, the preparation of the
backbone and the evaluation the loop calls.

Group-channel (multispectral) and temporal encoders (:mod:`explora.models.group_channel`,
:mod:`explora.models.temporal`) fine-tune exactly like RGB ViTs: LoRA goes into their shared timm blocks, the head
reads the mean over all their tokens (every group / frame and position, SatMAE's fine-tuning pooling, the same
feature as :class:`explora.models.classifier.PooledEncoder`), and frame ``timestamps`` (B, T, 3)
travel from the dataset's third element through the batch transform, the model and the evaluation.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from explora.core.errors import ConfigError, DataError
from explora.core.io import atomic_write_bytes
from explora.core.precision import hardware_name, resolve_precision
from explora.engine import parallel as D
from explora.engine.lengths import accumulation_steps, resolve_lengths, run_length
from explora.engine.trainer import OptimConfig, TrainConfig, train
from explora.eval.features import EvalTransform, eval_transform_for
from explora.eval.metrics import classification_metrics, save_metrics
from explora.models.adapt import apply_preset
from explora.models.classifier import (
    POOLS,
    ClassifierModel,
    Pool,
    PooledEncoder,
    resolve_pool,
    set_linear_drop_path,
    trainable_counts,
)
from explora.models.encoder import as_encoder, encoder_kind
from explora.models.export import TIMM_POOLS, export_classifier, is_wrapped
from explora.models.model_card import write_model_card
from explora.objectives.base import Objective
from explora.objectives.classification import (
    AugConfig,
    FinetuneObjective,
    FinetuneTransform,
    build_rand_augment,
    mixed_targets,
    posterize_keeping_zero_bits,
    rand_augment_images,
)
from explora.vit.lora import merged_state_dict

Mode = Literal["lora", "full", "head"]


def prepare_backbone(
    backbone: nn.Module,
    mode: Mode = "lora",
    lora_rank: int | None = None,
    lora_targets: tuple[str, ...] | None = None,
    preset: str = "LoRA-r8",
) -> nn.Module:
    """Freeze/unfreeze ``backbone`` in place for ``mode`` (every supervised downstream task shares this).

    ``lora``: the paper's LoRA-r8 through the ``explora.models.adapt`` ``preset`` (``LoRA-r8``: rank 8 on Q,V of every
    block, alpha = rank, norms frozen; ``LoRA-r8-official``: the same with loralib alpha 1); ``lora_rank`` /
    ``lora_targets`` override the preset's. On a group-channel / temporal wrapper everything else (group
    projections, position/time encodings) stays frozen too. ``full``: every backbone parameter trains; ``head``
    (``frozen``): the backbone is frozen.
    """
    if mode == "lora":
        as_encoder(backbone)  # LoRA goes into a registered encoder's timm blocks; anything else is refused by name
        overrides: dict[str, Any] = {}
        if lora_rank is not None:
            overrides["lora_rank"] = lora_rank
        if lora_targets is not None:
            overrides["lora_targets"] = tuple(lora_targets)
        backbone.requires_grad_(False)  # a wrapper's own embeddings, outside the ViT apply_explora freezes
        apply_preset(backbone, preset, **overrides)
    elif mode == "full":
        backbone.requires_grad_(True)
    elif mode in ("head", "frozen"):
        backbone.requires_grad_(False)
    else:
        raise ConfigError(f"finetune mode: got {mode!r}, expected 'lora', 'full' or 'head'")
    return backbone


def prepare_classifier(
    backbone: nn.Module,
    num_classes: int,
    mode: Mode = "lora",
    pool: Pool = "auto",
    lora_rank: int | None = None,
    lora_targets: tuple[str, ...] | None = None,
    preset: str = "LoRA-r8",
    **head_kwargs: Any,
) -> ClassifierModel:
    """Freeze/unfreeze ``backbone`` for ``mode`` (:func:`prepare_backbone`) and add the head (always trainable).

    ``head``: the backbone is frozen (a linear probe trained end to end). An ``avg_fc_norm`` pool's ``fc_norm``
    trains in ``full`` mode only: the official LoRA script trains LoRA and the head alone.
    """
    prepare_backbone(backbone, mode, lora_rank, lora_targets, preset)
    model = ClassifierModel(backbone, num_classes, pool=pool, **head_kwargs)
    model.head.requires_grad_(True)
    if model.fc_norm is not None:
        model.fc_norm.requires_grad_(mode == "full")
    return model


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset,
    transform: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) logits and (N,) labels of ``dataset`` under the eval transform, model in eval mode.

    A sample's third element (frame timestamps (T, 3), or a dict holding ``timestamps``) is passed to the model
    as ``timestamps=``."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    logits, labels = [], []
    try:
        for batch in loader:
            images, y = batch[0], batch[1]
            x = transform(images.to(device))  # (B, C, S, S)
            ts = _batch_timestamps(batch)
            out = model(x) if ts is None else model(x, timestamps=ts.to(device))  # (B, K)
            logits.append(out.float().cpu())
            labels.append(torch.as_tensor(y).long())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def _batch_timestamps(batch: list | tuple) -> torch.Tensor | None:
    """The (B, T, 3) timestamps of a default-collated batch: its third element, bare or under ``timestamps``."""
    if len(batch) < 3:
        return None
    extra = batch[2]
    return extra.get("timestamps") if isinstance(extra, dict) else extra


def evaluate(
    model: nn.Module,
    dataset,
    batch_size: int = 256,
    *,
    image_size: int | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Top-1/top-5, per-class accuracy and confusion matrix of a classifier on ``dataset`` (eval transform:
    resize + centre crop to ``image_size`` with the dataset's ``mean``/``std`` unless ``transform`` is given)."""
    if transform is None:
        if image_size is None:
            raise ConfigError("evaluate needs image_size or an explicit transform")
        transform = eval_transform_for(dataset, image_size)
    logits, labels = predict(model, dataset, transform, batch_size, device)
    return classification_metrics(
        logits, labels, num_classes or getattr(dataset, "num_classes", None) or logits.shape[1]
    )


@dataclass(frozen=True)
class FinetuneRecipe:
    """Every setting of one named fine-tuning recipe; :meth:`optim_config`, :meth:`train_config` and
    :meth:`aug_config` build the engine's configs with explicit overrides winning (``None`` = keep the recipe's).

    Exactly one of ``steps``/``epochs`` gives the length and one of ``optim["warmup_steps"]``/``["warmup_epochs"]``
    the warm-up; an explicit override of one replaces the recipe's other. ``effective_batch`` (``None``: batch x
    world size) sets gradient accumulation; the lr scales with it (``optim["lr_scaling"]``).
    """

    name: str
    preset: str  # explora.models.adapt preset for mode 'lora'
    pool: Pool
    drop_path: float | None  # timm's linear rule over the blocks (set_linear_drop_path); None: leave the backbone's
    batch_size: int  # per device
    effective_batch: int | None
    steps: int | None
    epochs: float | None
    optim: dict[str, Any]  # OptimConfig fields
    aug: AugConfig

    def optim_config(self, **overrides: Any):
        """The recipe's :class:`~explora.engine.trainer.OptimConfig` with the non-``None`` ``overrides``."""
        return OptimConfig(**_override(self.optim, overrides, ("warmup_steps", "warmup_epochs")))

    def train_config(self, **overrides: Any):
        """The recipe's :class:`~explora.engine.trainer.TrainConfig` (length, batch, effective batch) with the
        non-``None`` ``overrides`` (any TrainConfig field)."""
        own = {"batch_size": self.batch_size, "effective_batch": self.effective_batch, "steps": self.steps,
               "epochs": self.epochs}
        return TrainConfig(**_override({k: v for k, v in own.items() if v is not None}, overrides, ("steps", "epochs")))

    def aug_config(self, **overrides: Any) -> AugConfig:
        """The recipe's :class:`AugConfig` with the non-``None`` ``overrides``."""
        return dataclasses.replace(self.aug, **{k: v for k, v in overrides.items() if v is not None})


def _override(own: dict[str, Any], overrides: dict[str, Any], exclusive: tuple[str, str]) -> dict[str, Any]:
    """``own`` updated with the non-``None`` ``overrides``; an override of one ``exclusive`` key drops the other
    from ``own`` (an explicit ``steps`` replaces the recipe's ``epochs``), both given are left to the engine's check."""
    given = {k: v for k, v in overrides.items() if v is not None}
    out = dict(own)
    a, b = exclusive
    if (a in given) != (b in given):
        out.pop(b if a in given else a, None)
    return out | given


# One definition per recipe; docs/evaluation.md lays them side by side.
FINETUNE_RECIPES: dict[str, FinetuneRecipe] = {
    # explora's own (MAE main_finetune.py / SatMAE README values), chosen while the official recipe was not public.
    "explora": FinetuneRecipe(
        name="explora",
        preset="LoRA-r8",  # rank 8 on Q,V of every block, alpha = rank (scaling 1), norms frozen
        pool="auto",  # the final-norm CLS token (mean of all tokens for group-channel / temporal encoders)
        drop_path=None,  # the backbone as built (0 for every registry backbone)
        batch_size=256,
        effective_batch=None,
        steps=1000,
        epochs=None,
        optim=dict(
            base_lr=1e-3,  # MAE main_finetune.py blr, per 256 images
            lr_scaling="linear",
            reference_batch=256,
            min_lr=1e-6,  # MAE main_finetune.py
            warmup_steps=0,
            weight_decay=0.05,  # MAE main_finetune.py, constant
            weight_decay_end=0.05,
            betas=(0.9, 0.999),  # torch AdamW defaults, as MAE main_finetune.py
            layer_decay=0.75,  # MAE main_finetune.py layer_decay
            patch_embed_lr_mult=1.0,
            clip_grad=0.0,
            freeze_last_layer_steps=0,  # a classifier has no DINO last layer
        ),
        aug=AugConfig(),  # RandomResizedCrop (0.08, 1) + flip, mixup 0.8 / cutmix 1.0, label smoothing 0.1
    ),
    # The official ExPLoRA scripts/finetune.sh + finetune/finetune.py (paper-notes §9).
    "official": FinetuneRecipe(
        name="official",
        preset="LoRA-r8-official",  # LoRA r8 on Q,V of every block, loralib alpha 1 (scaling 1/8); + head only
        pool="avg_fc_norm",  # global average pool of the patch tokens + fc_norm (frozen, see ClassifierModel)
        drop_path=0.2,  # finetune.sh drop path 0.2, timm's linear rule
        batch_size=32,  # finetune.sh: 32 per GPU
        effective_batch=128,  # 32 per GPU x 2 GPUs x accumulation 2
        steps=None,
        epochs=120,  # finetune.sh: 120 epochs
        optim=dict(
            base_lr=1e-3,  # finetune.sh blr 1e-3: lr = blr x 128 / 256 = 5e-4
            lr_scaling="linear",
            reference_batch=256,
            min_lr=1e-6,  # finetune.sh min lr
            warmup_epochs=5,  # finetune.sh warm-up 5 epochs
            weight_decay=0.0,  # finetune.sh weight decay 0
            weight_decay_end=0.0,
            betas=(0.9, 0.999),  # torch AdamW defaults (finetune.py follows MAE main_finetune.py)
            layer_decay=1.0,  # finetune.sh layer decay 1.0: one lr for every block
            patch_embed_lr_mult=1.0,
            clip_grad=0.0,  # finetune.sh: no gradient clipping
            freeze_last_layer_steps=0,
        ),
        aug=AugConfig(
            scale=(0.08, 1.0),  # timm create_transform RandomResizedCrop defaults (MAE build_transform)
            ratio=(3 / 4, 4 / 3),
            hflip=0.5,
            mixup_alpha=0.0,  # finetune.sh: no mixup
            cutmix_alpha=0.0,  # finetune.sh: no cutmix
            label_smoothing=0.1,  # finetune.sh smoothing 0.1
            rand_augment="rand-m9-mstd0.5-inc1",  # finetune.sh aa; random erasing 0 (not implemented here)
        ),
    ),
}


def finetune_recipe(recipe: str | FinetuneRecipe) -> FinetuneRecipe:
    """A recipe by name (unknown names list the known ones), or the recipe itself."""
    if isinstance(recipe, FinetuneRecipe):
        return recipe
    if recipe not in FINETUNE_RECIPES:
        raise ConfigError(f"unknown fine-tuning recipe {recipe!r}; known recipes: {sorted(FINETUNE_RECIPES)}")
    return FINETUNE_RECIPES[recipe]


def finetune_optim_defaults():
    """Engine optimiser settings of the ``explora`` recipe (MAE ``main_finetune.py`` / SatMAE values)."""
    return FINETUNE_RECIPES["explora"].optim_config()


def timm_exportable(model: ClassifierModel) -> bool:
    """True when timm can rebuild the classifier alone: a plain timm ViT backbone and a pool in ``TIMM_POOLS``."""
    return (isinstance(model, ClassifierModel) and model.is_encoder and not is_wrapped(model.backbone)
            and model.pool in TIMM_POOLS)


def save_best_model(
    model: nn.Module, out_dir: Path, metrics: dict[str, Any], step: int, keys: tuple[str, ...] = ("top1", "top5"),
    label_names: list[str] | None = None, transform: EvalTransform | None = None,
) -> None:
    """The best model so far (LoRA merged) in ``<out>/best/``, written atomically, plus ``best/metrics.json`` with the
    ``keys`` of ``metrics`` and the step. A classifier timm can
    rebuild (:func:`timm_exportable`) is written as a timm export (``config.json`` with the head and ``label_names``,
    ``model.json``; :func:`~explora.models.export.export_classifier`); any other keeps the classifier's own keys."""
    if timm_exportable(model):
        data = {"mean": transform.mean, "std": transform.std, "crop_pct": transform.crop_pct} if transform else None
        export_classifier(model, out_dir / "best", label_names=label_names, data_config=data,
                          metadata={"step": step})
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in merged_state_dict(model).items()}
        atomic_write_bytes(out_dir / "best" / "model.safetensors", save_safetensors(state))
    summary = {k: v for k, v in metrics.items() if k in keys} | {"step": step}
    buf = io.StringIO()
    json.dump(summary, buf, indent=2)
    atomic_write_bytes(out_dir / "best" / "metrics.json", buf.getvalue().encode())


def run_finetune(
    backbone: nn.Module,
    train_set,
    val_set,
    out_dir: str | Path,
    *,
    image_size: int,
    recipe: str | FinetuneRecipe = "explora",
    mode: Mode = "lora",
    pool: Pool | None = None,
    lora_rank: int | None = None,
    drop_path: float | None = None,
    aug: AugConfig | None = None,
    optim=None,
    train_cfg=None,
    eval_batch_size: int = 256,
    resume: bool = False,
    data_spec: str | None = None,
) -> dict[str, Any]:
    """Fine-tune with the engine's loop, evaluating on ``val_set`` every epoch.

    ``recipe`` (:data:`FINETUNE_RECIPES` name or a :class:`FinetuneRecipe`) supplies every argument left ``None``:
    the LoRA preset and rank, ``pool``, ``drop_path``, ``aug``, ``optim`` (OptimConfig) and ``train_cfg``
    (TrainConfig); a given argument replaces that part whole.

    ``backbone`` may be a timm ViT or a group-channel / temporal wrapper (e.g. ``explora.models.export.load_encoder`` of
    a wrapped MAE export); temporal datasets' timestamps reach the model in training and evaluation.
    ``train_cfg.eval_every`` defaults to one pass over ``train_set``. The best model by validation top-1 is kept in
    ``<out>/best/`` (a timm export with ``config.json`` and the train set's class names where timm can rebuild it,
    :func:`timm_exportable`); ``metrics.json`` and the confusion matrix describe the final model,
    ``eval_history.json`` every evaluation. ``resume`` continues a killed run from its newest intact checkpoint.
    ``metrics.json`` also holds the run's facts (images, effective batch, precision, hardware, wall time, the
    ``data_spec`` given), which the model card ``<out>/best/README.md`` reads.
    """
    out_dir = Path(out_dir)
    num_classes = int(getattr(train_set, "num_classes", 0) or 0)
    if num_classes < 2:
        raise DataError(f"train dataset {type(train_set).__name__} has num_classes={num_classes}; expected >= 2")
    chosen = finetune_recipe(recipe)
    rate = chosen.drop_path if drop_path is None else drop_path
    if rate is not None:
        set_linear_drop_path(backbone, rate)
    model = prepare_classifier(
        backbone, num_classes, mode=mode, pool=pool or chosen.pool, lora_rank=lora_rank, preset=chosen.preset
    )
    model.train()  # exports load in eval mode; the engine trains what it is given
    objective = FinetuneObjective(
        model, num_classes, image_size, train_set.mean, train_set.std, aug or chosen.aug_config()
    )
    transform = EvalTransform(image_size, tuple(val_set.mean), tuple(val_set.std))
    device = next(model.parameters()).device
    cfg = train_cfg or chosen.train_config()
    D.init_distributed()  # the world size below is torchrun's (a no-op in one process or when already set up)
    optim, cfg = resolve_lengths(optim or chosen.optim_config(), cfg, len(train_set), D.world_size())
    if not cfg.eval_every:  # one epoch of optimiser steps, at the effective batch (accumulation included)
        epoch = run_length(cfg, optim, len(train_set), D.world_size()).epoch_steps
        cfg = replace(cfg, eval_every=max(1, int(epoch)))
    names = list(getattr(train_set, "classes", None) or [])
    class_names = names if len(names) == num_classes else None
    history_path = out_dir / "eval_history.json"
    history: list[dict[str, Any]] = []
    if resume and history_path.is_file():
        history = json.loads(history_path.read_text())

    def eval_fn(obj: Objective, step: int) -> dict[str, Any]:
        m = evaluate(
            obj.model,
            val_set,
            eval_batch_size,
            transform=transform,
            num_classes=num_classes,
            device=next(obj.parameters()).device,
        )
        if D.is_main():
            history[:] = [h for h in history if h["step"] < step]
            best = max((h["top1"] for h in history), default=-1.0)
            history.append({"step": step, "top1": m["top1"], "top5": m["top5"]})
            out_dir.mkdir(parents=True, exist_ok=True)
            history_path.write_text(json.dumps(history, indent=2))
            if m["top1"] > best:
                save_best_model(obj.model, out_dir, m, step, label_names=class_names, transform=transform)
        return m

    started = time.perf_counter()
    result = train(objective, train_set, optim, cfg, out_dir, eval_fn=eval_fn, resume=resume)
    wall = time.perf_counter() - started
    metrics = dict(result.eval_metrics or eval_fn(objective, result.steps_done))
    best = max(history, key=lambda h: h["top1"]) if history else None
    metrics.update(
        protocol=f"finetune-{mode}",
        recipe=chosen.name,
        mode=mode,
        pool=model.pool,
        backbone_kind=encoder_kind(backbone),
        steps=result.steps_done,
        trainable=trainable_counts(model),
        device=str(device),
        best_top1=best["top1"] if best else metrics["top1"],
        best_step=best["step"] if best else result.steps_done,
        images=len(train_set),
        effective_batch=cfg.batch_size * D.world_size() * accumulation_steps(
            cfg.batch_size, D.world_size(), cfg.accum_steps, cfg.effective_batch),
        precision=resolve_precision(cfg.precision, device),
        processes=D.world_size(),
        hardware=hardware_name(device),
        wall_time_s=round(wall, 1),
        **({"data": data_spec} if data_spec else {}),
    )
    save_metrics(metrics, out_dir)
    if D.is_main() and (out_dir / "best" / "model.json").is_file():
        write_model_card(out_dir / "best", out_dir)
    return metrics


__all__ = [  # the job, and the model / objective names that have lived here (re-exported)
    "FINETUNE_RECIPES",
    "POOLS",
    "AugConfig",
    "ClassifierModel",
    "FinetuneObjective",
    "FinetuneRecipe",
    "FinetuneTransform",
    "Mode",
    "Pool",
    "PooledEncoder",
    "build_rand_augment",
    "evaluate",
    "finetune_optim_defaults",
    "finetune_recipe",
    "mixed_targets",
    "posterize_keeping_zero_bits",
    "predict",
    "prepare_backbone",
    "prepare_classifier",
    "rand_augment_images",
    "resolve_pool",
    "run_finetune",
    "save_best_model",
    "set_linear_drop_path",
    "timm_exportable",
    "trainable_counts",
]
