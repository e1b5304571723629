"""``explora push RUN_OR_EXPORT --repo user/name``: upload an export to the Hugging Face Hub (private by default)."""

from __future__ import annotations

import argparse

from explora.cli.config_args import add_config_arguments, config_from_args
from explora.recipes.export_config import PushConfig
from explora.recipes.push import find_export, push_export


def push_command(args: argparse.Namespace) -> int:
    """Upload the export (weights, config.json, model.json, model card) and print the commit URL."""
    cfg: PushConfig = config_from_args(args)
    url = push_export(cfg.path, cfg.repo, private=cfg.private, revision=cfg.revision, commit_message=cfg.message,
                      eval_dirs=list(cfg.evals))
    print(f"[explora] pushed {find_export(cfg.path)} to {cfg.repo} ({'private' if cfg.private else 'public'}): {url}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``push``; its flags are PushConfig's fields (``path`` positional)."""
    p = subparsers.add_parser("push", help="upload an export (or a run's export) to the Hugging Face Hub, private "
                              "by default (needs the 'hub' extra and `hf auth login`)")
    add_config_arguments(p, PushConfig, positional=("path",))
    p.set_defaults(func=push_command)
