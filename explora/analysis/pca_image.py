"""RGB images of patch features from their first three principal components (DinoV2 paper, Fig. 1 style).

DinoV2's visualisations fit one PCA on the patch features of a set of images, optionally threshold the first
component to separate foreground from background, refit the PCA on the foreground patches, and map components
1-3 to RGB. We follow that recipe, re-derived from the DinoV2 paper's description; the PCA is fitted jointly on
all images passed in so colours are comparable across them (pass the same images "before" and "after" ExPLoRA
for a side-by-side comparison; the two fits are independent).
"""

from __future__ import annotations

import torch
from torch import nn

from explora.analysis.features import patch_grid


def _principal_axes(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), top-k principal axes (D, k)) of (M, D) samples, signs fixed so each axis' largest loading is > 0."""
    mu = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mu, full_matrices=False)  # vh: (min(M, D), D)
    axes = vh[:k].T  # (D, k)
    if axes.shape[1] < k:
        axes = torch.cat([axes, axes.new_zeros(axes.shape[0], k - axes.shape[1])], dim=1)
    flip = torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))  # (1, k)
    return mu, axes * torch.where(flip == 0, torch.ones_like(flip), flip)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Scale each column of (M, k) to [0, 1]."""
    lo, hi = x.min(0).values, x.max(0).values
    return (x - lo) / (hi - lo).clamp_min(1e-12)


@torch.no_grad()
def pca_feature_image(
    backbone: nn.Module,
    images: torch.Tensor,
    foreground_threshold: float | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """(B, C, H, W) normalised images -> (B, 3, h, w) RGB in [0, 1] on the patch grid.

    Features are the final-norm output patch tokens (``block=None``) or the raw output of ``blocks[block]``.
    With ``foreground_threshold`` t, patches whose min-max-scaled first component is > t count as foreground, the
    PCA is refitted on them only and background pixels are black (DinoV2 uses the first component this way; which
    side is foreground depends on the component's sign, fixed by the largest-loading convention).
    """
    b = images.shape[0]
    h, w = patch_grid(backbone, (images.shape[-2], images.shape[-1]))
    if block is None:
        feats = backbone.forward_features(images)[:, backbone.num_prefix_tokens:]  # (B, N, D)
    else:
        feats = backbone.forward_intermediates(images, indices=[block % len(backbone.blocks)], norm=False,
                                               output_fmt="NLC", intermediates_only=True)[0]
    x = feats.float().reshape(-1, feats.shape[-1])  # (B*N, D)
    mu, axes = _principal_axes(x, 3)
    fg = torch.ones(x.shape[0], dtype=torch.bool)
    if foreground_threshold is not None:
        first = _minmax((x - mu) @ axes[:, :1])[:, 0]  # (B*N,)
        fg = first > foreground_threshold
        if int(fg.sum()) >= 2:
            mu, axes = _principal_axes(x[fg], 3)
    rgb = torch.zeros(x.shape[0], 3)
    if bool(fg.any()):
        rgb[fg] = _minmax((x[fg] - mu) @ axes)  # (M_fg, 3)
    return rgb.reshape(b, h, w, 3).permute(0, 3, 1, 2).contiguous()  # (B, 3, h, w)
