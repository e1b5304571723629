"""``explora demo``: its flags are the fields of :class:`explora.recipes.demo.run.DemoConfig`."""

from __future__ import annotations

import argparse

from explora.cli.config_args import add_config_arguments, config_from_args
from explora.core.errors import ConfigError
from explora.recipes.demo.run import VARIANTS, DemoConfig, run_demo
from explora.recipes.evaluate import save_run_config


def _demo(args: argparse.Namespace) -> int:

    cfg: DemoConfig = config_from_args(args)
    unknown = sorted(set(cfg.variants) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"config.variants: unknown variant(s) {unknown}; expected a subset of {list(VARIANTS)}.")
    save_run_config(cfg, cfg.out)
    run_demo(cfg)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="adapt a real DinoV2 ViT-S/14 to a new domain on a CPU and write a report",
        description="Frozen DinoV2 vs ExPLoRA vs the LoRA-only and unfreeze-only ablations, same budget: linear "
        "probe, kNN, loss curves, PCA feature images and attention maps, in a time budget (default 20 minutes).",
    )
    add_config_arguments(p, DemoConfig)
    p.set_defaults(func=_demo)
