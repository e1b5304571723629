"""PNG figures of the block-wise analyses (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from explora.core.errors import DataError  # noqa: E402

#: metric key in ``analysis.json["metrics"]`` -> (y-axis label, figure title)
METRICS: dict[str, tuple[str, str]] = {
    "eig_mean": ("mean of top-k eigenvalues", "PCA eigenvalues (mean)"),
    "eig_std": ("std of top-k eigenvalues", "PCA eigenvalues (std)"),
    "pos_accuracy": ("test accuracy", "patch position probe"),
    "cls_accuracy": ("test accuracy", "image class probe (per patch)"),
}


def display_image(raw: torch.Tensor) -> np.ndarray:
    """A dataset sample (C, H, W) uint8/float -> (H, W, 3) float array in [0, 1] for imshow.

    Uses the first three bands (or repeats a single band); floats outside [0, 1] are min-max scaled per image.
    """
    x = raw.float() / 255.0 if raw.dtype == torch.uint8 else raw.float()
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
    if x.min() < 0 or x.max() > 1:
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return x.permute(1, 2, 0).numpy()


def plot_block_metric(values: Sequence[float], ylabel: str, title: str, out_png: Path,
                      errors: Sequence[float] | None = None) -> Path:
    """One line over block index (1-based, as in the paper's figures), optional error bars."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = np.arange(1, len(values) + 1)
    ax.errorbar(xs, values, yerr=errors, marker="o", capsize=3)
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_spectra(eigenvalues_mean: Sequence[Sequence[float]], out_png: Path) -> Path:
    """Mean top-k spectrum of every block (log scale), one line per block."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    cmap = plt.get_cmap("viridis")
    n = len(eigenvalues_mean)
    for i, ev in enumerate(eigenvalues_mean):
        ax.plot(np.arange(1, len(ev) + 1), np.maximum(ev, 1e-12), color=cmap(i / max(n - 1, 1)), label=f"{i + 1}")
    ax.set_yscale("log")
    ax.set_xlabel("component")
    ax.set_ylabel("eigenvalue")
    ax.set_title("PCA spectrum per block")
    ax.legend(title="block", fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_attention_grid(raw_images: torch.Tensor, maps: torch.Tensor, out_png: Path) -> Path:
    """Rows: images; columns: the image, the head-mean map, then each head; maps upsampled (nearest) to the image.

    ``raw_images``: (B, C, H, W) samples; ``maps``: (B, heads, h, w).
    """
    b, heads = maps.shape[:2]
    hw = raw_images.shape[-2:]
    up = F.interpolate(maps.float(), size=hw, mode="nearest")  # (B, heads, H, W)
    mean = F.interpolate(maps.float().mean(1, keepdim=True), size=hw, mode="nearest")  # (B, 1, H, W)
    cols = heads + 2
    fig, axes = plt.subplots(b, cols, figsize=(1.6 * cols, 1.6 * b), squeeze=False)
    for i in range(b):
        panels = [(display_image(raw_images[i]), "image"), (mean[i, 0].numpy(), "mean")]
        panels += [(up[i, j].numpy(), f"head {j}") for j in range(heads)]
        for ax, (img, title) in zip(axes[i], panels):
            ax.imshow(img, cmap=None if img.ndim == 3 else "inferno")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_pca_grid(raw_images: torch.Tensor, rgb: torch.Tensor, out_png: Path) -> Path:
    """Each image next to its PCA feature image (``rgb`` (B, 3, h, w) upsampled nearest to the image size)."""
    b = rgb.shape[0]
    up = F.interpolate(rgb, size=raw_images.shape[-2:], mode="nearest")  # (B, 3, H, W)
    fig, axes = plt.subplots(2, b, figsize=(1.8 * b, 3.6), squeeze=False)
    for i in range(b):
        axes[0, i].imshow(display_image(raw_images[i]))
        axes[1, i].imshow(up[i].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[0, i].set_axis_off()
        axes[1, i].set_axis_off()
    axes[0, 0].set_title("image", fontsize=7)
    axes[1, 0].set_title("PCA 1-3 as RGB", fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _load(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "analysis.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise DataError(f"{p}: analysis JSON not found; expected the analysis.json written by `explora analyze`") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e})") from e
    if "metrics" not in data:
        raise DataError(f"{p}: no 'metrics' key; expected the analysis.json written by `explora analyze`")
    return data


def compare_analyses(json_a: str | Path, json_b: str | Path, labels: Sequence[str], out_png: str | Path) -> Path:
    """Overlay two analyses (e.g. before/after ExPLoRA) per metric in one PNG; a metric missing in either is skipped.

    ``json_a``/``json_b`` are analysis.json files (or the output directories holding them).
    """
    if len(labels) != 2:
        raise ValueError(f"labels must name the two runs, got {list(labels)}")
    runs = [_load(json_a), _load(json_b)]
    keys = [k for k in METRICS if all(r["metrics"].get(k) is not None for r in runs)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for run, label, marker in zip(runs, labels, ("o", "s")):
            vals = run["metrics"][key]
            ax.plot(np.arange(1, len(vals) + 1), vals, marker=marker, label=label)
        ylabel, title = METRICS[key]
        ax.set_title(title)
        ax.set_xlabel("block")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
