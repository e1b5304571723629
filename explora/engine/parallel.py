"""Data-parallel wrapping for ``torchrun`` (DDP or FSDP2), degrading to the module itself in one process.

The process helpers (rank, world size, guarded collectives, set-up) live in :mod:`explora.core.distributed` and are
re-exported here, so ``from explora.engine import parallel as D`` keeps giving the whole toolbox. See
docs/distributed.md for what is all-reduced and the tolerances measured against single-process runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from explora.core.distributed import (  # noqa: F401 - re-exported: the engine's callers use D.rank() etc.
    all_gather_objects,
    all_reduce_,
    barrier,
    cleanup,
    full_tensor,
    init_distributed,
    is_dist,
    is_main,
    local_shards,
    rank,
    world_size,
)
from explora.core.errors import ConfigError
from explora.core.precision import resolve_precision

# -- logging values of the global batch ------------------------------------------------------------------------


def global_output(out: Any) -> Any:
    """Make an ``ObjectiveOutput`` report the global batch: loss value and terms averaged over processes.

    The returned loss has the *value* of the mean over processes but the *gradient* of this process's loss
    (``local + (mean - local).detach()``); DDP and FSDP2 average gradients over processes, so the update is the
    gradient of the global mean, as in a single-process run on the whole global batch. Two reasons to average the
    value: the logged loss is the global one (metrics.csv matches a single-process run), and every process sees
    the same value, so the trainer's non-finite check skips a step on all ranks or on none (a rank that skipped
    alone would leave the others waiting in the gradient all-reduce). Terms are averaged too (per-process means,
    e.g. KoLeo, become the mean over processes; counts become the per-process average).
    """
    if not is_dist():
        return out
    names = [k for k, v in out.terms.items() if torch.is_tensor(v) and v.numel() == 1]
    local = out.loss.detach().float().reshape(1)
    stats = torch.cat([local, *(out.terms[k].detach().float().reshape(1).to(local.device) for k in names)])
    all_reduce_(stats, "mean")  # (1 + T,)
    out.loss = out.loss + (stats[0] - local[0]).to(out.loss.dtype).detach()
    for i, k in enumerate(names, start=1):
        out.terms[k] = stats[i].clone()
    return out


class _GlobalOutput(nn.Module):
    """Calls the (FSDP2-sharded) objective and reports the global loss; keeps the objective's own methods."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return global_output(self.module(*args, **kwargs))


def _ddp_class():

    class GlobalLossDDP(DistributedDataParallel):
        """DDP whose output reports the global-batch loss (see :func:`global_output`)."""

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return global_output(super().forward(*args, **kwargs))

    return GlobalLossDDP


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Let backward passes inside the block all-reduce gradients (``enabled``) or only accumulate them locally.

    DDP: ``no_sync()``; FSDP2: ``set_requires_gradient_sync(False)`` on the sharded module; one process: nothing.
    The last backward of a step must run with sync enabled; it then reduces the gradients accumulated before it.
    """
    if enabled:
        yield
        return

    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
        return
    sharded = model.module if isinstance(model, _GlobalOutput) else model
    if not isinstance(sharded, FSDPModule):  # not wrapped: gradients are local anyway
        yield
        return
    sharded.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        sharded.set_requires_gradient_sync(True)


# -- FSDP2 -------------------------------------------------------------------------------------------------------


def untie_shared_parameters(module: nn.Module) -> int:
    """Give every parameter registered in more than one place its own copy after the first; return how many.

    The DinoV2 teacher shares the student's frozen tensors (one copy in memory). FSDP2 replaces each module's
    parameters by its own sharded DTensor, so a tensor shared by two FSDP units cannot stay shared: the teacher
    gets its own (then sharded) copy. First occurrence in registration order keeps the original (the student).
    """
    seen: set[int] = set()
    copies = 0
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            if id(p) in seen:
                sub._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                copies += 1
            else:
                seen.add(id(p))
    return copies


def vit_blocks(module: nn.Module) -> list[nn.Module]:
    """Every transformer block of every ViT inside ``module`` (student and teacher backbones)."""
    out: list[nn.Module] = []
    for sub in module.modules():
        blocks = getattr(sub, "blocks", None)
        if isinstance(blocks, nn.Sequential | nn.ModuleList):
            out.extend(blocks)
    return out


def shard_fsdp2(module: nn.Module, device: torch.device, precision: str = "fp32") -> nn.Module:
    """``fully_shard`` every ViT block (student and teacher), then the root; return a global-loss wrapper.

    FSDP2 shards each tensor on dim 0 (DTensor), so a block's frozen weights and its trainable LoRA/norm tensors
    live in one unit (FSDP1 could not mix ``requires_grad`` in one flat parameter). The teacher is sharded the same
    way, so the EMA update runs shard-to-shard on local tensors (``DinoV2Objective.on_optimizer_step``).
    With ``precision`` bf16 (resolved for ``device``), parameters are all-gathered and used in bf16 and gradients
    reduced in fp32 (``MixedPrecisionPolicy``, as DinoV2's FSDP setup does): half the all-gather volume; the
    sharded master weights, the optimiser and the EMA stay fp32.
    """


    if getattr(module, "grad_checkpointing", False):
        raise ConfigError("train.strategy=fsdp2 with model.grad_checkpointing is not tested; use ddp.")
    mesh = init_device_mesh(device.type, (world_size(),))
    bf16 = resolve_precision(precision, device) == "bf16"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32 if bf16 else None)
    untie_shared_parameters(module)
    for block in vit_blocks(module):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(module, mesh=mesh, mp_policy=mp)
    return _GlobalOutput(module)


def full_state_dict(module: nn.Module, exclude: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every DTensor gathered to a plain tensor (collective under FSDP2).

    Every process must call it (same module structure, so the all-gathers pair up in order); after it, rank 0 may
    save or export the result. ``exclude``: names left out and never gathered (the trainer's frozen tensors).
    """
    return {k: full_tensor(v).detach() for k, v in module.state_dict().items() if k not in exclude}


def gather_full_(module: nn.Module) -> nn.Module:
    """Replace every DTensor parameter and buffer of ``module`` by its full plain tensor, in place (a collective).

    Ends FSDP2 training of ``module``: every process calls it after the last step; then rank 0 exports, evaluates
    or saves the model exactly as in a single-process run. ``requires_grad`` is kept (the frozen state is known by
    name: ``Objective.frozen_state_names``). A no-op for modules that were never sharded.
    """
    for sub in module.modules():  # same order on every rank, so the all-gathers pair up
        for name, p in list(sub._parameters.items()):
            if isinstance(p, DTensor):
                sub._parameters[name] = nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if isinstance(b, DTensor):
                sub._buffers[name] = b.full_tensor().detach().clone()
    return module


def wrap_model(module: nn.Module, strategy: str, device: torch.device, precision: str = "fp32") -> nn.Module:
    """Wrap for data-parallel training; the result's output reports the global-batch loss (:func:`global_output`).

    ``ddp`` (and ``auto``): DistributedDataParallel over the trainable tensors (frozen ones are skipped by DDP;
    buffers such as the DINO center are kept in sync by the objective's own all-reduce, hence
    ``broadcast_buffers=False``). ``fsdp2``: :func:`shard_fsdp2` (bf16 ``precision``: bf16 parameters in compute,
    fp32 gradient reduction). One process: the module itself.
    """
    if strategy not in ("auto", "none", "ddp", "fsdp2"):
        raise ConfigError(f"train.strategy: got {strategy!r}, expected one of auto, none, ddp, fsdp2.")
    if not is_dist() or strategy == "none":
        return module
    if strategy in ("ddp", "auto"):
        ids = [device.index] if device.type == "cuda" else None
        return _ddp_class()(module, device_ids=ids, broadcast_buffers=False)
    return shard_fsdp2(module, device, precision)
