"""Process helpers for ``torchrun`` runs that degrade to one process when no launcher is present.

The low layer every other layer may ask "which rank am I, how many are we" without importing the DDP/FSDP2 wrapping
(``explora.engine.parallel``). Every collective goes through guarded helpers that are no-ops without a process
group — DinoV2's own Sinkhorn-Knopp calls ``dist.all_reduce`` unguarded and crashes single-process runs.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``, ``mean`` or ``max``) across processes; identity in a single process."""
    if op not in ("sum", "mean", "max"):
        raise ValueError(f"all_reduce_: op {op!r}, expected sum, mean or max")
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= world_size()
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (a collective); ``[obj]`` in a single process."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def local_shards(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This process's local shard of each tensor (FSDP2 DTensor -> ``to_local()``, plain tensors unchanged).

    In-place ops on the result modify the sharded parameter, which is what a shard-to-shard EMA needs.
    """
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every process must call it); plain tensors unchanged."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def barrier() -> None:
    if is_dist():
        dist.barrier()


def init_distributed() -> torch.device:
    """Initialise from torchrun's environment (nccl on CUDA, gloo on CPU); return this process's device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_dist():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
