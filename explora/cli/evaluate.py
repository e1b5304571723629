"""``explora linprobe``, ``explora knn``, ``explora finetune`` and ``explora report``.

Each command writes ``metrics.json`` (+ ``confusion_matrix.png``) into ``--out``; ``explora report`` lays several such
directories side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from explora.core.errors import DataError

CROP_PCT = 224 / 256  # upstream eval transform: Resize 256 + CenterCrop 224


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, help="short name (dinov2_vitl14, mae_vitl16, ...) or a timm ViT name")
    p.add_argument("--weights", help="checkpoint path (any upstream layout); omitted: random init")
    p.add_argument("--data", required=True, help="dataset spec for training, e.g. fmow:/data/fmow/train.csv")
    p.add_argument("--val-data", help="dataset spec for validation (default: --data)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--image-size", type=int, default=224, help="crop size the backbone sees (default 224)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="run directory for metrics.json and the confusion matrix")


def _datasets(args: argparse.Namespace):
    from explora.data import build_dataset

    load_size = round(args.image_size / CROP_PCT)  # the eval/train transforms crop image_size out of this
    train = build_dataset(args.data, split=args.train_split, image_size=load_size)
    val = build_dataset(args.val_data or args.data, split=args.val_split, image_size=load_size)
    if val.num_classes > train.num_classes:  # checked now, not after minutes of training
        raise DataError(
            f"--val-data {args.val_data or args.data!r} has {val.num_classes} classes but --data {args.data!r} has "
            f"{train.num_classes}: validation labels {train.num_classes}..{val.num_classes - 1} are out of range "
            "for the classifier; expected the same classes in both (a validation split of the same dataset)."
        )
    return train, val


def _backbone(args: argparse.Namespace, in_chans: int):
    from explora.models.backbone import build_backbone
    from explora.models.export import is_wrapped_export, load_encoder

    if is_wrapped_export(args.weights):  # group-channel / temporal MAE export: the sidecar describes the model
        return load_encoder(args.weights)  # its base architecture comes from the sidecar, not --backbone
    return build_backbone(args.backbone, weights=args.weights, img_size=args.image_size, in_chans=in_chans)


def _features(args: argparse.Namespace, n_blocks: int):
    from explora.eval.features import EvalTransform, extract_features

    train, val = _datasets(args)
    model = _backbone(args, len(train.mean)).to(args.device)
    dtype = torch.bfloat16 if args.bf16 else None
    out = []
    for ds, spec, split in ((train, args.data, args.train_split), (val, args.val_data or args.data, args.val_split)):
        t = EvalTransform(args.image_size, tuple(ds.mean), tuple(ds.std), crop_pct=CROP_PCT)
        out.append(
            extract_features(
                model,
                ds,
                t,
                n_blocks=n_blocks,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                device=args.device,
                autocast_dtype=dtype,
                cache_dir=args.cache_dir,
                dataset_key=f"{spec}|{split}|{args.image_size}",
            )
        )
    return train, out[0], out[1]


def _linprobe(args: argparse.Namespace) -> int:
    from explora.eval.linprobe import LinearProbeConfig, train_linear_probe
    from explora.eval.metrics import save_metrics

    cfg = LinearProbeConfig(
        batch_size=args.probe_batch_size,
        epochs=args.epochs,
        iters_per_epoch=args.iters_per_epoch,
        lrs=tuple(args.lrs),
        device=args.device,
        seed=args.seed,
    )
    train_ds, train, val = _features(args, max(cfg.n_blocks))
    res = train_linear_probe(train, val, train_ds.num_classes, cfg)
    path = save_metrics({**res.metrics, "backbone": args.backbone, "weights": args.weights}, args.out)
    print(f"[explora] linear probe: top-1 {res.metrics['top1']:.2f} ({res.best_head}); {path}")
    return 0


def _knn(args: argparse.Namespace) -> int:
    from explora.eval.knn import knn_classify
    from explora.eval.metrics import save_metrics

    train_ds, train, val = _features(args, 1)
    m = knn_classify(
        train.cls[:, -1],
        train.labels,
        val.cls[:, -1],
        val.labels,
        train_ds.num_classes,
        ks=tuple(args.ks),
        temperature=args.temperature,
    )
    path = save_metrics({**m, "backbone": args.backbone, "weights": args.weights}, args.out)
    print(f"[explora] kNN: top-1 {m['top1']:.2f} (k={m['best_k']}); {path}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from explora.recipes.finetune import finetune_recipe, run_finetune

    recipe = finetune_recipe(args.recipe)  # explicit flags below (not None) override the recipe's settings
    train, val = _datasets(args)
    backbone = _backbone(args, len(train.mean))
    optim = recipe.optim_config(
        base_lr=args.base_lr,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
        weight_decay_end=args.weight_decay,  # constant, as both recipes
        warmup_steps=args.warmup_steps,
        warmup_epochs=args.warmup_epochs,
    )
    cfg = recipe.train_config(
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        effective_batch=args.effective_batch,
        num_workers=args.num_workers,
        seed=args.seed,
        precision=args.precision,
        eval_every=args.eval_every,
    )
    aug = recipe.aug_config(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing, rand_augment=args.rand_augment
    )
    m = run_finetune(
        backbone.to(args.device),
        train,
        val,
        args.out,
        image_size=args.image_size,
        recipe=recipe,
        mode=args.mode,
        pool=args.pool,
        lora_rank=args.lora_rank,
        drop_path=args.drop_path,
        aug=aug,
        optim=optim,
        train_cfg=cfg,
        resume=args.resume,
    )
    print(
        f"[explora] fine-tuning ({args.mode}, recipe {recipe.name}): top-1 {m['top1']:.2f} (best {m['best_top1']:.2f} "
        f"at step {m['best_step']}, saved in {Path(args.out) / 'best'}); {Path(args.out) / 'metrics.json'}"
    )
    return 0


def _rand_augment_arg(text: str) -> str:
    """``none``/``off``/``""`` -> ``""`` (RandAugment off); anything else is a timm RandAugment string."""
    return "" if text.strip().lower() in ("", "none", "off") else text


def _report(args: argparse.Namespace) -> int:
    from explora.eval.report import load_runs, markdown_table, write_report

    out = write_report(args.runs, args.out)
    print(markdown_table(load_runs(args.runs)))
    print(f"[explora] report: {out['markdown']}, {out['chart']}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from explora.eval.knn import UPSTREAM_KS
    from explora.eval.linprobe import UPSTREAM_LRS

    p = sub.add_parser("linprobe", help="DinoV2-protocol linear probe (28 heads at once on cached features)")
    _common(p)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--iters-per-epoch", type=int, default=None, help="default: one pass (upstream uses 1500)")
    p.add_argument("--probe-batch-size", type=int, default=256)
    p.add_argument("--lrs", type=float, nargs="+", default=list(UPSTREAM_LRS))
    p.add_argument("--cache-dir", default=None, help="feature cache (safetensors); omitted: no cache")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for feature extraction")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_linprobe)

    p = sub.add_parser("knn", help="weighted kNN (T=0.07) on L2-normalised CLS features")
    _common(p)
    p.add_argument("--ks", type=int, nargs="+", default=list(UPSTREAM_KS))
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--bf16", action="store_true")
    p.set_defaults(func=_knn)

    from explora.recipes.finetune import FINETUNE_RECIPES, POOLS

    r = FINETUNE_RECIPES
    p = sub.add_parser(
        "finetune",
        help="supervised fine-tuning: LoRA-r8 (default), full, or head only; --recipe official|explora",
        description="Every setting comes from --recipe (official: the official ExPLoRA fine-tuning script; explora: "
        "explora's own, the default); each flag given explicitly overrides the recipe's value.",
    )
    _common(p)
    p.set_defaults(batch_size=None)  # per device; default: the recipe's
    p.add_argument("--recipe", choices=sorted(r), default="explora",
                   help="official: scripts/finetune.sh of the ExPLoRA code; explora: explora's own (default)")
    p.add_argument("--mode", choices=("lora", "full", "head"), default="lora")
    p.add_argument("--pool", choices=POOLS, default=None,
                   help="head input (default: the recipe's, explora 'auto' = CLS, or the mean of all tokens for "
                        "group-channel/temporal exports; official 'avg_fc_norm' = fc_norm of the mean patch token)")
    p.add_argument("--lora-rank", type=int, default=None, help="default: the recipe's preset (8)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimiser steps (replaces the recipe's length; explora: {r['explora'].steps})")
    p.add_argument("--epochs", type=float, default=None,
                   help=f"epochs (replaces the recipe's length; official: {r['official'].epochs:g})")
    p.add_argument("--effective-batch", type=int, default=None,
                   help="images per optimiser step, by gradient accumulation over --batch-size x processes "
                        f"(official: {r['official'].effective_batch})")
    p.add_argument("--base-lr", type=float, default=None, help="per 256 images, linear scaling (both recipes: 1e-3)")
    p.add_argument("--layer-decay", type=float, default=None, help="explora 0.75, official 1.0")
    p.add_argument("--weight-decay", type=float, default=None, help="constant; explora 0.05, official 0")
    p.add_argument("--warmup-steps", type=int, default=None, help="replaces the recipe's warm-up (explora: 0)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="replaces the recipe's warm-up (official: 5)")
    p.add_argument("--mixup", type=float, default=None, help="mixup alpha; explora 0.8, official 0")
    p.add_argument("--cutmix", type=float, default=None, help="cutmix alpha; explora 1.0, official 0")
    p.add_argument("--smoothing", type=float, default=None, help="label smoothing (both recipes: 0.1)")
    p.add_argument("--rand-augment", type=_rand_augment_arg, default=None,
                   help="timm RandAugment string, 'none' = off (official: rand-m9-mstd0.5-inc1; RGB only)")
    p.add_argument("--drop-path", type=float, default=None,
                   help="stochastic depth, timm's linear rule over the blocks (official 0.2; explora: as built)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 where the hardware is fast at it (GPU, AMX/AVX512-BF16 CPU), else fp32")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default: one epoch)")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("report", help="lay several runs' metrics.json side by side (Markdown table + bar chart)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="report", help="directory for report.md and report.png")
    p.set_defaults(func=_report)
