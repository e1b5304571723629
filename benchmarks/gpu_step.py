"""The ExPLoRA DinoV2 step on one GPU at the paper's settings: images/s, peak memory, MFU; the largest batch that fits.

Defaults are the paper's: ViT-L/14 (``dinov2_vitl14`` architecture, random weights: no hub access), preset
D-[L]-r64, 2 x 224 px global + 8 x 98 px local crops, batch 32, bf16 autocast, 65,536 prototypes, the engine's
fused AdamW + clip 3.0 + EMA, as ``pretrain_step.py``'s ``ours`` builds it (its batch and step helpers are reused).

``--variant`` (one per process, so each peak is its own):

- ``auto``: ``dinov2.split_backward: auto`` resolved for this GPU's free memory, as ``explora pretrain`` does
  (the choice and its estimates are in the JSON's ``memory_choice``)
- ``joint`` / ``view``: ``split_backward`` ``none`` / ``view`` (one backward over all crops / view by view)
- ``ckpt``: ``auto``'s split with per-block activation checkpointing
- ``compile``: ``auto``'s choice with every block of student and teacher compiled in place (``Module.compile``)

``--max-batch-gib G`` instead searches the largest batch whose step fits in ``G`` GiB (the process is capped with
``torch.cuda.set_per_process_memory_fraction``; doubling, then bisection) for each of ``none``, ``view`` and
``none`` + checkpointing, and prints what ``auto`` predicts for the same budget.

Run: ``bash benchmarks/gpu_check.sh`` (all variants + the 16 GiB search). ``--device cpu`` with a tiny
``--model`` is a dry run of the script itself (``tests/benchmarks/test_gpu_step.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine  # noqa: E402
from pretrain_step import _dinov2_batch, _dinov2_cfg, _engine_step, auto_memory_choice  # noqa: E402

VARIANTS = ("auto", "joint", "view", "ckpt", "compile")
H200_BF16_TFLOPS = 989.0  # dense bf16 peak of the H200 SXM (NVIDIA's data sheet, without sparsity)


def build(args, split_backward: str, checkpointing: bool, compile_blocks: bool,
          device: torch.device) -> tuple[Callable[[int], None], int]:
    """Our step at ``args`` on ``device`` (fresh model, optimiser and batch); returns it with its image count."""
    from explora.models.adapt import apply_explora, preset_options
    from explora.models.backbone import build_backbone
    from explora.objectives.dinov2 import DinoV2Objective
    from explora.recipes.pretrain import compile_blocks as compile_in_place

    torch.manual_seed(0)
    backbone = build_backbone(args.model, img_size=args.global_size)
    apply_explora(backbone, **preset_options("D-[L]-r64", lora_rank=args.rank))
    backbone.set_grad_checkpointing(checkpointing)
    cfg = _dinov2_cfg(args)
    cfg.split_backward = split_backward
    obj = DinoV2Objective(backbone, cfg, total_steps=10_000).to(device)
    if compile_blocks:
        compile_in_place(obj)
    batch = {k: v.to(device) for k, v in _dinov2_batch(args, obj.patch_size).items()}
    step = _engine_step(obj, batch, "bf16", depth=len(backbone.blocks), layer_decay=0.9, patch_embed_lr_mult=0.2,
                        betas=(0.9, 0.999), weight_decay=0.04, ema=True, device=device)
    return step, args.batch_size


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, device: torch.device) -> dict:
    """Images/s (median step after warm-up), peak memory, FLOPs and MFU of ``args.variant``."""
    choice = auto_memory_choice(args)  # this GPU's free memory (CPU dry run: MemAvailable)
    split = {"joint": "none", "view": "view"}.get(args.variant, choice["split_backward"])
    ckpt = args.variant == "ckpt" or (args.variant in ("auto", "compile") and choice["grad_checkpointing"])
    step, images = build(args, split, ckpt, args.variant == "compile", device)
    t0 = time.perf_counter()
    for i in range(args.warmup):  # warm-up (and compilation)
        step(i)
    synchronize(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        synchronize(device)
        t = time.perf_counter()
        step(i)
        synchronize(device)
        times.append(time.perf_counter() - t)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    flops = None
    if args.variant != "compile":  # FlopCounterMode does not see inside compiled graphs: use an eager variant's
        with FlopCounterMode(display=False) as counter:
            step(10_000)
        flops = counter.get_total_flops()
    s = statistics.median(times)
    return {"variant": args.variant, "split_backward": split, "grad_checkpointing": ckpt, "batch_size": images,
            "steps": args.steps, "warmup_s": round(warm_s, 1), "s_per_step": round(s, 4),
            "images_per_s": round(images / s, 1), "peak_gpu_gib": None if peak_gib is None else round(peak_gib, 2),
            "tflop_per_step": None if flops is None else round(flops / 1e12, 3),
            "tflops": None if flops is None else round(flops / s / 1e12, 2),
            "mfu": None if flops is None else round(flops / s / 1e12 / args.peak_tflops, 3),
            "peak_tflops": args.peak_tflops, "memory_choice": choice}


def fits(args, batch_size: int, split: str, ckpt: bool, device: torch.device) -> bool:
    """Whether two steps at ``batch_size`` run within the memory cap (an out-of-memory error: no)."""
    gc.collect()  # the previous trial's model and batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trial = argparse.Namespace(**{**vars(args), "batch_size": batch_size})
    try:
        step, _ = build(trial, split, ckpt, False, device)
        step(0)
        step(1)
        synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False


def largest_batch(args, split: str, ckpt: bool, device: torch.device, limit: int) -> int:
    """The largest batch in [0, ``limit``] whose step fits: doubling from 1, then bisection."""
    lo, hi = 0, 1
    while hi <= limit and fits(args, hi, split, ckpt, device):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(args, mid, split, ckpt, device) else (lo, mid)
    return lo


def max_batch(args, device: torch.device) -> dict:
    """The largest per-GPU batch within ``args.max_batch_gib`` for each split, and what ``auto`` predicts."""
    cap = int(args.max_batch_gib * 2**30)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    found = {f"{split}{' + checkpointing' if ckpt else ''}": largest_batch(args, split, ckpt, device,
                                                                          args.max_batch_limit)
             for split, ckpt in (("none", False), ("view", False), ("none", True))}
    return {"max_batch_gib": args.max_batch_gib, "largest_batch": found,
            "auto_at_this_batch": auto_memory_choice(args, available=cap)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=VARIANTS, default="auto")
    ap.add_argument("--model", default="dinov2_vitl14")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=98)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--prototypes", type=int, default=65_536)
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank of the D-[L]-r64 preset")
    ap.add_argument("--precision", default="bf16", choices=["bf16"], help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=float(os.environ.get("PEAK_TFLOPS", H200_BF16_TFLOPS)))
    ap.add_argument("--max-batch-gib", type=float, default=None, help="search the largest batch within this memory")
    ap.add_argument("--max-batch-limit", type=int, default=256, help="the search's upper end")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to dry-run this script with a tiny --model")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_step: CUDA is not available (use --device cpu only for a dry run with a tiny model)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = max_batch(args, device) if args.max_batch_gib else measure(args, device)
    out.update(model=args.model, crops=[2, args.global_size, args.n_local, args.local_size],
               prototypes=args.prototypes, machine=machine())
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
