"""Checks the fine-tuning tests share: which parameters a classifier's loss reaches."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def assert_gradients_reach_exactly(model: nn.Module, loss_of: Callable[[], torch.Tensor], expected: set[str]) -> None:
    """Back-propagate ``loss_of()`` and assert the parameters with a non-zero gradient are exactly ``expected``,
    which must also be exactly the ``requires_grad`` set.

    LoRA B starts at zero (so A would get no gradient); it is made non-zero first so both factors are exercised.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    loss_of().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert trainable == expected
