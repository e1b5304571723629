"""The demo's report: Markdown plus figures, every number read from the run's own metrics files."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F

from explora.analysis.attention import attention_maps
from explora.analysis.pca_image import pca_feature_image
from explora.analysis.plots import display_image
from explora.core.precision import resolve_precision
from explora.eval.features import eval_transform_for
from explora.models.backbone import build_backbone
from explora.models.registry import get_backbone_spec
from explora.recipes.demo.variants import VARIANTS

LOSS_TERMS = ("loss", "dino_local", "dino_global", "ibot", "koleo")


def _read_csv(path: Path) -> dict[str, list[float]]:
    cols: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if v not in ("", None):
                    cols.setdefault(k, []).append(float(v))
    return cols


def plot_loss_curves(runs: dict[str, Path], labels: dict[str, str], out_png: Path) -> Path:
    """One panel per loss term, one line per run."""
    curves = {name: _read_csv(d / "metrics.csv") for name, d in runs.items() if (d / "metrics.csv").is_file()}
    terms = [t for t in LOSS_TERMS if any(t in c for c in curves.values())]
    fig, axes = plt.subplots(1, max(1, len(terms)), figsize=(3.6 * max(1, len(terms)), 3.0), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for name, c in curves.items():
            if term in c:
                ax.plot(c["step"][: len(c[term])], c[term], label=labels.get(name, name), lw=1.2)
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_accuracy_bars(results: dict[str, dict[str, Any]], labels: dict[str, str], out_png: Path) -> Path:
    names = list(results)
    x = torch.arange(len(names)).float()
    fig, ax = plt.subplots(figsize=(1.9 * len(names) + 1.5, 3.4))
    for off, key, lab in ((-0.2, "linear_top1", "linear probe"), (0.2, "knn_top1", "kNN")):
        vals = [results[n][key] for n in names]
        bars = ax.bar((x + off).numpy(), vals, width=0.38, label=lab)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    lo = min(min(r["linear_top1"], r["knn_top1"]) for r in results.values())
    ax.set_ylim(max(0.0, lo - 10), 100)
    ax.set_xticks(x.numpy(), [labels.get(n, n) for n in names], fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_before_after(raw: torch.Tensor, models: dict[str, torch.nn.Module], normalise, out_png: Path) -> Path:
    """Rows: the images, then per model its PCA-of-patch-features image and its last-block CLS attention."""


    x = normalise(raw)
    rows: list[tuple[str, torch.Tensor | None]] = [("image", None)]
    with torch.no_grad():
        for name, m in models.items():
            m.eval()
            rows.append((f"{name}\nPCA", pca_feature_image(m, x)))
            rows.append((f"{name}\nattention", attention_maps(m, x).mean(1, keepdim=True)))
    b = raw.shape[0]
    fig, axes = plt.subplots(len(rows), b, figsize=(1.5 * b, 1.5 * len(rows)), squeeze=False)
    for r, (title, maps) in enumerate(rows):
        for i in range(b):
            ax = axes[r][i]
            ax.axis("off")
            if maps is None:
                ax.imshow(display_image(raw[i]))
            else:
                up = F.interpolate(maps[i : i + 1].float(), size=raw.shape[-2:], mode="nearest")[0]
                ax.imshow(
                    up.permute(1, 2, 0).numpy() if up.shape[0] == 3 else up[0].numpy(),
                    cmap=None if up.shape[0] == 3 else "inferno",
                )
        axes[r][0].set_title(title, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_report(cfg, out: Path, results, params, timings, frozen, test_set, stats_source,
                 started: float | None = None) -> Path:

    frozen_label = "DINOv3 (frozen)" if get_backbone_spec(cfg.model).family == "dinov3" else "DinoV2 (frozen)"
    labels = {"frozen": frozen_label, **{k: v.label for k, v in VARIANTS.items()}}
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    runs = {v: out / "runs" / v for v in cfg.variants}
    plot_loss_curves(runs, labels, figs / "loss_curves.png")
    plot_accuracy_bars(results, labels, figs / "accuracy.png")
    raw = torch.stack([torch.as_tensor(test_set[i][0]) for i in range(min(cfg.n_show, len(test_set)))])
    transform = eval_transform_for(stats_source, cfg.image_size, crop_pct=1.0)
    shown = {"DinoV2": frozen}
    if "explora" in cfg.variants:
        shown["ExPLoRA"] = build_backbone(
            cfg.model, weights=str(runs["explora"] / "export" / "model.safetensors"), img_size=cfg.image_size
        )
    plot_before_after(raw, shown, transform, figs / "before_after.png")

    base = results["frozen"]
    precision = resolve_precision(cfg.precision, torch.device("cpu"))
    if started is not None:  # the figures are made: what is left is writing this text
        timings["total_s"] = time.perf_counter() - started
    plan_path = out / "plan.json"
    plan_line = ""
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        plan_line = (
            f" The step count was chosen to fit the {plan['budget_minutes']:g}-minute budget on this machine: a warm "
            f"step took {plan['step_seconds']} s (the fastest of the timed warm steps) and one evaluation "
            f"{plan['eval_seconds']} s (`plan.json`)."
        )
        if plan.get("planned_seconds") is not None and "total_s" in timings:
            actual = timings["total_s"]
            plan_line += (
                f" Planned {plan['planned_seconds'] / 60:.1f} min, took {actual / 60:.1f} min "
                f"({100 * actual / (60 * plan['budget_minutes']):.0f} % of the budget)."
            )
            plan["actual_seconds"] = round(actual, 1)
            plan_path.write_text(json.dumps(plan, indent=2))
    lines = [
        "# ExPLoRA demo report",
        "",
        f"Backbone `{cfg.model}` (weights: `{cfg.weights}`), target domain `{cfg.data}`.",
        f"Pre-training: {cfg.steps} steps x batch {cfg.batch_size} ({cfg.steps * cfg.batch_size} unlabeled images), "
        f"2 global crops at {cfg.image_size} px + {cfg.n_local} local at {cfg.local_size} px, {cfg.prototypes} "
        f"prototypes, {precision}. Evaluation: frozen backbone at {cfg.image_size} px on {base['n_train']} train / "
        f"{base['n_test']} test images (fixed random subsets, seed {cfg.seed}); linear probe = DinoV2 protocol "
        "(28 heads, best on the test split as upstream ExPLoRA does for fMoW); kNN on L2-normalised CLS, T = 0.07."
        + plan_line,
        "",
        "| model | trainable backbone params | linear top-1 | kNN top-1 | linear vs frozen | kNN vs frozen |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        p = params.get(name, {})
        trainable = p.get("trainable", 0)
        total = p.get("total", 0) or 1
        dl, dk = r["linear_top1"] - base["linear_top1"], r["knn_top1"] - base["knn_top1"]
        lines.append(
            f"| {labels.get(name, name)} | {trainable / 1e6:.2f}M ({100 * trainable / total:.1f}%) | "
            f"{r['linear_top1']:.2f} | {r['knn_top1']:.2f} (k={r['knn_best_k']}) | "
            + ("—" if name == "frozen" else f"{dl:+.2f}")
            + " | "
            + ("—" if name == "frozen" else f"{dk:+.2f}")
            + " |"
        )
    se = 100 * (0.25 / max(1, base["n_test"])) ** 0.5
    lines += [
        "",
        f"One binomial standard error on {base['n_test']} test images is at most {se:.1f} points: differences smaller "
        "than about two of those are not evidence either way.",
        "",
        "![accuracy](figures/accuracy.png)",
        "",
        "## Loss curves",
        "",
        "Every term of the DinoV2 objective (DINO CLS loss on local and global crops, iBOT masked-patch loss, KoLeo) "
        "for each run; `loss` is their weighted sum.",
        "",
        "![loss curves](figures/loss_curves.png)",
        "",
        "## Patch features and attention, before and after",
        "",
        "First three PCA components of the last block's patch tokens as RGB, and the last block's CLS-to-patch "
        "attention (mean over heads), for test images.",
        "",
        "![before and after](figures/before_after.png)",
        "",
        "## Time",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k.removesuffix('_s')} | {v:.0f} |" for k, v in timings.items()],
        "",
        "Numbers come from `eval/*/summary.json`, `runs/*/metrics.csv` and `params.json` in this directory.",
    ]
    (out / "params.json").write_text(json.dumps(params, indent=2))
    (out / "results.json").write_text(json.dumps({"results": results, "timings": timings}, indent=2))
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
