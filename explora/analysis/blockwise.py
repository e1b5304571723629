"""``analyze``: the paper's per-block analyses of a backbone on domain images, as JSON numbers and PNG plots.

Reproduces the project page's "Analysis" figures (paper-notes §5): (1) PCA eigenvalues of each block's patch
features (``blockwise_eigenvalues``, ``blockwise_std_eigenvalues``), (2) per-block patch-position probe
(``blockwise_pos_accuracy``), (3) per-block image-class probe from single patch tokens (``blockwise_cls_accuracy``),
and (4) the last block's CLS attention maps (``explora_attention_viz``). Protocol choices the paper leaves open are
documented in ``spectrum``, ``probes`` and docs/analysis.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explora.analysis.attention import attention_maps
from explora.analysis.features import block_patch_tokens, collect_samples, normalize_images, patch_grid
from explora.analysis.pca_image import pca_feature_image
from explora.analysis.plots import plot_attention_grid, plot_block_metric, plot_pca_grid, plot_spectra
from explora.analysis.probes import ProbeConfig, blockwise_probes, split_images
from explora.analysis.spectrum import patch_eigenvalues
from explora.core.errors import DataError
from explora.models.record import record_of

OUTPUT_FILES = ("analysis.json", "eigenvalues_mean.png", "eigenvalues_std.png", "eigen_spectrum.png",
                "position_accuracy.png", "attention.png", "pca_features.png")


@dataclass
class AnalysisConfig:
    """Every knob of ``analyze``; the defaults are our picks where the paper is silent (see docs/analysis.md)."""

    n_images: int = 200
    batch_size: int = 32
    top_k: int = 16
    pca_norm: str = "standardize"
    patches_per_image: int | None = 64
    test_fraction: float = 0.25
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    n_visualize: int = 4
    pca_foreground_threshold: float | None = None
    seed: int = 0


def _select_patches(n: int, hw: int, per_image: int | None, seed: int) -> torch.Tensor:
    """(n, P) grid indices of the patches kept for probing per image (all when ``per_image`` is None or >= hw)."""
    if per_image is None or per_image >= hw:
        return torch.arange(hw).repeat(n, 1)
    g = torch.Generator().manual_seed(seed + 1)
    return torch.stack([torch.randperm(hw, generator=g)[:per_image].sort().values for _ in range(n)])


def _labeled(labels: torch.Tensor, num_classes: int | None) -> bool:
    return num_classes is not None and num_classes > 1 and bool((labels >= 0).all())


@torch.no_grad()
def analyze(
    backbone: nn.Module,
    dataset: Any,
    out_dir: str | Path,
    n_images: int | None = None,
    config: AnalysisConfig | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Run all analyses on ``n_images`` samples of ``dataset``; write ``OUTPUT_FILES`` (and ``class_accuracy.png``
    for labeled data) to ``out_dir``; return the JSON dict.

    ``dataset`` items are ``(image (C, H, W), label)`` and the dataset exposes ``mean``/``std`` (per band) and
    ``num_classes``; the class probe runs when every sampled label is >= 0 and ``num_classes`` > 1.
    """
    cfg = config or AnalysisConfig()
    if n_images is not None:
        cfg.n_images = n_images
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for attr in ("mean", "std"):
        if not hasattr(dataset, attr):
            raise DataError(f"dataset {type(dataset).__name__} has no '{attr}'; expected per-band mean/std")
    raw, labels = collect_samples(dataset, cfg.n_images, cfg.seed)  # (n, C, H, W), (n,)
    n = raw.shape[0]
    if n < 2:
        raise DataError(f"dataset has {n} image(s); the probes need at least 2 (train/test split)")
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval().to(device)
    grid = patch_grid(backbone, tuple(raw.shape[-2:]))
    keep = _select_patches(n, grid[0] * grid[1], cfg.patches_per_image, cfg.seed)  # (n, P)

    eig: list[list[torch.Tensor]] = []  # per block: list of (b, k)
    probe_tokens: list[list[torch.Tensor]] = []  # per block: list of (b, P, D)
    for start in range(0, n, cfg.batch_size):
        x = normalize_images(raw[start:start + cfg.batch_size], dataset.mean, dataset.std).to(device)
        blocks = block_patch_tokens(backbone, x)  # L x (b, h*w, D)
        if not eig:
            eig = [[] for _ in blocks]
            probe_tokens = [[] for _ in blocks]
        idx = keep[start:start + x.shape[0]].to(device)  # (b, P)
        for i, t in enumerate(blocks):
            eig[i].append(patch_eigenvalues(t, cfg.top_k, cfg.pca_norm).cpu())
            sel = t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # (b, P, D)
            probe_tokens[i].append(sel.cpu())

    train_idx, test_idx = split_images(n, cfg.test_fraction, cfg.seed)
    num_classes = getattr(dataset, "num_classes", None)
    labeled = _labeled(labels, num_classes)
    probes = blockwise_probes(
        torch.stack([torch.cat(t) for t in probe_tokens]),  # (L, n, P, D)
        keep, grid, train_idx, test_idx,
        labels if labeled else None, int(num_classes or 0), cfg.probe,
    )
    per_block: list[dict[str, Any]] = []
    for i, probe in enumerate(probes):
        ev = torch.cat(eig[i])  # (n, k) top-k eigenvalues of each image
        per_block.append({
            "block": i,
            "eigenvalues_mean": ev.mean(0).tolist(),
            "eigenvalues_std": ev.std(0).tolist(),
            "eig_mean": ev.mean(1).mean().item(),
            "eig_mean_std_over_images": ev.mean(1).std().item(),
            "eig_std": ev.std(1).mean().item(),
            **probe,
        })

    cfg_json = asdict(cfg)
    result: dict[str, Any] = {
        "model": record_of(backbone).source or type(backbone).__name__,
        "n_images": n,
        "n_train_images": len(train_idx),
        "n_test_images": len(test_idx),
        "image_size": list(raw.shape[-2:]),
        "grid": list(grid),
        "num_blocks": len(per_block),
        "labeled": labeled,
        "config": cfg_json,
        "blocks": per_block,
        "metrics": {
            "eig_mean": [b["eig_mean"] for b in per_block],
            "eig_std": [b["eig_std"] for b in per_block],
            "pos_accuracy": [b["position"]["accuracy"] for b in per_block],
            "cls_accuracy": [b["class"]["accuracy"] for b in per_block] if labeled else None,
        },
    }

    m = result["metrics"]
    plot_block_metric(m["eig_mean"], "mean of top-k eigenvalues", f"PCA eigenvalues (top {cfg.top_k}, mean)",
                      out / "eigenvalues_mean.png", errors=[b["eig_mean_std_over_images"] for b in per_block])
    plot_block_metric(m["eig_std"], "std of top-k eigenvalues", f"PCA eigenvalues (top {cfg.top_k}, std)",
                      out / "eigenvalues_std.png")
    plot_spectra([b["eigenvalues_mean"] for b in per_block], out / "eigen_spectrum.png")
    plot_block_metric(m["pos_accuracy"], "test accuracy (row and column)", "patch position probe",
                      out / "position_accuracy.png")
    if labeled:
        plot_block_metric(m["cls_accuracy"], "test accuracy", "image class probe (per patch)",
                          out / "class_accuracy.png")

    nv = min(cfg.n_visualize, n)
    vis = normalize_images(raw[:nv], dataset.mean, dataset.std).to(device)
    maps = attention_maps(backbone, vis).cpu()  # (nv, heads, h, w)
    plot_attention_grid(raw[:nv], maps, out / "attention.png")
    rgb = pca_feature_image(backbone, vis, cfg.pca_foreground_threshold).cpu()  # (nv, 3, h, w)
    plot_pca_grid(raw[:nv], rgb, out / "pca_features.png")

    (out / "analysis.json").write_text(json.dumps(result, indent=2))
    backbone.train(was_training)
    return result
