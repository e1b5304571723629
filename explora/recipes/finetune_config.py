"""``explora finetune``'s config: :class:`FinetuneConfig`, and the run that hands it to :mod:`explora.recipes.finetune`.

Every setting left ``null`` takes the value of the chosen ``recipe`` (official: the official ExPLoRA fine-tuning
script; explora: explora's own); a value given replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from explora.core.errors import ConfigError
from explora.recipes.evaluate import EvalRunConfig, eval_backbone, eval_datasets, save_run_config
from explora.recipes.finetune import FINETUNE_RECIPES, POOLS, finetune_recipe, run_finetune


@dataclass
class FinetuneConfig(EvalRunConfig):
    """Supervised fine-tuning: LoRA-r8 (default), full, or head only."""

    batch_size: int | None = None  # per device; null: the recipe's
    recipe: Literal["explora", "official"] = "explora"  # official: scripts/finetune.sh of the ExPLoRA code
    mode: Literal["lora", "full", "head"] = "lora"
    pool: str | None = None  # head input (null: the recipe's; explora 'auto', official 'avg_fc_norm')
    lora_rank: int | None = None  # null: the recipe's preset (8)
    steps: int | None = None  # optimiser steps (replaces the recipe's length)
    epochs: float | None = None  # epochs (replaces the recipe's length; official: 10)
    effective_batch: int | None = None  # images per optimiser step, by gradient accumulation
    base_lr: float | None = None  # per 256 images, linear scaling (both recipes: 1e-3)
    layer_decay: float | None = None  # explora 0.75, official 1.0
    weight_decay: float | None = None  # constant; explora 0.05, official 0
    warmup_steps: int | None = None  # replaces the recipe's warm-up (explora: 0)
    warmup_epochs: float | None = None  # replaces the recipe's warm-up (official: 5)
    mixup: float | None = None  # mixup alpha; explora 0.8, official 0
    cutmix: float | None = None  # cutmix alpha; explora 1.0, official 0
    smoothing: float | None = None  # label smoothing (both recipes: 0.1)
    rand_augment: str | None = None  # timm RandAugment string, 'none' = off (official: rand-m9-mstd0.5-inc1)
    drop_path: float | None = None  # stochastic depth, timm's linear rule (official 0.2; explora: as built)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the hardware is fast at it
    eval_every: int = 0  # steps between evaluations (0: one epoch)
    resume: bool = False  # continue from the newest intact checkpoint in out
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.pool is not None and self.pool not in POOLS:
            raise ConfigError(f"config.pool: got {self.pool!r}, expected one of {list(POOLS)}.")
        if self.recipe not in FINETUNE_RECIPES:
            raise ConfigError(f"config.recipe: got {self.recipe!r}, expected one of {sorted(FINETUNE_RECIPES)}.")

    def rand_augment_string(self) -> str | None:
        """``none``/``off``/``""`` -> ``""`` (RandAugment off); ``null`` keeps the recipe's."""
        if self.rand_augment is None:
            return None
        return "" if self.rand_augment.strip().lower() in ("", "none", "off") else self.rand_augment


def run_finetune_config(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune as configured; the metrics of :func:`explora.recipes.finetune.run_finetune`."""
    recipe = finetune_recipe(cfg.recipe)  # settings given (not None) override the recipe's
    train, val = eval_datasets(cfg)
    backbone = eval_backbone(cfg, len(train.mean))
    save_run_config(cfg, cfg.out)
    optim = recipe.optim_config(
        base_lr=cfg.base_lr,
        layer_decay=cfg.layer_decay,
        weight_decay=cfg.weight_decay,
        weight_decay_end=cfg.weight_decay,  # constant, as both recipes
        warmup_steps=cfg.warmup_steps,
        warmup_epochs=cfg.warmup_epochs,
    )
    train_cfg = recipe.train_config(
        steps=cfg.steps,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        effective_batch=cfg.effective_batch,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        precision=cfg.precision,
        eval_every=cfg.eval_every,
    )
    aug = recipe.aug_config(
        mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
        rand_augment=cfg.rand_augment_string(),
    )
    metrics = run_finetune(
        backbone.to(cfg.torch_device()),
        train,
        val,
        cfg.out,
        image_size=cfg.image_size,
        recipe=recipe,
        mode=cfg.mode,
        pool=cfg.pool,
        lora_rank=cfg.lora_rank,
        drop_path=cfg.drop_path,
        aug=aug,
        optim=optim,
        train_cfg=train_cfg,
        resume=cfg.resume,
        data_spec=cfg.data,
    )
    return {**metrics, "recipe": recipe.name, "best_dir": str(Path(cfg.out) / "best")}


__all__ = ["FinetuneConfig", "run_finetune_config"]
