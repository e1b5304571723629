"""``explora linprobe``, ``explora knn``, ``explora finetune`` and ``explora report``.

Each command writes ``metrics.json`` (+ ``confusion_matrix.png``) and its ``config.yaml`` into ``--out``; ``explora
report`` lays several such directories side by side. The flags come from the config dataclasses in
:mod:`explora.recipes.evaluate` and :mod:`explora.recipes.finetune_config`.
"""

from __future__ import annotations

import argparse

from explora.cli.config_args import add_config_arguments, config_from_args
from explora.eval.report import load_runs, markdown_table, write_report
from explora.recipes.evaluate import KnnConfig, LinprobeConfig, run_knn, run_linprobe
from explora.recipes.finetune_config import FinetuneConfig, run_finetune_config


def _linprobe(args: argparse.Namespace) -> int:
    m, path = run_linprobe(config_from_args(args))
    print(f"[explora] linear probe: top-1 {m['top1']:.2f} ({m['best_head']}); {path}")
    return 0


def _knn(args: argparse.Namespace) -> int:
    m, path = run_knn(config_from_args(args))
    print(f"[explora] kNN: top-1 {m['top1']:.2f} (k={m['best_k']}); {path}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    m = run_finetune_config(cfg)
    print(
        f"[explora] fine-tuning ({cfg.mode}, recipe {m['recipe']}): top-1 {m['top1']:.2f} (best {m['best_top1']:.2f} "
        f"at step {m['best_step']}, saved in {m['best_dir']}); {cfg.out}/metrics.json"
    )
    return 0


def _report(args: argparse.Namespace) -> int:

    out = write_report(args.runs, args.out)
    print(markdown_table(load_runs(args.runs)))
    print(f"[explora] report: {out['markdown']}, {out['chart']}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("linprobe", help="DinoV2-protocol linear probe (28 heads at once on cached features)")
    add_config_arguments(p, LinprobeConfig)
    p.set_defaults(func=_linprobe)

    p = sub.add_parser("knn", help="weighted kNN (T=0.07) on L2-normalised CLS features")
    add_config_arguments(p, KnnConfig)
    p.set_defaults(func=_knn)

    p = sub.add_parser(
        "finetune",
        help="supervised fine-tuning: LoRA-r8 (default), full, or head only; --recipe official|explora",
        description="Every setting comes from --recipe (official: the official ExPLoRA fine-tuning script; explora: "
        "explora's own, the default); each setting given explicitly overrides the recipe's value.",
    )
    add_config_arguments(p, FinetuneConfig)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("report", help="lay several runs' metrics.json side by side (Markdown table + bar chart)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="report", help="directory for report.md and report.png")
    p.set_defaults(func=_report)
