"""torch.distributed set-up for ``torchrun``, degrading to one process when no launcher is present.

Every collective in explora goes through these helpers, which are no-ops without a process group — DinoV2's own
Sinkhorn-Knopp calls ``dist.all_reduce`` unguarded and crashes single-process runs.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or mean) across processes; identity in a single process."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= world_size()
    return tensor


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


def wrap_model(module: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """Wrap for data-parallel training.

    ``ddp``: DistributedDataParallel over the trainable tensors (frozen ones are skipped by DDP, buffers such as the
    DINO center are kept in sync by the objective's own all-reduce, hence ``broadcast_buffers=False``).
    ``fsdp2``: ``fully_shard`` on every ViT block of the trainable backbone, then on the root (FSDP2 shards per
    tensor, so frozen and trainable tensors may share one unit).
    """
    if not is_dist() or strategy == "none":
        return module
    if strategy in ("ddp", "auto"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(module, device_ids=ids, broadcast_buffers=False)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for sub in module.modules():
            blocks = getattr(sub, "blocks", None)
            if isinstance(blocks, nn.Sequential | nn.ModuleList):
                for block in blocks:
                    fully_shard(block)
        fully_shard(module)
        return module
    raise ValueError(f"unknown strategy {strategy!r}")
