"""What a training checkpoint holds, and how it is captured from and restored into a run.

Everything an optimiser step changes: the objective's tensors except the frozen pre-trained ones
(:meth:`~explora.objectives.base.Objective.frozen_state_names`, rebuilt from the source weights on resume), the
optimiser state, every rank's torch RNG, the step and the counts of skipped steps and samples. Under FSDP2 capture is
a collective (every rank gathers; rank 0 saves): tensors are stored full, the optimiser keyed by parameter name (torch
DCP layout), so the file is the same whatever the number of processes that wrote it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explora.core import distributed as D
from explora.core.errors import CheckpointError
from explora.engine.checkpoint import CheckpointManager
from explora.engine.parallel import full_state_dict

_log = logging.getLogger(__name__)

_RESUME_HINT = "Resume with the same config it was written with (saved as config.yaml in the run directory)."


def training_state(objective: nn.Module, frozen: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """The objective's state dict without the frozen pre-trained tensors, as full plain tensors.

    ``frozen``: their names (default: ``objective.frozen_state_names()``). Under FSDP2 every rank must call it (each
    sharded tensor is all-gathered); frozen tensors are never gathered.
    """
    names = objective.frozen_state_names() if frozen is None else frozen  # type: ignore[operator]
    return full_state_dict(objective, exclude=names)


def capture_state(objective: nn.Module, optimizer: torch.optim.Optimizer, step: int, skipped: int,
                  frozen: Collection[str], sharded: bool) -> dict[str, Any]:
    """Everything a step changes, as saved in ``ckpt-<step>.pt`` (a collective under FSDP2)."""
    rng = D.all_gather_objects(torch.get_rng_state())  # every rank's CPU RNG (dropout/drop-path, per-rank seed)
    state: dict[str, Any] = {
        "step": step,
        "skipped_steps": skipped,
        "objective": training_state(objective, frozen),
        "torch_rng": rng[0],
        "torch_rng_per_rank": rng,
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        state["optimizer"] = get_optimizer_state_dict(objective, optimizer, options=opts)
        state["optimizer_layout"] = "full_by_name"
    else:
        state["optimizer"] = optimizer.state_dict()
    return state


@dataclass
class Resumed:
    """A checkpoint loaded for resuming, and the file it came from (named in every error about it)."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def skipped_steps(self) -> int:
        return int(self.state.get("skipped_steps", 0))

    @property
    def skipped_samples(self) -> int:
        return int(self.state.get("skipped_samples", 0))


def restore_objective(objective: nn.Module, resumed: Resumed, frozen: Collection[str]) -> None:
    """Load a checkpoint's tensors into the unwrapped objective (full tensors; frozen ones stay as built)."""
    missing, unexpected = objective.load_state_dict(resumed.state["objective"], strict=False)
    really_missing = [k for k in missing if k not in frozen]
    if really_missing or unexpected:
        raise CheckpointError(
            f"{resumed.path} does not match this run's model: missing {really_missing[:5]}, unexpected "
            f"{list(unexpected)[:5]}. {_RESUME_HINT}"
        )


def _optimizer_mismatch(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> str | None:
    """Why the saved optimiser state cannot belong to ``optimizer``'s parameter groups, or None when it can."""
    groups, saved_groups = optimizer.param_groups, saved.get("param_groups", [])
    if len(groups) != len(saved_groups):
        return f"it has {len(saved_groups)} parameter groups, this run {len(groups)}"
    for i, (group, old) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(group["params"]) != len(old["params"]):
            return f"parameter group {i} holds {len(old['params'])} tensors there, {len(group['params'])} here"
        for p, idx in zip(group["params"], old["params"], strict=True):
            moment = saved.get("state", {}).get(idx, {}).get("exp_avg")
            if moment is not None and tuple(moment.shape) != tuple(p.shape):
                return f"a tensor of group {i} has shape {tuple(moment.shape)} there, {tuple(p.shape)} here"
    return None


def restore_optimizer(objective: nn.Module, optimizer: torch.optim.Optimizer, resumed: Resumed,
                      sharded: bool) -> None:
    """Optimiser state into the optimiser built after wrapping; under FSDP2 each rank keeps its shard.

    A checkpoint whose optimiser state belongs to other parameter groups (another config, or an older explora:
    e.g. one written before the DINO head's weight-norm gain became trainable) is a CheckpointError naming the file.
    """
    state = resumed.state
    by_name = state.get("optimizer_layout") == "full_by_name"
    if by_name != sharded:
        raise CheckpointError(
            f"{resumed.path}: its optimiser state was written {'with' if by_name else 'without'} "
            f"train.strategy=fsdp2 and this run uses {'fsdp2' if sharded else 'another strategy'}; resume with the "
            "strategy it was written with (saved as config.yaml in the run directory)."
        )
    problem = None if sharded else _optimizer_mismatch(optimizer, state["optimizer"])
    try:
        if problem is None and sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(objective, optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        elif problem is None:
            optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError, RuntimeError) as err:
        problem = str(err)
    if problem is not None:
        raise CheckpointError(
            f"{resumed.path}: its optimiser state does not match this run's trainable tensors ({problem}). It was "
            "written with other explora/optim settings or by an older explora version (e.g. before the DINO head's "
            f"weight-norm gain became trainable). {_RESUME_HINT} To continue from its weights anyway, start a new "
            "run from them; to start over, move the checkpoints away."
        )


def restore_rng(resumed: Resumed) -> None:
    state = resumed.state
    per_rank = state.get("torch_rng_per_rank")
    if per_rank and len(per_rank) == D.world_size():
        torch.set_rng_state(per_rank[D.rank()])
    else:  # older checkpoints, or a different world size: rank 0's state
        torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])


class RunCheckpoints:
    """The run's checkpoint directory: resume from the newest intact file, save every ``every`` steps and at the end.

    ``frozen``: the objective's frozen state names, taken before wrapping (FSDP2 replaces every parameter and unties
    the teacher's shared frozen copies; names survive that). ``sharded``: FSDP2, so saving is a collective.
    """

    def __init__(self, directory: Path, *, keep_last: int, every: int, total_steps: int, frozen: Collection[str],
                 sharded: bool) -> None:
        self.manager = CheckpointManager(directory, keep_last=keep_last)
        self.every, self.total_steps = every, total_steps
        self.frozen, self.sharded = frozen, sharded

    def resume(self, objective: nn.Module) -> Resumed | None:
        """Load the newest intact checkpoint into the (unwrapped) objective; None when the directory has none."""
        found = self.manager.latest()
        if found is None and any(self.manager.directory.glob("ckpt-*.pt")):
            # Starting over would prune and overwrite them: refuse, and say why each one was unusable (warnings).
            raise CheckpointError(
                f"--resume: none of the checkpoints in {self.manager.directory} is intact and loadable (see the "
                "warnings above). Nothing was changed; move them away to start from step 0."
            )
        if found is None:
            if D.is_main():
                _log.info("no intact checkpoint in %s; starting from step 0.", self.manager.directory)
            return None
        resumed = Resumed(*found)
        # Full tensors into the still unsharded model: wrapping shards (or replicates) what was loaded.
        restore_objective(objective, resumed, self.frozen)
        if D.is_main():
            _log.info("resumed from %s (step %d).", resumed.path, resumed.step)
        return resumed

    def restore_optimizer(self, objective: nn.Module, optimizer: torch.optim.Optimizer, resumed: Resumed) -> None:
        """The optimiser state and the RNG of ``resumed`` (after wrapping: the optimiser sees the wrapped tensors)."""
        restore_optimizer(objective, optimizer, resumed, self.sharded)
        restore_rng(resumed)

    def due(self, done: int) -> bool:
        return done % self.every == 0 or done == self.total_steps

    def save(self, objective: nn.Module, optimizer: torch.optim.Optimizer, done: int, skipped_steps: int,
             skipped_samples: int, on_checkpoint: Callable[[Any, int], None] | None = None) -> None:
        """Capture (every rank under FSDP2) and write ``ckpt-<done>.pt`` on rank 0, then wait for every rank."""
        state = capture_state(objective, optimizer, done, skipped_steps, self.frozen, self.sharded)
        if D.is_main():
            state["skipped_samples"] = skipped_samples
            self.manager.save(state, done)
            if on_checkpoint is not None:
                on_checkpoint(objective, done)
        del state
        D.barrier()
