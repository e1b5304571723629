"""The frozen-weight cast cache is entered only where autocast computes in a lower precision."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from explora.vit.cast_cache import FrozenWeightCastCache


def test_under_autocast_is_the_mode_only_in_bf16():
    cache = FrozenWeightCastCache()
    cpu = torch.device("cpu")
    assert cache.under_autocast(cpu) is not cache  # fp32: no mode, no per-op Python hook
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cache.under_autocast(cpu) is cache


def test_cached_cast_gives_the_autocast_result():
    w = nn.Parameter(torch.randn(8, 4), requires_grad=False)
    x = torch.randn(3, 4)
    cache = FrozenWeightCastCache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.linear(x, w)
        with cache.under_autocast(torch.device("cpu")):
            cached, again = F.linear(x, w), F.linear(x, w)
    assert torch.equal(cached, plain) and torch.equal(again, plain) and len(cache._cache) == 1
