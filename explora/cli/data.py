"""``explora data check SPEC`` and ``explora data stats SPEC``."""

from __future__ import annotations

import argparse
import json
import sys

from explora.core.errors import ExploraError
from explora.data.check import check_dataset, format_report
from explora.data.specs import build_dataset
from explora.data.stats import compute_stats


def _check(args: argparse.Namespace) -> int:
    reports = []
    try:
        for split in args.split:
            ds = build_dataset(args.spec, split=split, on_error="skip")
            reports.append(check_dataset(ds, split=split, max_samples=args.max_samples, num_workers=args.workers))
    except ExploraError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print("\n".join(format_report(r) for r in reports))
    return 0 if all(r.clean for r in reports) else 1


def _stats(args: argparse.Namespace) -> int:
    try:
        ds = build_dataset(args.spec, split=args.split, image_size=args.image_size)
        stats = compute_stats(ds, args.max_samples, num_workers=args.workers)
    except ExploraError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps({"spec": args.spec, "split": args.split, "in_chans": ds.in_chans, **stats}, indent=2))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``data check`` and ``data stats`` under ``explora data``."""
    data = subparsers.add_parser("data", help="inspect and validate datasets")
    sub = data.add_subparsers(dest="data_command", required=True)

    check = sub.add_parser("check", help="read every sample and report problems (exit 0 only when clean)")
    check.add_argument("spec", help="dataset spec, e.g. fmow:/data/train.csv or folder:/scenes:chip=64")
    check.add_argument("--split", nargs="+", default=["train"], help="splits to check (default: train)")
    check.add_argument("--max-samples", type=int, default=None, help="check at most this many (spread evenly)")
    check.add_argument("--workers", type=int, default=0, help="data-loader workers for decoding")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=_check)

    stats = sub.add_parser("stats", help="per-band mean/std as JSON")
    stats.add_argument("spec")
    stats.add_argument("--split", default="train")
    stats.add_argument("--max-samples", type=int, default=10000)
    stats.add_argument("--image-size", type=int, default=None)
    stats.add_argument("--workers", type=int, default=0)
    stats.set_defaults(func=_stats)
