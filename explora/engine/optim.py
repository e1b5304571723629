"""Optimiser parameter groups the way DinoV2 builds them (``dinov2/utils/param_groups.py``), by parameter name.

Each group carries ``lr_multiplier`` (layer-wise decay, patch-embed multiplier), ``wd_multiplier`` (0 for norms,
biases, LayerScale gammas and tokens) and ``is_last_layer`` (the DINO head's prototypes, frozen during the first
epoch). The loop multiplies the scheduled lr/wd by these each step. Only tensors with ``requires_grad`` enter the
optimiser, so frozen backbone weights cost no optimiser state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_NO_WD_SUFFIXES = (".bias", "gamma", "cls_token", "reg_token", "pos_embed", "mask_token", "register_tokens")
_EMBED_NAMES = ("patch_embed", "pos_embed", "cls_token", "reg_token", "mask_token", "register_tokens")


def layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, i+1 for block i, ``num_layers + 1`` for everything after the blocks (heads, final norm)."""
    m = _BLOCK.search(name)
    if m:
        return int(m.group(1)) + 1
    if any(k in name for k in _EMBED_NAMES):
        return 0
    return num_layers + 1


def build_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    *,
    num_layers: int,
    layer_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
) -> list[dict]:
    """Group trainable parameters by (lr multiplier, wd multiplier, last-layer flag)."""
    groups: dict[tuple[float, float, bool], dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        lid = layer_id(name, num_layers)
        lr_mult = layer_decay ** (num_layers + 1 - lid)
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if (param.ndim <= 1 or name.endswith(_NO_WD_SUFFIXES)) else 1.0
        last = "last_layer" in name
        key = (round(lr_mult, 12), wd_mult, last)
        group = groups.setdefault(
            key, {"params": [], "names": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult, "is_last_layer": last}
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(groups: list[dict], betas: tuple[float, float], fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the groups; ``fused`` (one kernel for all tensors) where the build supports it."""
    params = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if fused is None:
        fused = True
    try:
        return torch.optim.AdamW(params, lr=0.0, betas=betas, weight_decay=0.0, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=0.0, betas=betas, weight_decay=0.0, foreach=True)
