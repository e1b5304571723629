"""Multi-crop throughput per core: explora's batched ``MultiCrop`` against torchvision transforms v2 on PIL images.

Both run DinoV2's RGB recipe (``dinov2/data/augmentations.py``): 2 global crops (RandomResizedCrop scale (0.32, 1.0),
bicubic) + ``n_local`` local crops (scale (0.05, 0.32)), horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8,
grayscale p=0.2, Gaussian blur (kernel 9, sigma (0.1, 2.0)) p=1.0 / 0.1 / 0.5, solarize p=0.2 on global crop 2,
then float conversion + ImageNet normalisation. Inputs are the same ``size``-px uint8 images for both: a
``(B, 3, H, W)`` uint8 tensor for ours, the equivalent PIL images for torchvision.

Throughput is images/s PER CORE: ``torch.set_num_threads(1)`` and one process. The two pipelines are timed
interleaved (ours, torchvision, ours, ...) in the same run so that load from other processes on a shared machine
hits both alike; the JSON reports medians over all timed calls and the ratio of the medians. With ``--rounds R``
the ``repeats`` interleaved pairs are timed R times (fresh random draws each call); each round's ratio of medians
is reported too (``round_ratios``, their median ``ratio_median_of_rounds``), to show the spread under load.

Run: ``python benchmarks/multicrop.py [--batch 16] [--repeats 7] [--rounds 1] [--size 512]`` -> JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from explora.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, MultiCrop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine  # noqa: E402
from targets import MULTICROP_TARGETS, verdict  # noqa: E402


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` photo-like uint8 images (n, size, size, 3): smooth gradients and blobs plus sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        f = rng.uniform(2, 12, 3)
        ph = rng.uniform(0, 6.3, 3)
        base = np.stack([np.sin(f[c] * xx + ph[c]) * np.cos(f[(c + 1) % 3] * yy) for c in range(3)], -1)
        noise = rng.normal(0, 0.08, (size, size, 3))
        out[i] = np.clip(127.5 + 110 * (0.9 * base + noise), 0, 255).astype(np.uint8)
    return out


def torchvision_recipe(global_size: int, local_size: int) -> tuple[v2.Compose, v2.Compose, v2.Compose]:
    """The three DinoV2 pipelines (global 1, global 2, local) with torchvision transforms v2 on PIL images."""
    bicubic = v2.InterpolationMode.BICUBIC

    def geometric(size: int, scale: tuple[float, float]) -> list:
        return [v2.RandomResizedCrop(size, scale=scale, interpolation=bicubic), v2.RandomHorizontalFlip(0.5)]

    color = [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(0.2)]

    def blur(p: float) -> v2.Transform:
        return v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)

    norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    g1 = v2.Compose([*geometric(global_size, (0.32, 1.0)), *color, blur(1.0), *norm])
    g2 = v2.Compose([*geometric(global_size, (0.32, 1.0)), *color, blur(0.1), v2.RandomSolarize(128, p=0.2), *norm])
    loc = v2.Compose([*geometric(local_size, (0.05, 0.32)), *color, blur(0.5), *norm])
    return g1, g2, loc


def run_torchvision(pils: list[Image.Image], pipes: tuple, n_local: int) -> dict[str, torch.Tensor]:
    """Image-by-image multi-crop, stacked into the same layout as ``MultiCrop`` (view-major)."""
    g1, g2, loc = pipes
    glob = [[g1(p) for p in pils], [g2(p) for p in pils]]
    locs = [[loc(p) for p in pils] for _ in range(n_local)]
    return {"global": torch.stack(glob[0] + glob[1]), "local": torch.stack([t for crop in locs for t in crop])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="images per call")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls of each pipeline (interleaved) per round")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of --repeats interleaved calls; a ratio per round")
    ap.add_argument("--size", type=int, default=512, help="input side in pixels")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=98)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = per-core throughput)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of ours to stderr")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    arr = synthetic_images(args.batch, args.size)
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8
    pils = [Image.fromarray(a) for a in arr]
    ours = MultiCrop(args.global_size, args.local_size, args.n_local)
    pipes = torchvision_recipe(args.global_size, args.local_size)
    torch.manual_seed(0)

    def time_ours(step: int) -> float:
        t = time.perf_counter()
        out = ours(images, torch.Generator().manual_seed(step))
        assert out["local"].shape[0] == args.n_local * args.batch
        return time.perf_counter() - t

    def time_tv() -> float:
        t = time.perf_counter()
        run_torchvision(pils, pipes, args.n_local)
        return time.perf_counter() - t

    time_ours(-1), time_tv()  # warm-up (allocator, kernel selection)
    t_ours, t_tv, round_ratios = [], [], []
    for rnd in range(args.rounds):
        r_ours, r_tv = [], []
        for r in range(args.repeats):
            r_ours.append(time_ours(rnd * args.repeats + r))
            r_tv.append(time_tv())
        round_ratios.append(statistics.median(r_tv) / statistics.median(r_ours))
        t_ours += r_ours
        t_tv += r_tv
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ours(images, torch.Generator().manual_seed(0))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    ips_ours = args.batch / statistics.median(t_ours)
    ips_tv = args.batch / statistics.median(t_tv)
    result = {
        "ours_images_per_s_per_core": round(ips_ours, 2),
        "torchvision_images_per_s_per_core": round(ips_tv, 2),
        "ratio": round(ips_ours / ips_tv, 3),
        "round_ratios": [round(r, 3) for r in round_ratios],
        "ratio_median_of_rounds": round(statistics.median(round_ratios), 3),
        "targets": {"ratio": verdict(round(ips_ours / ips_tv, 3), *MULTICROP_TARGETS["ratio"])},
        "ours_s_per_call": [round(t, 4) for t in t_ours],
        "torchvision_s_per_call": [round(t, 4) for t in t_tv],
        "settings": {"batch": args.batch, "repeats": args.repeats, "rounds": args.rounds,
                     "input": f"{args.size}x{args.size} uint8 RGB",
                     "global": f"2x{args.global_size}", "local": f"{args.n_local}x{args.local_size}",
                     "threads": args.threads},
        "machine": machine(),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
