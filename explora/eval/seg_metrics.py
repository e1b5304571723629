"""Segmentation metrics from a pixel confusion matrix: mIoU, per-class IoU, F1, pixel accuracy, and their files.

The conventions are mmsegmentation's ``IoUMetric`` (which PANGAEA reports): pixels labelled ``ignore_index`` are
not counted; a class's IoU is ``TP / (TP + FP + FN)`` and its F1 ``2 TP / (2 TP + FP + FN)``; a class absent from
both the labels and the predictions (union 0) has no IoU and is left out of the mean (``None`` in the per-class
lists); pixel accuracy is correct pixels over counted pixels. All values in percent. ``metrics.json`` carries
``miou`` next to the confusion matrix, so :mod:`explora.eval.report` lists segmentation runs beside classification
ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from explora.core.errors import DataError
from explora.data.dense import IGNORE_INDEX


def pixel_confusion(preds: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 pixel counts (row = true class, column = predicted) over pixels whose label is not ignored."""
    labels = labels.reshape(-1).long()
    preds = preds.reshape(-1).long()
    keep = labels != ignore_index
    labels, preds = labels[keep], preds[keep]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"mask labels range over [{int(labels.min())}, {int(labels.max())}]; expected 0.."
                        f"{num_classes - 1} or {ignore_index} (ignore)")
    return torch.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_metrics(cm: torch.Tensor, class_names: list[str] | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU / F1 (``None`` where a class is absent from labels and predictions), mean F1, pixel
    accuracy (percent) and the confusion matrix, as plain values ready for JSON."""
    cm = torch.as_tensor(cm, dtype=torch.float64)
    tp = cm.diag()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    union = tp + fp + fn
    iou = [100.0 * float(tp[c] / union[c]) if union[c] > 0 else None for c in range(len(tp))]
    f1 = [100.0 * float(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c])) if union[c] > 0 else None for c in range(len(tp))]
    present = [v for v in iou if v is not None]
    total = float(cm.sum())
    out = {
        "miou": sum(present) / len(present) if present else 0.0,
        "mean_f1": sum(v for v in f1 if v is not None) / len(present) if present else 0.0,
        "pixel_accuracy": 100.0 * float(tp.sum()) / total if total else 0.0,
        "per_class_iou": iou,
        "per_class_f1": f1,
        "num_pixels": int(total),
        "confusion_matrix": cm.long().tolist(),
    }
    if class_names is not None:
        out["class_names"] = list(class_names)
    return out


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for one value)."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def plot_per_class_iou(metrics: dict[str, Any], path) -> None:
    """Horizontal bars of per-class IoU (absent classes left empty), PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iou = metrics["per_class_iou"]
    names = metrics.get("class_names") or [str(i) for i in range(len(iou))]
    fig, ax = plt.subplots(figsize=(6, 1 + 0.3 * len(iou)))
    ax.barh(range(len(iou)), [v or 0.0 for v in iou], color="tab:blue")
    ax.set_yticks(range(len(iou)), names, fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.set_title(f"mIoU {metrics['miou']:.2f}")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["IGNORE_INDEX", "mean_and_se", "pixel_confusion", "plot_per_class_iou", "segmentation_metrics"]
