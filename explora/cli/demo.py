"""``explora demo``."""

from __future__ import annotations

import argparse


def _demo(args: argparse.Namespace) -> int:
    from explora.recipes.demo.run import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out)
    for key in (
        "model",
        "weights",
        "data",
        "steps",
        "batch_size",
        "n_train_eval",
        "n_test_eval",
        "seed",
        "budget_minutes",
    ):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    if args.variants:
        cfg.variants = tuple(args.variants)
    run_demo(cfg)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from explora.recipes.demo.run import VARIANTS

    p = sub.add_parser(
        "demo",
        help="adapt a real DinoV2 ViT-S/14 to a new domain on a CPU and write a report",
        description="Frozen DinoV2 vs ExPLoRA vs the LoRA-only and unfreeze-only ablations, same budget: linear "
        "probe, kNN, loss curves, PCA feature images and attention maps, in a time budget (default 20 minutes).",
    )
    p.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    p.add_argument("--weights", help="DinoV2 ViT-S/14 file (default: the torch hub cache, else download)")
    p.add_argument(
        "--data", help="dataset spec (default: Fashion-MNIST from /usr/share/datasets/fashion-mnist, else downloaded)"
    )
    p.add_argument("--model", help="backbone name (default: dinov2_vits14)")
    p.add_argument("--steps", type=int, help="pre-training steps per variant (default: as many as fit the budget)")
    p.add_argument("--budget-minutes", type=float, help="time budget of the whole demo (default: 20)")
    p.add_argument("--batch-size", type=int, help="pre-training batch size (default: 32)")
    p.add_argument("--n-train-eval", type=int, help="labeled train images for the probes (default: 1000)")
    p.add_argument("--n-test-eval", type=int, help="labeled test images for the probes (default: 500)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_demo)
