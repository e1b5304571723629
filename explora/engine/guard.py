"""The divergence guard: a step with a non-finite loss or gradient is skipped; too many in a row stop the run.

One non-finite step (a bad batch, an fp16/bf16 overflow) should not end a long run, nor poison the weights; a
steady stream of them means the run diverged, and the last good checkpoint is the place to continue from. Under
DDP/FSDP2 the loss value is the global mean (:func:`explora.engine.parallel.global_output`), so every rank skips
the same steps.
"""

from __future__ import annotations

import logging

import torch

from explora.core.errors import DivergenceError

_log = logging.getLogger(__name__)


class DivergenceGuard:
    """Counts skipped steps (``skipped``, all of the run's, including those before a resume) and the current run of
    consecutive ones; :meth:`skip` raises DivergenceError at ``max_in_a_row``."""

    def __init__(self, max_in_a_row: int, skipped: int = 0) -> None:
        self.max_in_a_row, self.skipped, self.in_a_row = max_in_a_row, skipped, 0

    def ok(self) -> None:
        """A step was applied: the run of non-finite steps is over."""
        self.in_a_row = 0

    def skip(self, step: int, terms: dict[str, torch.Tensor], what: str = "loss") -> None:
        """Record the dropped update of ``step`` (its ``what`` was not finite); stop after too many in a row."""
        self.in_a_row, self.skipped = self.in_a_row + 1, self.skipped + 1
        desc = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
        _log.warning("step %d: non-finite %s (%s); update skipped (%d in a row).", step, what, desc, self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise DivergenceError(
                f"training diverged: {self.in_a_row} steps in a row up to step {step} had non-finite {what} (terms: "
                f"{desc}). The last good checkpoint is kept; lower optim.base_lr or raise optim.warmup_steps, then "
                "--resume."
            )
