"""Where one of our pre-training steps spends its time: ``torch.profiler`` over a few steps, top ops to a file.

Builds the same step as ``pretrain_step.py`` (``ours`` for ``--objective dinov2`` / ``mae``, or ``baseline``; with
``--objective finetune`` the LoRA-r8 fine-tuning step of ``finetune_step.py``), runs
``--warmup`` untimed steps, profiles ``--steps`` more on the CPU and writes
``<out>/<objective>_<variant>_<precision>.txt`` (the op table sorted by self CPU time) and ``.json`` (the top ops,
the share of the step spent in matmul-like ops vs ops that compute nothing new: dtype casts, copies, concatenation,
layout changes, and the machine record). This is what guided the changes in docs/performance.md.

Run: ``python benchmarks/profile_step.py --precision bf16 [--objective mae|finetune] [--out benchmarks/profiles]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune_step  # noqa: E402
import pretrain_step  # noqa: E402
from machine import machine  # noqa: E402

COMPUTE = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
           "aten::_scaled_dot_product", "aten::_flash_attention", "aten::convolution", "mkldnn", "onednn")
OVERHEAD = ("aten::copy_", "aten::_to_copy", "aten::to", "aten::contiguous", "aten::clone", "aten::cat",
            "aten::stack", "aten::index", "aten::fill_", "aten::zero_", "aten::empty", "aten::t", "aten::transpose",
            "aten::view", "aten::reshape", "aten::expand", "aten::permute", "aten::select", "aten::slice",
            "aten::split", "aten::chunk", "aten::as_strided", "aten::detach")


def classify(name: str) -> str:
    if any(name.startswith(c) or c in name for c in COMPUTE):
        return "matmul"
    if any(name == o or name.startswith(o + "_") for o in OVERHEAD):
        return "copy/cast/layout"
    return "other"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "profiles"))
    ap.add_argument("--variant", default="ours", choices=["ours", "baseline", "ours_joint", "ours_view"])
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--objective", default="dinov2", choices=["dinov2", "mae", "finetune"],
                    help="finetune: the LoRA-r8 fine-tuning step of finetune_step.py (variants ours / baseline)")
    args, rest = ap.parse_known_args(argv)
    if args.objective == "finetune":
        bench = finetune_step.parse_args(rest)
        if args.variant not in ("ours", "baseline"):
            ap.error("--objective finetune has the variants ours and baseline")
        torch.set_num_threads(bench.threads or torch.get_num_threads())
        _, step = {"ours": finetune_step.ours, "baseline": finetune_step.baseline}[args.variant](bench)
    else:
        bench = pretrain_step.parse_args(["--objective", args.objective, *rest])
        torch.set_num_threads(bench.threads or torch.get_num_threads())
        _, step, _ = pretrain_step.VARIANTS[(bench.objective, args.variant)](bench)
    for i in range(bench.warmup + 1):
        step(i)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for i in range(bench.steps):
            step(100 + i)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    shares: dict[str, float] = {}
    for e in events:
        shares[classify(e.key)] = shares.get(classify(e.key), 0.0) + e.self_cpu_time_total
    name = f"{args.objective}_{args.variant}_{bench.precision}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    report = {
        "benchmark": "profile_step.py", "objective": args.objective, "variant": args.variant,
        "args": {k: v for k, v in vars(bench).items() if k != "worker"},
        "machine": machine(),
        "s_per_step_profiled": round(total / 1e6 / bench.steps, 4),
        "self_cpu_share": {k: round(v / total, 3) for k, v in sorted(shares.items())},
        "top_ops": [{"op": e.key, "calls_per_step": e.count // bench.steps,
                     "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / bench.steps, 2),
                     "share": round(e.self_cpu_time_total / total, 3), "kind": classify(e.key)}
                    for e in rows[:args.top]],
    }
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("variant", "s_per_step_profiled", "self_cpu_share")}))
    return report


if __name__ == "__main__":
    main()
