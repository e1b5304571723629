"""``explora data check SPEC`` and ``explora data stats SPEC``."""

from __future__ import annotations

import argparse
import json
import sys

from explora.cli.config_args import add_config_arguments, config_from_args
from explora.core.errors import ExploraError
from explora.data.check import check_dataset, format_report
from explora.data.specs import build_dataset
from explora.data.stats import compute_stats
from explora.recipes.data_config import DataCheckConfig, DataStatsConfig


def _check(args: argparse.Namespace) -> int:
    reports = []
    try:
        cfg: DataCheckConfig = config_from_args(args)
        for split in cfg.split:
            ds = build_dataset(cfg.spec, split=split, on_error="skip")
            reports.append(check_dataset(ds, split=split, max_samples=cfg.max_samples, num_workers=cfg.workers))
    except ExploraError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if cfg.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print("\n".join(format_report(r) for r in reports))
    return 0 if all(r.clean for r in reports) else 1


def _stats(args: argparse.Namespace) -> int:
    try:
        cfg: DataStatsConfig = config_from_args(args)
        ds = build_dataset(cfg.spec, split=cfg.split, image_size=cfg.image_size)
        stats = compute_stats(ds, cfg.max_samples, num_workers=cfg.workers)
    except ExploraError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps({"spec": cfg.spec, "split": cfg.split, "in_chans": ds.in_chans, **stats}, indent=2))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``data check`` and ``data stats`` under ``explora data``."""
    data = subparsers.add_parser("data", help="inspect and validate datasets")
    sub = data.add_subparsers(dest="data_command", required=True)

    check = sub.add_parser("check", help="read every sample and report problems (exit 0 only when clean)")
    add_config_arguments(check, DataCheckConfig, positional=("spec",))
    check.set_defaults(func=_check)

    stats = sub.add_parser("stats", help="per-band mean/std as JSON")
    add_config_arguments(stats, DataStatsConfig, positional=("spec",))
    stats.set_defaults(func=_stats)
