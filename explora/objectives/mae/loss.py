"""Reconstruction targets and losses on removed patches only (MAE, He et al. 2022; SatMAE, Cong et al. 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches row-major, pixels ordered (row, col, channel) as in MAE's decoder."""
    B, C, H, W = images.shape
    h, w = H // patch, W // patch
    x = images.reshape(B, C, h, patch, w, patch)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, patch * patch * C)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, p*p*C) -> (B, C, h*p, w*p)."""
    B = patches.shape[0]
    h, w = grid
    x = patches.reshape(B, h, w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, channels, h * patch, w * patch)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """norm_pix: each patch minus its mean over (pixels, channels), divided by sqrt(var + eps).

    The variance is the unbiased one (torch's default), as MAE's ``forward_loss`` computes it.
    """
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of each patch's squared error, averaged over removed patches: (B, N, P) x2, (B, N) -> ()."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


def group_masked_mse(
    preds: Sequence[torch.Tensor],
    target: torch.Tensor,
    mask: torch.Tensor,
    groups: Sequence[Sequence[int]],
    channels: int,
    mode: str = "per_group",
) -> torch.Tensor:
    """SatMAE's group-channel loss.

    preds: G tensors (B, L, p*p*|g|) ordered (pixel, band); target (B, L, p*p*C) over all bands (norm_pix already
    applied over the whole multi-band patch); mask (B, G*L), group-major. Each group's error is averaged over its
    pixels and channels; the total is the sum over groups of errors on that group's removed tokens / total removed
    (group, position) tokens.

    ``mode="per_group"``: head g is scored against bands ``groups[g]`` (the loss SatMAE describes). ``"satmae"``:
    as the released ``models_mae_group_channels.forward_loss``, the heads are concatenated in group order and
    channel k of that concatenation is compared with band k; group g then averages channels ``groups[g]`` of it.
    The two agree exactly when the concatenated groups are in band order (e.g. ((0, 1, 2), (3, 4, 5))).
    """
    B, L, _ = target.shape
    t = target.reshape(B, L, -1, channels)  # (B, L, p*p, C)
    m = mask.reshape(B, len(groups), L)  # (B, G, L)
    if mode == "satmae":
        heads = torch.cat([p.reshape(B, L, -1, len(g)) for p, g in zip(preds, groups)], dim=-1)  # (B, L, pp, C)
        per_channel = ((heads - t) ** 2).mean(dim=2)  # (B, L, C): channel k of the heads vs band k
        errors = [per_channel[..., list(bands)].mean(dim=-1) for bands in groups]  # G x (B, L)
    elif mode == "per_group":
        # t[..., bands] is (B, L, p*p, |g|), flattened (pixel, band) like the head's output
        errors = [((pred - t[..., list(bands)].flatten(2)) ** 2).mean(dim=-1) for pred, bands in zip(preds, groups)]
    else:
        raise ValueError(f"group loss mode must be 'per_group' or 'satmae', got {mode!r}")
    total = target.new_zeros(())
    for g, err in enumerate(errors):
        total = total + (err * m[:, g]).sum()
    return total / m.sum().clamp_min(1)
