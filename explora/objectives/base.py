"""The contract between a self-supervised (or supervised) objective and the training engine.

The engine (``explora.engine``) owns the loop, precision, distribution, checkpoints and logs; an objective owns what
is computed. Keeping the boundary this small is what lets DinoV2, MAE and supervised fine-tuning share one loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from explora.models.params import ParamReport, parameter_report

BatchTransform = Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]


@dataclass
class ObjectiveOutput:
    """The loss to back-propagate and the detached terms to log (name -> scalar tensor)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


def parameter_names(module: nn.Module, params: Iterable[nn.Parameter]) -> frozenset[str]:
    """The state-dict names under which ``module`` holds ``params`` (every name of a tensor registered twice, as the
    DinoV2 teacher's shared frozen copies are); empty tensors are left out."""
    ids = {id(p) for p in params}
    return frozenset(n for n, p in module.named_parameters(remove_duplicate=False) if id(p) in ids and p.numel())


class Objective(nn.Module):
    """Base class: subclasses implement ``batch_transform``, ``forward``, ``export_backbone`` and
    ``parameter_report``, and keep their settings in ``self.config`` (a dataclass)."""

    name: str = "objective"
    config: Any = None
    _frozen_names: frozenset[str] | None = None  # set by record_frozen

    def record_frozen(self, pretrained: Iterable[nn.Parameter]) -> None:
        """Declare ``pretrained`` (the backbone's tensors frozen by ``apply_explora``) as the frozen state.

        Call it at the end of ``__init__``, with the tensors taken from the backbone before the objective froze
        anything of its own (an EMA teacher's copies, a fixed head gain): those change or are random, so they stay
        in checkpoints. Recorded as names, which survive ``.to()``, FSDP2 sharding and ``model.compile``.
        """
        self._frozen_names = parameter_names(self, pretrained)

    def frozen_state_names(self) -> frozenset[str]:
        """State-dict names of the pre-trained tensors training never changes: left out of checkpoints, rebuilt
        from the source weights on resume (ViT-L: 18.7M instead of 300M+ parameters per file).

        Those given to :meth:`record_frozen`; an objective that records none (supervised fine-tuning, whose every
        frozen tensor is pre-trained) has every parameter with ``requires_grad=False`` now.
        """
        if self._frozen_names is not None:
            return self._frozen_names
        return parameter_names(self, [p for p in self.parameters() if not p.requires_grad])

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

    def parameter_report(self) -> ParamReport:
        """Trainable parameters per ExPLoRA group: the backbone's in the paper's count, every other trained module
        (heads, decoder) as ``extra``. Default: the exported backbone, no extras."""
        return parameter_report(self.export_backbone())
