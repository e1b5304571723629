"""The divergence guard counts skipped steps across a run and stops at too many in a row."""

from __future__ import annotations

import pytest
import torch
from log_capture import explora_log

from explora.core.errors import DivergenceError
from explora.engine.guard import DivergenceGuard


def test_skips_are_counted_and_a_good_step_resets_the_run():
    guard = DivergenceGuard(max_in_a_row=2, skipped=5)  # 5 skipped before a resume
    with explora_log() as messages:
        guard.skip(3, {"loss": torch.tensor(float("nan"))})
    assert "step 3: non-finite loss (loss=nan); update skipped (1 in a row)." in messages
    guard.ok()
    guard.skip(4, {}, "gradients")
    assert (guard.skipped, guard.in_a_row) == (7, 1)
    with pytest.raises(DivergenceError, match="2 steps in a row up to step 5 had non-finite gradients"):
        guard.skip(5, {}, "gradients")
