"""Achievable matmul throughput of this machine (GFLOP/s), the roofline other benchmarks compare against.

Times ``torch.matmul`` of two random (size, size) matrices: warm-up, then the median over repeats of one matmul
(2 * size**3 FLOPs), synchronising the device around each timed call. Other scripts in benchmarks/ import
``measure_matmul_peak`` (``from matmul_peak import measure_matmul_peak`` when run as ``python benchmarks/x.py``) and
``measure_linear_shapes_peak``, the same roofline at the matmul shapes of a step's linear layers (at ViT-S widths
and ~1,000 rows they run well below the large-square figure), and ``measure_copy_bandwidth``, the memory roofline.

Run: ``python benchmarks/matmul_peak.py [--device cuda] [--size N] [--repeats R]`` -> JSON on stdout.
Defaults keep a CPU run under ~20 s: size 1024 on CPU (8192 on CUDA), 10 repeats, and each dtype stops early
once it has spent ``budget_s`` seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32,
    size: int = 2048,
    repeats: int = 10,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    budget_s: float | None = None,
) -> float:
    """Median GFLOP/s of ``size`` x ``size`` matmuls in ``dtype`` on ``device`` (fp32 on CUDA allows TF32 only if the
    caller enabled it; this function leaves ``torch.backends`` settings alone).

    ``budget_s`` caps the whole measurement (warm-up included): if the warm-up alone used it up, the last warm-up
    call is the one sample (slow dtypes such as bf16 on CPUs without native support would otherwise take minutes);
    otherwise timed repeats run while within budget, at least one.
    """
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(size, size, device=dev, dtype=torch.float32, generator=g).to(dtype)
    b = torch.randn(size, size, device=dev, dtype=torch.float32, generator=g).to(dtype)
    start = time.perf_counter()
    t_warm = 0.0
    for _ in range(warmup):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(dev)
        t_warm = time.perf_counter() - t0
    if warmup and budget_s is not None and time.perf_counter() - start > budget_s:
        return 2.0 * size**3 / t_warm / 1e9
    times: list[float] = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(dev)
        times.append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return 2.0 * size**3 / statistics.median(times) / 1e9


def measure_linear_shapes_peak(
    shapes: list[list[int]],
    dtype: torch.dtype = torch.float32,
    repeats: int = 10,
    device: str | torch.device = "cpu",
    budget_s: float = 6.0,
) -> dict:
    """GFLOP/s of the matmuls a step's ``nn.Linear`` layers actually run: for each ``(rows, in, out, count)`` (the
    shapes :func:`pretrain_step.linear_shapes` records), the forward ``F.linear`` of a (rows, in) input with an
    (out, in) weight and the backward's input-gradient matmul (rows, out) @ (out, in), each timed on its own
    (median over ``repeats``); the result is their FLOP-weighted throughput, ``sum(count * flops) / sum(count *
    time)``, i.e. the best the step's linear layers could do at these shapes and this thread count. Weight
    gradients (only the trainable layers compute them) and attention are not in it."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    per_shape, total_flops, total_time = [], 0.0, 0.0
    budget = budget_s / max(1, len(shapes))
    for rows, n_in, n_out, count in shapes:
        x = torch.randn(rows, n_in, device=dev, generator=g).to(dtype)
        w = torch.randn(n_out, n_in, device=dev, generator=g).to(dtype)
        gy = torch.randn(rows, n_out, device=dev, generator=g).to(dtype)
        flops = 2.0 * rows * n_in * n_out
        t_shape = 0.0
        for fn in (functools.partial(torch.nn.functional.linear, x, w), functools.partial(torch.matmul, gy, w)):
            fn()
            _sync(dev)
            times, start = [], time.perf_counter()
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                fn()
                _sync(dev)
                times.append(time.perf_counter() - t0)
                if time.perf_counter() - start > budget / 2:
                    break
            t_shape += statistics.median(times)
        per_shape.append({"rows": rows, "in": n_in, "out": n_out, "count": count,
                          "gflops": round(2 * flops / t_shape / 1e9, 1)})
        total_flops += count * 2 * flops
        total_time += count * t_shape
    return {"gflops": round(total_flops / total_time / 1e9, 2) if total_time else None, "shapes": per_shape,
            "threads": torch.get_num_threads() if dev.type == "cpu" else None}


def measure_copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Median GB/s (bytes read + written) of copying a ``megabytes`` fp32 CPU tensor into another, at the current
    thread count: the memory roofline. Element-wise work (casts, norms, activations, residual adds) runs at about
    this speed once its tensors outgrow the caches; the ratio matmul peak / bandwidth (FLOP per byte) says how much
    arithmetic a byte must carry for a step to be compute-bound."""
    a = torch.ones(megabytes * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * 4 / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=None, help="matrix side (default 1024 on CPU, 8192 on CUDA)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--budget-s", type=float, default=6.0, help="max seconds per dtype (warm-up included)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    size = args.size or (8192 if dev.type == "cuda" else 1024)
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "size": size,
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if dev.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "machine": machine(),
        "gflops": {},
    }
    for name in args.dtypes:
        result["gflops"][name] = round(
            measure_matmul_peak(DTYPES[name], size, args.repeats, dev, budget_s=args.budget_s), 1
        )
    if dev.type == "cpu":
        result["copy_bandwidth_gbs"] = round(measure_copy_bandwidth(), 1)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
