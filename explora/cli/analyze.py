"""`explora analyze` and `explora compare-analyses` sub-commands."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from explora.analysis.blockwise import AnalysisConfig, analyze
from explora.analysis.plots import compare_analyses
from explora.analysis.probes import ProbeConfig
from explora.core.errors import ConfigError


def _build_dataset(spec: str, image_size: int | None):
    """The dataset contract of explora.data (another part): items (image, label) with mean/std/num_classes."""
    try:
        from explora.data import build_dataset
    except ImportError as e:  # pragma: no cover - depends on the data part being installed
        raise ConfigError(f"--data {spec!r}: explora.data.build_dataset is not available ({e})") from e
    return build_dataset(spec, split="train", image_size=image_size)


def _build_backbone(name: str, weights: str | None, image_size: int | None, in_chans: int = 3):
    from explora.models.backbone import build_backbone

    return build_backbone(name, weights=weights, img_size=image_size, in_chans=in_chans)


def _run_analyze(args: argparse.Namespace) -> int:
    from explora.models.registry import get_backbone_spec

    image_size = args.image_size or get_backbone_spec(args.model).default_img_size
    dataset = _build_dataset(args.data, image_size)
    in_chans = int(getattr(dataset, "in_chans", None) or len(dataset.mean))  # one input band per dataset band
    backbone = _build_backbone(args.model, args.weights, image_size, in_chans)
    cfg = AnalysisConfig()
    cfg = replace(cfg, n_images=args.n_images, batch_size=args.batch_size, top_k=args.top_k, pca_norm=args.pca_norm,
                  patches_per_image=args.patches_per_image or None, n_visualize=args.n_visualize,
                  pca_foreground_threshold=args.foreground_threshold, seed=args.seed,
                  probe=ProbeConfig(max_iter=args.probe_iters, weight_decay=args.probe_weight_decay))
    result = analyze(backbone, dataset, args.out, config=cfg, device=args.device)
    m = result["metrics"]
    print(f"wrote {Path(args.out) / 'analysis.json'} ({result['num_blocks']} blocks, {result['n_images']} images)")
    for key, vals in m.items():
        if vals is not None:
            print(f"  {key:13s} " + " ".join(f"{v:.3f}" for v in vals))
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    out = compare_analyses(args.json_a, args.json_b, args.labels, args.out)
    print(f"wrote {out}")
    return 0


def add_commands(subparsers) -> None:
    """Register `analyze` and `compare-analyses` on the explora CLI's sub-parsers."""
    p = subparsers.add_parser("analyze", help="per-block PCA spectra, position/class probes and attention maps")
    p.add_argument("--model", required=True, help="backbone short name (e.g. dinov2_vitl14) or timm ViT name")
    p.add_argument("--weights", default=None, help="checkpoint path (upstream, ExPLoRA or merged export)")
    p.add_argument("--data", required=True, help="dataset spec 'name:path[:opts]' (explora.data)")
    p.add_argument("--out", required=True, help="output directory for analysis.json and the PNGs")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the backbone's)")
    p.add_argument("--n-images", type=int, default=AnalysisConfig.n_images)
    p.add_argument("--batch-size", type=int, default=AnalysisConfig.batch_size)
    p.add_argument("--top-k", type=int, default=AnalysisConfig.top_k, help="eigenvalues kept per image and block")
    p.add_argument("--pca-norm", choices=("standardize", "center"), default=AnalysisConfig.pca_norm)
    p.add_argument("--patches-per-image", type=int, default=AnalysisConfig.patches_per_image,
                   help="patches per image used by the probes (0: all)")
    p.add_argument("--probe-iters", type=int, default=ProbeConfig.max_iter, help="L-BFGS iterations of the probes")
    p.add_argument("--probe-weight-decay", type=float, default=ProbeConfig.weight_decay)
    p.add_argument("--n-visualize", type=int, default=AnalysisConfig.n_visualize)
    p.add_argument("--foreground-threshold", type=float, default=None, help="PCA-image foreground threshold")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_analyze)

    c = subparsers.add_parser("compare-analyses", help="overlay two analysis.json files (e.g. before/after ExPLoRA)")
    c.add_argument("json_a", help="analysis.json (or its directory) of the first run")
    c.add_argument("json_b", help="analysis.json (or its directory) of the second run")
    c.add_argument("--labels", nargs=2, default=["before", "after"], metavar=("A", "B"))
    c.add_argument("--out", required=True, help="output PNG")
    c.set_defaults(func=_run_compare)
