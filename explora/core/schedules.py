"""Per-step schedules as pure functions of the step, so a resumed run sees exactly the same values.

DinoV2 precomputes numpy arrays indexed by iteration (``dinov2/utils/utils.py: CosineScheduler``); MAE computes a
half-cycle cosine per iteration (``util/lr_sched.py``). Both are "linear warm-up, then cosine from base to final";
one function covers them. The DinoV2 objective's teacher temperature and momentum are the two others here.
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


def linspace_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """``np.linspace(start, end, warmup_steps)[step]`` during the warm-up, then ``end`` (``warmup_steps`` 0: ``end``).

    DinoV2's teacher temperature (``dinov2/train/train.py``: ``CosineScheduler`` with ``base_value = final_value``
    and a warm-up): the last warm-up step already has ``end``; one warm-up step is ``start``.
    """
    if step >= warmup_steps:
        return end
    if warmup_steps == 1:
        return start
    return start + max(step, 0) * (end - start) / (warmup_steps - 1)


def cosine(step: int, total_steps: int, base: float, final: float) -> float:
    """Cosine from ``base`` (step 0) to ``final`` (step ``total_steps`` and after), no warm-up (DinoV2 teacher
    momentum: ``CosineScheduler`` over ``optim.epochs * OFFICIAL_EPOCH_LENGTH`` iterations)."""
    frac = min(max(step, 0) / max(total_steps, 1), 1.0)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * frac))


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """Batch-size scaling of the learning rate: DinoV2 ``sqrt_wrt_1024``, MAE ``linear`` (blr * batch / 256)."""
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / reference_batch)
    if rule == "linear":
        return base_lr * global_batch / reference_batch
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}")
