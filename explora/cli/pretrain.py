"""``explora pretrain``."""

from __future__ import annotations

import argparse


def _pretrain(args: argparse.Namespace) -> int:
    from explora.recipes.pretrain import load_config, run_pretrain

    cfg = load_config(args.config, args.overrides)
    result = run_pretrain(cfg, resume=args.resume)
    print(f"[explora] done: {result.steps_done} steps, run directory {result.out_dir}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="ExPLoRA extended pre-training (DinoV2 or MAE objective)",
        description="Continue the backbone's self-supervised objective on unlabeled images of the new domain. "
        "Example: explora pretrain --config configs/dinov2_vitl14_fmow.yaml data.spec=fmow:/data/train.csv",
    )
    p.add_argument("--config", help="YAML config (see configs/); omitted: built-in defaults")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in output_dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dot-list overrides, e.g. train.steps=100")
    p.set_defaults(func=_pretrain)
