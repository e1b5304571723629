"""A bf16 copy of each frozen weight under autocast, cast once instead of on every call."""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


class FrozenWeightCastCache(TorchFunctionMode):
    """Under autocast, give ``F.linear`` one cached low-precision copy of each *frozen* fp32 weight.

    Why: autocast caches casts only of leaf tensors that require grad, so a frozen weight (most of an ExPLoRA
    backbone) is re-cast on every call - three times per DinoV2 step (teacher, global, local crops). Frozen weights
    never change, so one cast is enough. The cast is the same ``Tensor.to`` autocast would do, so results are
    bit-identical; a weight modified in place (``_version`` changes) is re-cast. Costs a bf16 copy of the frozen
    weights (half their fp32 size). Outside autocast, or for trainable weights, it does nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[int, tuple[weakref.ref, int, torch.dtype, torch.Tensor]] = {}

    def under_autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """This mode where autocast computes in a lower precision on ``device``; otherwise a no-op context, so an
        fp32 step pays no Python call per torch function for a cache it would not use."""
        dev = device.type
        if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) != torch.float32:
            return self
        return contextlib.nullcontext()

    def _low(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        hit = self._cache.get(id(w))
        if hit is not None and hit[0]() is w and hit[1] == w._version and hit[2] == dtype:
            return hit[3]
        low = w.detach().to(dtype)
        self._cache[id(w)] = (weakref.ref(w), w._version, dtype, low)
        return low

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # a compiled graph casts (and fuses) on its own; the cache is eager-only
            return func(*args, **kwargs)
        if func is F.linear and len(args) >= 2:
            w = args[1]
            dev = w.device.type
            if (isinstance(w, nn.Parameter) and not w.requires_grad and w.dtype == torch.float32
                    and torch.is_autocast_enabled(dev)):
                dtype = torch.get_autocast_dtype(dev)
                if dtype != torch.float32:
                    args = (args[0], self._low(w, dtype), *args[2:])
        return func(*args, **kwargs)


__all__ = ["FrozenWeightCastCache"]
