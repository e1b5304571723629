"""Forward and backward passes of one training step, in the objective's stages.

An objective whose loss is a sum of parts with separate graphs (DinoV2: local crops, global crops) declares
``backward_stages() > 1``; back-propagating each part before computing the next keeps only one part's activations
alive, which lowers peak memory by the other parts' share at the same FLOPs. Gradients accumulate across stages;
under DDP/FSDP2 only the last stage synchronises them (:func:`explora.engine.distributed.gradient_sync`), so the
communication per step is unchanged. The trainer, the demo and the benchmarks take their steps through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from explora.engine import distributed as D
from explora.engine.precision import autocast


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
                     precision: str, device: torch.device) -> StepOutput:
    """Run ``model`` (``objective``, possibly DDP/FSDP2-wrapped) on ``batch`` and back-propagate, stage by stage."""
    stages = objective.backward_stages() if hasattr(objective, "backward_stages") else 1
    loss, terms = None, {}
    for k in range(stages):
        with D.gradient_sync(model, enabled=k == stages - 1):
            with autocast(precision, device):
                out = model(batch, step) if stages == 1 else model(batch, step, stage=k)
            value = out.loss.detach().float()
            loss = value if loss is None else loss + value
            for name, v in out.terms.items():  # a term split over stages comes back in parts that add up
                terms[name] = v if name not in terms else terms[name] + v
            if not torch.isfinite(value).all():
                return StepOutput(loss, terms, finite=False)
            out.loss.backward()
        del out
    return StepOutput(loss, terms)
