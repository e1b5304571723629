"""``explora pretrain`` and ``explora presets``."""

from __future__ import annotations

import argparse

from explora import presets
from explora.cli.config_args import add_config_arguments
from explora.models.adapt import PRESETS
from explora.recipes.pretrain import PretrainConfig, load_config, run_pretrain


def _pretrain(args: argparse.Namespace) -> int:

    cfg = load_config(args.config, args.overrides)
    result = run_pretrain(cfg, resume=args.resume)
    print(f"[explora] done: {result.steps_done} steps, run directory {result.out_dir}")
    return 0


def _presets(args: argparse.Namespace) -> int:

    rows = [presets.info(name) for name in presets.names()]
    width = max(len(r.name) for r in rows)
    print(f"{'config':{width}}  objective  model          ExPLoRA preset      description")
    for r in rows:
        print(f"{r.name:{width}}  {r.objective:9}  {r.model:13}  {r.explora_preset:18}  {r.description}")
    print(f"\nExPLoRA presets (adapt.preset): {', '.join(PRESETS)}")
    print(f"files: {presets.PRESET_DIR}; `explora pretrain --config NAME` or a path to your own YAML")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="ExPLoRA extended pre-training (DinoV2 or MAE objective)",
        description="Continue the backbone's self-supervised objective on unlabeled images of the new domain. "
        "Example: explora pretrain --config dinov2_vitl14_fmow_D-L-r64 data.spec=fmow:/data/train.csv",
    )
    add_config_arguments(
        p, PretrainConfig, flags=False,
        config_help="YAML config file, or the name of a shipped preset (`explora presets`); omitted: the defaults",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in output_dir")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("presets", help="list the shipped pre-training configs (load one with --config NAME)")
    p.set_defaults(func=_presets)
