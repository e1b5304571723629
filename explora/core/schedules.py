"""Per-step schedules as pure functions of the step, so a resumed run sees exactly the same values.

DinoV2 precomputes numpy arrays indexed by iteration (``dinov2/utils/utils.py: CosineScheduler``); MAE computes a
half-cycle cosine per iteration (``util/lr_sched.py``). Both are "linear warm-up, then cosine from base to final";
one function covers them.
"""

from __future__ import annotations

import math


def warmup_cosine(
    step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0, start: float = 0.0
) -> float:
    """Linear warm-up from ``start`` to ``base`` over ``warmup_steps``, then cosine from ``base`` to ``final``."""
    if warmup_steps > 0 and step < warmup_steps:
        return start + (base - start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def linear_warmup_then_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear ramp from ``start`` to ``end`` over ``warmup_steps`` then constant (DinoV2 teacher temperature)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """Batch-size scaling of the learning rate: DinoV2 ``sqrt_wrt_1024``, MAE ``linear`` (blr * batch / 256)."""
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / reference_batch)
    if rule == "linear":
        return base_lr * global_batch / reference_batch
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}")
