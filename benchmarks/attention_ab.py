"""Our bf16 step with and without the CPU attention backward (``explora.vit.attention``), alternated in one process.

Separate processes on a shared machine differ by more than this change is worth, so the same built step (from
``pretrain_step.py``'s ``ours`` variant) is timed alternately with ``explora.vit.attention.MAX_TOKENS = 0`` (every
attention on PyTorch's kernel backward) and its default (the matmul backward where it is faster), step after step.
Run: ``python benchmarks/attention_ab.py [--objective mae] [--pairs 6]`` -> JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_step  # noqa: E402
from machine import machine  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    import explora.vit.attention as attention

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=6)
    args, rest = ap.parse_known_args(argv)
    bench = pretrain_step.parse_args(["--precision", "bf16", "--threads", "1", *rest])
    torch.set_num_threads(bench.threads)
    _, step, _ = pretrain_step.VARIANTS[(bench.objective, "ours")](bench)
    default = attention.MAX_TOKENS
    step(0), step(1)  # warm-up
    times: dict[int, list[float]] = {0: [], default: []}
    for i in range(args.pairs):
        for limit in (0, default):
            attention.MAX_TOKENS = limit
            t = time.perf_counter()
            step(2 + i)
            times[limit].append(time.perf_counter() - t)
    attention.MAX_TOKENS = default
    kernel, ours = statistics.median(times[0]), statistics.median(times[default])
    result = {"benchmark": "attention_ab.py", "objective": bench.objective,
              "kernel_backward_s": [round(t, 3) for t in times[0]],
              "matmul_backward_s": [round(t, 3) for t in times[default]],
              "median_kernel_backward_s": round(kernel, 4), "median_matmul_backward_s": round(ours, 4),
              "speedup": round(kernel / ours, 3), "args": vars(bench), "machine": machine()}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
