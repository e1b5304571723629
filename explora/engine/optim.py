"""Optimiser parameter groups the way DinoV2 builds them (``dinov2/utils/param_groups.py``), by parameter name,
the per-step application of the schedules to them, and gradient clipping per module.

Each group carries ``lr_multiplier`` (layer-wise decay, patch-embed multiplier), ``wd_multiplier`` (0 for norms,
biases and LayerScale gammas, i.e. 1-D tensors and ``.bias``; tokens and position embeddings only with
``decay_tokens=False``) and ``is_last_layer`` (the DINO head's prototypes, whose lr is 0 during the first epoch).
The loop multiplies the scheduled lr/wd by these each step. Only tensors with ``requires_grad`` enter the
optimiser, so frozen backbone weights cost no optimiser state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from explora.engine import parallel as D

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_NO_WD_SUFFIXES = (".bias", "gamma")
_TOKEN_SUFFIXES = ("cls_token", "reg_token", "pos_embed", "mask_token", "register_tokens")
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
    decay_tokens: bool = True,
) -> list[dict]:
    """Group trainable parameters by (lr multiplier, wd multiplier, last-layer flag).

    No weight decay on 1-D tensors (norms, LayerScale gammas), biases and ``gamma``: the union of DinoV2's rule
    (``param_groups.py``: ``.bias``, ``norm``, ``gamma``) and MAE's (timm ``add_weight_decay``: 1-D and ``.bias``).
    Both decay the cls/register/mask tokens and the position embeddings; ``decay_tokens=False`` exempts them too.
    LoRA A/B are 2-D and decayed, as upstream.
    """
    no_wd = _NO_WD_SUFFIXES if decay_tokens else _NO_WD_SUFFIXES + _TOKEN_SUFFIXES
    groups: dict[tuple[float, float, bool], dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        lid = layer_id(name, num_layers)
        lr_mult = layer_decay ** (num_layers + 1 - lid)
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if (param.ndim <= 1 or name.endswith(no_wd)) else 1.0
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


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """This step's lr and weight decay on every group, times the group's multipliers.

    As DinoV2's ``apply_optim_scheduler`` (``dinov2/train/train.py``): the last layer takes ``last_layer_lr``, 0
    while it is frozen. Its gradients still count in the clip norm and AdamW's moments keep accumulating; decoupled
    weight decay is multiplied by the lr, so it does not move the frozen layer either.
    """
    for g in optimizer.param_groups:
        g["lr"] = (last_layer_lr if g["is_last_layer"] else lr) * g["lr_multiplier"]
        g["weight_decay"] = wd * g["wd_multiplier"]


def clip_gradients(groups: list[list[torch.Tensor]], max_norm: float) -> torch.Tensor:
    """Clip each group's gradient norm to ``max_norm`` separately (0: no clipping); return the total norm before.

    DinoV2 clips every student module on its own (``dinov2/train/train.py``: ``for v in model.student.values():
    v.clip_grad_norm_(cfg.optim.clip_grad)``); one group is the usual global clipping. The groups must partition the
    trainable tensors, so the returned norm (what the loop logs as ``grad_norm``) is the norm over all of them.
    Under FSDP2 each group's norm is the DTensor norm over every shard (a collective, same value on every rank).
    """
    limit = max_norm if max_norm > 0 else float("inf")
    norms = []
    for params in groups:
        if any(p.grad is not None for p in params):
            norm = D.full_tensor(torch.nn.utils.clip_grad_norm_(params, limit))
            norms.append(norm.float())
    if len(norms) <= 1:
        return norms[0] if norms else torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))
