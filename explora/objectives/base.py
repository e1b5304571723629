"""The contract between a self-supervised (or supervised) objective and the training engine.

The engine (``explora.engine``) owns the loop, precision, distribution, checkpoints and logs; an objective owns what
is computed. Keeping the boundary this small is what lets DinoV2, MAE and supervised fine-tuning share one loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

BatchTransform = Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]


@dataclass
class ObjectiveOutput:
    """The loss to back-propagate and the detached terms to log (name -> scalar tensor)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class: subclasses implement ``batch_transform``, ``forward`` and ``export_backbone``."""

    name: str = "objective"

    def batch_transform(self) -> BatchTransform:
        """A picklable callable run in data-loader workers: ``(images (B,C,H,W), generator) -> batch dict``."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor], step: int,  # type: ignore[override]
                stage: int | None = None) -> ObjectiveOutput:
        """The step's loss; with ``stage=k`` only the part of stage ``k`` of :meth:`backward_stages`.

        With gradient accumulation (``train.accum_steps``) it runs once per micro-batch with the same ``step``
        (the optimiser step); the engine scales the loss, the objective computes it as for any batch.
        """
        raise NotImplementedError

    def backward_stages(self) -> int:
        """How many forward/backward passes one step takes (``explora.engine.step.forward_backward``).

        1: one loss, one backward. ``n > 1``: the loss is a sum of ``n`` parts whose graphs share only parameters;
        the engine runs ``forward(batch, step, stage=k)`` then its backward for ``k = 0..n-1`` (gradients add up),
        so only one part's activations are alive at a time. Stage 0 runs first; later stages may reuse what it
        computed (e.g. teacher targets). ``stage=None`` always returns the whole loss.
        """
        return 1

    def clip_groups(self) -> dict[str, list[torch.Tensor]]:
        """The trainable tensors whose gradient norm is clipped together (``optim.clip_grad_mode: per_module``).

        The groups must partition the tensors with ``requires_grad``. Default: one group with all of them (global
        clipping); DinoV2 clips its backbone and each head separately (``DinoV2Objective.clip_groups``).
        """
        return {"all": [p for p in self.parameters() if p.requires_grad]}

    def on_optimizer_step(self, step: int) -> None:
        """Called after every optimiser step (EMA teacher update, schedules that live in the objective); with
        gradient accumulation once per optimiser step, after its last micro-batch."""

    def export_backbone(self) -> nn.Module:
        """The backbone to export at the end of training (LoRA not yet merged)."""
        raise NotImplementedError
