"""Forward and backward passes of one training step, in the objective's stages and micro-batches.

An objective whose loss is a sum of parts with separate graphs (DinoV2: local crops, global crops) declares
``backward_stages() > 1``; back-propagating each part before computing the next keeps only one part's activations
alive, which lowers peak memory by the other parts' share at the same FLOPs. Gradient accumulation does the same
one level up: one optimiser step over ``n`` micro-batches, each through the objective's forward unchanged, its loss
scaled by ``1/n`` (MAE ``engine_pretrain.py``: ``loss /= accum_iter``), so the gradient is the mean over the
effective batch wherever the loss is a mean over images. Gradients accumulate across stages and micro-batches;
under DDP/FSDP2 only the last stage of the last micro-batch synchronises them
(:func:`explora.engine.parallel.gradient_sync`), so the communication per optimiser step is unchanged. The
trainer, the demo and the benchmarks take their steps through here; :func:`optimizer_step` adds the rest of one
optimiser step (the non-finite checks, clipping, the update and the objective's after-step hook).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from explora.core.precision import autocast, resolve_precision
from explora.engine import parallel as D
from explora.engine.optim import clip_gradients
from explora.vit.attention import CpuBf16Attention


@dataclass
class StepOutput:
    """The summed loss value (detached), the terms summed over stages, and whether every stage's loss was finite.

    When ``finite`` is False the stages after the non-finite one did not run and gradients may be partial: the
    caller drops the update (``optimizer.zero_grad``).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    finite: bool = True


def forward_backward(model: nn.Module, objective: nn.Module, batch: dict[str, torch.Tensor], step: int,
                     precision: str, device: torch.device, *, loss_scale: float = 1.0,
                     sync: bool = True) -> StepOutput:
    """Run ``model`` (``objective``, possibly DDP/FSDP2-wrapped) on ``batch`` and back-propagate, stage by stage.

    ``loss_scale`` multiplies the loss before its backward (not the returned values); ``sync=False`` keeps every
    stage's gradients local (a micro-batch before the last of an accumulated step).
    """
    stages = objective.backward_stages()  # type: ignore[operator]
    loss, terms = None, {}
    # bf16 on CPU: attention with a matmul backward (explora.vit.attention), several times faster than the kernel's
    attention = CpuBf16Attention() if device.type == "cpu" and resolve_precision(precision, device) == "bf16" else None
    for k in range(stages):
        with D.gradient_sync(model, enabled=sync and k == stages - 1):
            with autocast(precision, device), attention or contextlib.nullcontext():
                out = model(batch, step) if stages == 1 else model(batch, step, stage=k)
            value = out.loss.detach().float()
            loss = value if loss is None else loss + value
            for name, v in out.terms.items():  # a term split over stages comes back in parts that add up
                terms[name] = v if name not in terms else terms[name] + v
            if not torch.isfinite(value).all():
                return StepOutput(loss, terms, finite=False)
            (out.loss if loss_scale == 1.0 else out.loss * loss_scale).backward()
        del out
    return StepOutput(loss, terms)


def accumulate_step(model: nn.Module, objective: nn.Module, micro_batches: Iterable[dict[str, torch.Tensor]],
                    n_micro: int, step: int, precision: str, device: torch.device) -> StepOutput:
    """Forward and backward of the ``n_micro`` micro-batches of one optimiser step; the mean loss and terms.

    Each loss is scaled by ``1/n_micro``; only the last micro-batch synchronises gradients under DDP/FSDP2. At the
    first non-finite micro-batch it stops and returns that micro-batch's output (``finite=False``): the caller drops
    the whole step, and consumes the micro-batches not taken from ``micro_batches``.
    """
    outputs: list[StepOutput] = []
    batches = iter(micro_batches)
    for i in range(n_micro):
        batch = next(batches, None)
        if batch is None:
            raise ValueError(f"step {step}: expected {n_micro} micro-batches, got {i}")
        out = forward_backward(model, objective, batch, step, precision, device, loss_scale=1.0 / n_micro,
                               sync=i == n_micro - 1)
        if not out.finite:
            return out
        outputs.append(out)
    return mean_output(outputs)


def mean_output(outputs: list[StepOutput]) -> StepOutput:
    """The mean loss and terms of micro-batch outputs (an accumulated step logs the effective batch's mean)."""
    if len(outputs) == 1:
        return outputs[0]
    n = len(outputs)
    loss = sum(o.loss for o in outputs) / n
    terms = {k: sum(o.terms[k] for o in outputs if k in o.terms) / n for k in outputs[0].terms}
    return StepOutput(loss, terms, finite=all(o.finite for o in outputs))


class StepBatches:
    """The micro-batches of one optimiser step on ``device``: ``first``, then the next ``accum - 1`` drawn from
    ``batches`` only when the previous one has run (one micro-batch on the device at a time). ``images`` counts
    the images handed out."""

    def __init__(self, first: dict[str, torch.Tensor], batches: Iterator, step: int, accum: int,
                 device: torch.device) -> None:
        self.first, self.batches, self.step, self.accum, self.device = first, batches, step, accum, device
        self.images = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batch = self.first
        for micro in range(self.accum):
            if micro:
                got_step, got_micro, batch = next(self.batches)
                assert (got_step, got_micro) == (self.step, micro), (got_step, got_micro, self.step, micro)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            self.images += batch["labels"].shape[0] if "labels" in batch else next(iter(batch.values())).shape[0]
            yield batch


@dataclass
class OptimizerStep:
    """One optimiser step's outcome: the (mean) output, the gradient norm before clipping (None when the loss was
    not finite), and what was non-finite when the update was dropped (``"loss"``, ``"gradients"``; None: done)."""

    out: StepOutput
    grad_norm: torch.Tensor | None = None
    nonfinite: str | None = None


def optimizer_step(model: nn.Module, objective: nn.Module, optimizer: torch.optim.Optimizer,
                   clip: list[list[torch.Tensor]], clip_grad: float, batches: StepBatches, precision: str,
                   device: torch.device) -> OptimizerStep:
    """Forward/backward over ``batches``, then clip (per group of ``clip``) and update, unless the loss or the
    gradient norm is not finite: then the gradients are dropped and nothing changes (the caller counts the skip)."""
    out = accumulate_step(model, objective, batches, batches.accum, batches.step, precision, device)
    if not out.finite:
        optimizer.zero_grad(set_to_none=True)
        return OptimizerStep(out, nonfinite="loss")
    grad_norm = clip_gradients(clip, clip_grad)  # the total norm before clipping
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return OptimizerStep(out, grad_norm, nonfinite="gradients")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    objective.on_optimizer_step(batches.step)  # type: ignore[operator]
    return OptimizerStep(out, grad_norm)
