"""Per-image PCA spectra of a block's patch-feature map (paper-notes §5, analysis (1)).

The paper plots the mean (and std) of the PCA eigenvalues of each block's output patch features on target-domain
images but does not give the normalisation. Our default (configurable):

- each image's (N, D) patch-feature matrix is treated separately (one PCA per image and block);
- ``norm="standardize"``: every channel is centred and scaled to unit variance over that image's patches, so the
  eigenvalues are those of the channel *correlation* matrix; they sum to the number of non-constant channels and
  are comparable across blocks even though the residual stream's scale grows with depth;
- ``norm="center"``: channels are only centred (eigenvalues of the plain covariance, in feature units);
- the covariance uses the unbiased 1 / (N - 1) factor; the top-k eigenvalues are kept.
"""

from __future__ import annotations

import torch

NORMS = ("standardize", "center")


def patch_eigenvalues(tokens: torch.Tensor, k: int, norm: str = "standardize", eps: float = 1e-6) -> torch.Tensor:
    """Top-``k`` covariance eigenvalues of each image's patch features, descending: (B, N, D) -> (B, k).

    Computed as squared singular values of the centred (and scaled) matrix / sqrt(N - 1), which avoids forming the
    (D, D) covariance. ``k`` larger than min(N, D) is padded with zeros (those eigenvalues are exactly zero).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    b, n, d = tokens.shape
    x = tokens.double()
    x = x - x.mean(dim=1, keepdim=True)  # (B, N, D) centred per channel
    if norm == "standardize":
        sd = x.std(dim=1, keepdim=True)  # (B, 1, D)
        x = torch.where(sd > eps, x / sd.clamp_min(eps), torch.zeros_like(x))
    s = torch.linalg.svdvals(x / max(n - 1, 1) ** 0.5)  # (B, min(N, D)), descending
    ev = s.square()
    if ev.shape[1] < k:
        ev = torch.cat([ev, ev.new_zeros(b, k - ev.shape[1])], dim=1)
    return ev[:, :k].float()
