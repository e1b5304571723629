"""`explora analyze` and `explora compare-analyses` sub-commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from explora.analysis.blockwise import analyze
from explora.analysis.plots import compare_analyses
from explora.cli.config_args import add_config_arguments, config_from_args
from explora.core.errors import ConfigError
from explora.models.backbone import build_backbone
from explora.models.registry import get_backbone_spec
from explora.recipes.analyze_config import AnalyzeConfig, CompareConfig
from explora.recipes.evaluate import save_run_config


def _build_dataset(spec: str, image_size: int | None):
    """The dataset contract of explora.data (another part): items (image, label) with mean/std/num_classes."""
    try:
        from explora.data import build_dataset
    except ImportError as e:  # pragma: no cover - depends on the data part being installed
        raise ConfigError(f"--data {spec!r}: explora.data.build_dataset is not available ({e})") from e
    return build_dataset(spec, split="train", image_size=image_size)


def _build_backbone(name: str, weights: str | None, image_size: int | None, in_chans: int = 3):

    return build_backbone(name, weights=weights, img_size=image_size, in_chans=in_chans)


def _run_analyze(args: argparse.Namespace) -> int:

    cfg: AnalyzeConfig = config_from_args(args)
    image_size = cfg.image_size or get_backbone_spec(cfg.model).default_img_size
    dataset = _build_dataset(cfg.data, image_size)
    in_chans = int(getattr(dataset, "in_chans", None) or len(dataset.mean))  # one input band per dataset band
    backbone = _build_backbone(cfg.model, cfg.weights, image_size, in_chans)
    save_run_config(cfg, cfg.out)
    result = analyze(backbone, dataset, cfg.out, config=cfg.analysis_config(), device=cfg.device)
    m = result["metrics"]
    print(f"wrote {Path(cfg.out) / 'analysis.json'} ({result['num_blocks']} blocks, {result['n_images']} images)")
    for key, vals in m.items():
        if vals is not None:
            print(f"  {key:13s} " + " ".join(f"{v:.3f}" for v in vals))
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    cfg: CompareConfig = config_from_args(args)
    out = compare_analyses(cfg.json_a, cfg.json_b, list(cfg.labels), cfg.out)
    print(f"wrote {out}")
    return 0


def add_commands(subparsers) -> None:
    """Register `analyze` and `compare-analyses`; their flags are the fields of AnalyzeConfig / CompareConfig."""
    p = subparsers.add_parser("analyze", help="per-block PCA spectra, position/class probes and attention maps")
    add_config_arguments(p, AnalyzeConfig)
    p.set_defaults(func=_run_analyze)

    c = subparsers.add_parser("compare-analyses", help="overlay two analysis.json files (e.g. before/after ExPLoRA)")
    add_config_arguments(c, CompareConfig, positional=("json_a", "json_b"))
    c.set_defaults(func=_run_compare)
