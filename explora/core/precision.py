"""Which precision to compute in: bf16 autocast only where the hardware makes it fast.

On GPUs with bf16 support and on CPUs with AMX or AVX512-BF16, bf16 autocast speeds training up severalfold. On
CPUs without them (e.g. AVX2-only) PyTorch emulates bf16 matrix products and they run tens of times slower than fp32
(measured: 0.2 vs 8.8 GFLOP/s on a 2-core AVX2 EPYC), so ``precision: auto`` picks fp32 there.
"""

from __future__ import annotations

import contextlib
import functools

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AMX or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def hardware_name(device: torch.device) -> str:
    """What a run computed on, for run summaries and model cards: the GPU's name, or the CPU's model name from
    ``/proc/cpuinfo`` (``platform.processor()`` elsewhere) with the number of torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    if not name:
        import platform

        name = platform.processor() or platform.machine() or "unknown CPU"
    return f"{name} ({torch.get_num_threads()} threads)"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where it is fast on ``device``, else ``fp32``; other values pass through."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved or ``auto`` precision."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else None
