"""Run lengths: gradient accumulation, lengths given in epochs, and the default warm-up / last-layer freeze.

Every length the loop uses is in *optimiser steps*. A config may state them in epochs (the MAE and fine-tuning
recipes do: MAE ``main_pretrain.py --epochs 400 --warmup_epochs``, ExPLoRA fine-tuning 120 epochs, warm-up 5);
they are converted once the dataset is built, with one epoch = ``len(dataset) / effective batch`` optimiser steps
(or ``train.steps_per_epoch`` when set, DinoV2's ``train.OFFICIAL_EPOCH_LENGTH``). The effective batch is
``batch_size x world_size x accum_steps``, as MAE's ``eff_batch_size``.

When a config gives neither a warm-up nor a last-layer freeze, they follow DinoV2's proportions
(``ssl_default_config.yaml``: ``optim.warmup_epochs`` 10 and ``optim.freeze_last_layer_epochs`` 1 of
``optim.epochs`` 100): 10 % and 1 % of the run. An explicit 0 disables either.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

from explora.core.errors import ConfigError

DEFAULT_STEPS = 1000  # train.steps when neither train.steps nor train.epochs is given
WARMUP_DIVISOR = 10  # DinoV2: optim.warmup_epochs 10 of optim.epochs 100
FREEZE_LAST_LAYER_DIVISOR = 100  # DinoV2: optim.freeze_last_layer_epochs 1 of optim.epochs 100

C = TypeVar("C")


def accumulation_steps(batch_size: int, world_size: int, accum_steps: int = 1,
                       effective_batch: int | None = None) -> int:
    """Micro-batches per optimiser step: ``accum_steps``, or ``effective_batch / (batch_size x world_size)``.

    ``effective_batch`` must be an exact multiple of ``batch_size x world_size``; ``accum_steps`` other than its
    default 1 must agree with it.
    """
    if effective_batch is None:
        return accum_steps
    per_micro = batch_size * world_size
    k, rest = divmod(effective_batch, per_micro)
    if rest or k < 1:
        raise ConfigError(
            f"train.effective_batch {effective_batch} is not a multiple of train.batch_size {batch_size} x "
            f"{world_size} processes = {per_micro}; choose an effective batch that is, or change train.batch_size."
        )
    if accum_steps != 1 and accum_steps != k:
        raise ConfigError(
            f"train.accum_steps {accum_steps} disagrees with train.effective_batch {effective_batch} = "
            f"train.batch_size {batch_size} x {world_size} processes x {k}; set only one of the two."
        )
    return k


def epoch_length(dataset_len: int, effective_batch: int, steps_per_epoch: int | None = None) -> float:
    """Optimiser steps in one epoch: ``train.steps_per_epoch`` when set, else ``dataset_len / effective_batch``."""
    if steps_per_epoch is not None:
        return float(steps_per_epoch)
    return dataset_len / effective_batch


def epochs_to_steps(epochs: float, steps_per_epoch: float) -> int:
    """``ceil(epochs x steps_per_epoch)``; a product a rounding error above an integer stays that integer."""
    return math.ceil(epochs * steps_per_epoch - 1e-9)


@dataclasses.dataclass(frozen=True)
class RunLength:
    """Every length of a run, resolved to optimiser steps."""

    accum_steps: int
    effective_batch: int
    epoch_steps: float  # optimiser steps per epoch
    steps: int
    warmup_steps: int
    freeze_last_layer_steps: int


def _steps_or_epochs(steps: int | None, epochs: float | None, epoch_steps: float, default: int) -> int:
    """A length given in steps, else in epochs, else ``default`` (the configs' ``validate`` rejects both)."""
    if steps is not None:
        return steps
    if epochs is not None:
        return epochs_to_steps(epochs, epoch_steps)
    return default


def run_length(train: Any, optim: Any, dataset_len: int, world_size: int) -> RunLength:
    """Resolve a (validated) ``TrainConfig`` and ``OptimConfig`` for a dataset of ``dataset_len`` samples."""
    accum = accumulation_steps(train.batch_size, world_size, train.accum_steps, train.effective_batch)
    effective = train.batch_size * world_size * accum
    epoch = epoch_length(dataset_len, effective, train.steps_per_epoch)
    steps = _steps_or_epochs(train.steps, train.epochs, epoch, DEFAULT_STEPS)
    if steps < 1:
        raise ConfigError(
            f"train.epochs {train.epochs} of {dataset_len} samples at an effective batch of {effective} is "
            f"{steps} optimiser steps; train for at least one."
        )
    warmup = _steps_or_epochs(optim.warmup_steps, optim.warmup_epochs, epoch, steps // WARMUP_DIVISOR)
    freeze = _steps_or_epochs(optim.freeze_last_layer_steps, optim.freeze_last_layer_epochs, epoch,
                              steps // FREEZE_LAST_LAYER_DIVISOR)
    return RunLength(accum, effective, epoch, steps, warmup, freeze)


def resolve_lengths(optim: C, train: Any, dataset_len: int, world_size: int) -> tuple[C, Any]:
    """Copies of ``(optim, train)`` with every length in optimiser steps (epochs and defaults filled in).

    Idempotent: resolving a resolved pair changes nothing. Raises ConfigError for conflicting settings.
    """
    train.validate()
    optim.validate()  # type: ignore[attr-defined]
    n = run_length(train, optim, dataset_len, world_size)
    train = dataclasses.replace(train, steps=n.steps, epochs=None, accum_steps=n.accum_steps)
    optim = dataclasses.replace(optim, warmup_steps=n.warmup_steps, warmup_epochs=None,  # type: ignore[type-var]
                                freeze_last_layer_steps=n.freeze_last_layer_steps, freeze_last_layer_epochs=None)
    return optim, train
