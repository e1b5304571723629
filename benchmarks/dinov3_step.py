"""One ExPLoRA DinoV2-objective step on DINOv3 ViT-S/16 next to DinoV2 ViT-S/14, at the same crop sizes.

Both variants are our step of ``pretrain_step.py`` (``ours_dinov2``: ``build_backbone`` + D-[L]-r64, the same settings
as D3-[L]-r64, + ``DinoV2Objective`` + the engine's groups, fused AdamW, clip, EMA), random weights, one model
each: ``dinov3_vits16`` (timm Eva: RoPE, cls + 4 registers, 16-px patches) and ``dinov2_vits14`` (timm ViT,
absolute position embedding, cls, 14-px patches). The crop sizes default to 224 / 112 px, multiples of both
patches (DINOv3: 14x14 + 7x7 patches, DinoV2: 16x16 + 8x8), so the images are the same but DinoV2 sees ~30% more
tokens per crop. Protocol as ``pretrain_step.py``: pre-made crops, one subprocess per variant and round, rounds
interleaved, medians over every timed step (the machine may be shared: the per-round medians show the spread),
peak RSS per worker and ``step_memory_mib`` = peak - runtime.

Run: ``python benchmarks/dinov3_step.py --threads 1`` -> JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pretrain_step import (  # noqa: E402
    count_flops,
    forward_argv,
    import_runtime,
    interleaved_runs,
    machine,
    n_trainable,
    ours_dinov2,
    peak_rss_mib,
    summarise,
    time_steps,
)

MODELS = ("dinov3_vits16", "dinov2_vits14")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=112)
    ap.add_argument("--n-local", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--prototypes", type=int, default=4096)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch default)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def worker(args: argparse.Namespace) -> dict:
    """Build our step for ``args.worker`` (a model name), time it, report times, FLOPs, memory."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    runtime = import_runtime()
    args.model = args.worker
    module, step, batch = ours_dinov2(args)
    times = time_steps(step, args.steps, args.warmup)
    peak = peak_rss_mib()
    flops = count_flops(lambda: step(10_000))
    backbone = module.student["backbone"]
    tokens = {k: int(batch[k].shape[-1] // backbone.patch_embed.patch_size[0]) ** 2 + backbone.num_prefix_tokens
              for k in ("global", "local")}
    return {"times": times, "flops": flops, "peak_rss_mib": peak, "runtime_rss_mib": runtime,
            "trainable_params": n_trainable(module), "tokens_per_crop": tokens}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    runs = interleaved_runs(__file__, args.models, forward_argv(args, parent_only=("models",)), args.rounds)
    results = {m: {**summarise(r, args.batch_size, None), "tokens_per_crop": r[0]["tokens_per_crop"]}
               for m, r in runs.items()}
    report = {"benchmark": os.path.basename(__file__), "args": {k: v for k, v in vars(args).items() if k != "worker"},
              "machine": machine(), **results}
    if set(MODELS) <= set(results):
        a, b = results["dinov3_vits16"], results["dinov2_vits14"]
        report["dinov3_vs_dinov2"] = {"step_time_ratio": round(a["s_per_step"] / b["s_per_step"], 3),
                                      "step_memory_ratio": round(a["step_memory_mib"] / b["step_memory_mib"], 3)}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
