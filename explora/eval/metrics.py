"""Classification metrics and their on-disk form (``metrics.json`` + a confusion-matrix PNG).

Every supervised protocol (linear probe, kNN, fine-tuning) reports the same numbers the same way, so runs of
different protocols can be laid side by side by :mod:`explora.eval.report`. Accuracies are micro averages over
samples (upstream ``mean_accuracy`` in ExPLoRA ``linprobe/``), in percent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from explora.core.errors import ExploraError

METRICS_FILE = "metrics.json"
CONFUSION_FILE = "confusion_matrix.png"


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (N,) whether the label is among the k highest scores (k clipped to the number of classes)."""
    k = min(k, logits.shape[1])
    topk = logits.topk(k, dim=1).indices  # (N, k)
    return (topk == labels[:, None]).any(dim=1)


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts; row = true class, column = predicted class."""
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        from explora.core.errors import DataError

        raise DataError(
            f"labels range over [{int(labels.min())}, {int(labels.max())}] but the classifier has {num_classes} "
            f"classes; expected labels in [0, {num_classes - 1}] (are the training and validation datasets "
            "the same dataset with the same classes?)"
        )
    idx = labels.long() * num_classes + preds.long()  # (N,)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
) -> dict[str, Any]:
    """Top-1/top-5 (percent), per-class accuracy (percent, ``None`` for classes absent from ``labels``) and the
    confusion matrix, as plain Python values ready for JSON."""
    logits = logits.detach().float().cpu()
    labels = labels.detach().long().cpu()
    num_classes = num_classes or logits.shape[1]
    preds = logits.argmax(dim=1)
    cm = confusion_matrix(preds, labels, num_classes)
    support = cm.sum(dim=1)
    per_class = [(100.0 * cm[c, c].item() / support[c].item()) if support[c] > 0 else None for c in range(num_classes)]
    n = max(len(labels), 1)
    return {
        "top1": 100.0 * topk_correct(logits, labels, 1).sum().item() / n,
        "top5": 100.0 * topk_correct(logits, labels, 5).sum().item() / n,
        "num_samples": len(labels),
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
    }


def save_metrics(metrics: dict[str, Any], out_dir: str | Path, class_names: list[str] | None = None) -> Path:
    """Write ``metrics.json`` (and ``confusion_matrix.png`` when the metrics hold a confusion matrix)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / METRICS_FILE
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    if "confusion_matrix" in metrics:
        plot_confusion_matrix(metrics["confusion_matrix"], out / CONFUSION_FILE, class_names=class_names)
    return path


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    """Read ``RUN_DIR/metrics.json`` (or the file itself), with an error that names the path."""

    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise ExploraError(
            f"{path}: no metrics file; expected the {METRICS_FILE} an `explora linprobe/knn/finetune` run writes"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExploraError(f"{path}: not valid JSON ({e})") from e


def plot_confusion_matrix(
    cm: list[list[int]] | torch.Tensor, path: str | Path, class_names: list[str] | None = None
) -> Path:
    """Row-normalised confusion matrix as a PNG (matplotlib, Agg backend: works headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.as_tensor(cm, dtype=torch.float64)
    k = m.shape[0]
    norm = m / m.sum(dim=1, keepdim=True).clamp(min=1)  # (K, K) rows sum to 1 (or 0 when absent)
    size = min(4 + 0.25 * k, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 40:
        names = class_names or [str(i) for i in range(k)]
        ax.set_xticks(range(k), names, rotation=90, fontsize=7)
        ax.set_yticks(range(k), names, fontsize=7)
    if k <= 15:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    int(m[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
