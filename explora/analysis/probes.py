"""Per-block linear probes on individual patch tokens (paper-notes §5, analyses (2) and (3)).

The paper trains, for every block, a linear classifier on single patch tokens to predict (2) the patch's
position in the image and (3) the image's class; it does not publish the probe protocol. Our choices
(configurable where it matters):

- images (not patches) are split into train/test, so a probe never sees a test image's tokens;
- features are standardised with the train tokens' per-channel mean/std;
- the probe is multinomial logistic regression (a single ``nn.Linear``, zero-initialised: the problem is convex,
  so the result is deterministic) fitted full-batch with L-BFGS (strong-Wolfe line search) plus a small L2
  penalty ``weight_decay``;
- position is predicted as two classifications, row index (h classes) and column index (w classes); we report
  row, column and joint accuracy (both right: chance is 1 / (h*w)), the joint one as the headline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of every linear probe (L-BFGS iterations and L2 penalty on the weights)."""

    max_iter: int = 100
    weight_decay: float = 1e-4
    tolerance_grad: float = 1e-5


def fit_linear_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    num_classes: int,
    cfg: ProbeConfig = ProbeConfig(),
) -> torch.Tensor:
    """Fit logistic regression on (M, D) features / (M,) labels; return predicted labels of (M', D) test features."""
    mu = x_train.mean(0, keepdim=True)
    sd = x_train.std(0, keepdim=True).clamp_min(1e-6)
    xtr = (x_train - mu) / sd  # (M, D)
    xte = (x_test - mu) / sd  # (M', D)
    w = torch.zeros(x_train.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=cfg.max_iter, tolerance_grad=cfg.tolerance_grad,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, y_train) + cfg.weight_decay * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (xte @ w + b).argmax(1)  # (M',)


def split_images(n_images: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (train, test) image indices; at least one image in each when n_images >= 2."""
    if n_images < 2:
        raise ValueError(f"probes need at least 2 images for a train/test split, got {n_images}")
    perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
    n_test = min(max(1, round(n_images * test_fraction)), n_images - 1)
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def position_probe(
    tokens: torch.Tensor,
    positions: torch.Tensor,
    grid: tuple[int, int],
    train_idx: torch.Tensor,
    test_idx: torch.Tensor,
    cfg: ProbeConfig = ProbeConfig(),
) -> dict[str, float]:
    """Row/column/joint test accuracy of predicting each patch's grid position from its token.

    ``tokens``: (n_images, P, D) patch tokens; ``positions``: (n_images, P) their row-major grid indices.
    """
    h, w = grid
    d = tokens.shape[-1]
    rows, cols = positions // w, positions % w  # (n, P) each
    xtr, xte = tokens[train_idx].reshape(-1, d), tokens[test_idx].reshape(-1, d)
    pr = fit_linear_probe(xtr, rows[train_idx].reshape(-1), xte, h, cfg)
    pc = fit_linear_probe(xtr, cols[train_idx].reshape(-1), xte, w, cfg)
    ok_r = pr == rows[test_idx].reshape(-1)
    ok_c = pc == cols[test_idx].reshape(-1)
    return {
        "row_accuracy": ok_r.float().mean().item(),
        "col_accuracy": ok_c.float().mean().item(),
        "accuracy": (ok_r & ok_c).float().mean().item(),
        "chance": 1.0 / (h * w),
    }


def class_probe(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    train_idx: torch.Tensor,
    test_idx: torch.Tensor,
    cfg: ProbeConfig = ProbeConfig(),
) -> dict[str, float]:
    """Test accuracy of predicting the image class from each individual patch token (every patch is one sample).

    ``tokens``: (n_images, P, D); ``labels``: (n_images,) image classes.
    """
    n, p, d = tokens.shape
    y = labels.view(n, 1).expand(n, p)  # (n, P): every patch inherits its image's label
    pred = fit_linear_probe(tokens[train_idx].reshape(-1, d), y[train_idx].reshape(-1),
                            tokens[test_idx].reshape(-1, d), num_classes, cfg)
    acc = (pred == y[test_idx].reshape(-1)).float().mean().item()
    counts = torch.bincount(labels[train_idx], minlength=num_classes).float()
    return {"accuracy": acc, "majority_baseline": float((labels[test_idx] == counts.argmax()).float().mean())}
