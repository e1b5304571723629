"""Several evaluation runs side by side: a Markdown table and a bar chart of top-1/top-5 (and mIoU).

Each run directory holds the ``metrics.json`` that ``explora linprobe``, ``knn``, ``finetune`` or ``segment`` wrote
(:func:`explora.eval.metrics.save_metrics`), so runs of different protocols and backbones compare directly; an
mIoU column appears when a segmentation run is among them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from explora.core.errors import ExploraError
from explora.eval.metrics import load_metrics

REPORT_MD = "report.md"
REPORT_PNG = "report.png"


def _detail(m: dict[str, Any]) -> str:
    """The protocol-specific choice that produced the number (best head, best k, trainable parameters)."""
    if "best_head" in m:
        pool = "+avgpool" if m.get("best_avgpool") else ""
        return f"n={m.get('best_n_blocks')}{pool}, lr={m.get('best_lr')}"
    if "best_k" in m:
        return f"k={m['best_k']}, T={m.get('temperature')}"
    if "trainable" in m:
        t = m["trainable"]
        return f"trainable {t.get('backbone', 0) / 1e6:.2f}M + head {t.get('head', 0) / 1e6:.3f}M"
    return ""


def load_runs(run_dirs: list[str | Path]) -> list[tuple[str, dict[str, Any]]]:
    """(name, metrics) per run; names are the directory names, made unique with their parent when they clash."""
    if not run_dirs:
        raise ExploraError("report: give at least one run directory containing metrics.json")
    paths = [Path(d) for d in run_dirs]
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    return [(n, load_metrics(p)) for n, p in zip(names, paths, strict=True)]


def markdown_table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """One row per run: protocol, top-1, top-5, (mIoU when a run has one), samples and the selected setting."""
    seg = any("miou" in m for _, m in runs)
    fmt = lambda m, k: f"{m[k]:.2f}" if k in m else "-"  # noqa: E731
    head = "| run | protocol | top-1 | top-5 |" + (" mIoU |" if seg else "") + " samples | selected |"
    lines = [head, "|---|---|---:|---:|" + ("---:|" if seg else "") + "---:|---|"]
    for name, m in runs:
        miou = f" {fmt(m, 'miou')} |" if seg else ""
        lines.append(
            f"| {name} | {m.get('protocol', '?')} | {fmt(m, 'top1')} | {fmt(m, 'top5')} |{miou} "
            f"{m.get('num_samples', '-')} | {_detail(m)} |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(runs: list[tuple[str, dict[str, Any]]], path: str | Path) -> Path:
    """Grouped bars of top-1 and top-5 (and mIoU when a run has one) per run (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _ in runs]
    x = np.arange(len(runs))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(runs) + 2), 4))
    keys = ["top1", "top5"] + (["miou"] if any("miou" in m for _, m in runs) else [])
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        vals = [m.get(key, 0.0) for _, m in runs]
        bars = ax.bar(x + (i - (len(keys) - 1) / 2) * width, vals, width=width, label=key)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy / IoU (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md`` and ``report.png`` comparing ``run_dirs`` into ``out_dir``."""
    runs = load_runs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / REPORT_MD
    md.write_text("# Evaluation report\n\n" + markdown_table(runs) + f"\n![top-1 / top-5]({REPORT_PNG})\n")
    return {"markdown": md, "chart": bar_chart(runs, out / REPORT_PNG)}
