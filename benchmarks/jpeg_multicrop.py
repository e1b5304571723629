"""Decode + DinoV2 multi-crop per core on large aerial JPEGs: explora's data path vs PIL + torchvision v2.

The images: fMoW-RGB's are large JPEGs (often 1,000-4,000 px a side). No fMoW image is on this machine, so large
aerial JPEGs are made from the real Landsat-7 scene in ``/work/shared/data`` (352 x 349 px, 6 bands): its true-colour
bands (3, 2, 1) or a false-colour (4, 3, 2) composite, mirrored and tiled into a ``--side``-px mosaic (real texture
at the sensor's resolution, not an upsampled one), each image from a different offset, saved with Pillow as
quality-90 JPEGs. Say so when quoting the figures: they are re-encoded Landsat, not fMoW.

OURS (the path ``explora pretrain`` takes with ``data.image_size = S``): ``read_rgb(path, min_side=S)`` (the JPEG
decoded at the smallest DCT scale whose shorter side is still >= S, Pillow ``Image.draft``), ``resize_square`` to
S x S, the batch stacked, then the batched ``MultiCrop`` (2 x 224 + 8 x 98). S defaults to the smallest side at
which no crop of DinoV2's recipe is upsampled: a crop of area scale s and aspect ratio 3/4 has a shorter side of
S * sqrt(s * 3/4), so S = max(224 / sqrt(0.32 * 3/4), 98 / sqrt(0.05 * 3/4)) = 507 -> 512.
BASELINE (DinoV2's own loader with torchvision v2): ``Image.open(path).convert("RGB")`` (full decode) and the same
recipe image by image on the full-size image (``multicrop.torchvision_recipe``).

Per core: one torch thread, one process; the two are timed interleaved, medians over all calls, a ratio per round.
Run: ``python benchmarks/jpeg_multicrop.py [--n 8] [--side 2112] [--rounds 3]`` -> JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from explora.data.base import resize_square
from explora.data.io import read_rgb
from explora.data.multicrop import MultiCrop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine  # noqa: E402
from multicrop import run_torchvision, torchvision_recipe  # noqa: E402
from targets import MULTICROP_TARGETS, verdict  # noqa: E402

LANDSAT = Path("/work/shared/data/landsat7_etm_olinda_6band.tif")


def no_upsampling_side(global_size: int, local_size: int, global_min: float = 0.32, local_min: float = 0.05) -> int:
    """The smallest image side (a multiple of 32) at which no RandomResizedCrop of the recipe is upsampled."""
    side = max(global_size / math.sqrt(global_min * 3 / 4), local_size / math.sqrt(local_min * 3 / 4))
    return 32 * math.ceil(side / 32)


def aerial_jpegs(out: Path, n: int, side: int, source: Path = LANDSAT) -> list[Path]:
    """``n`` ``side``-px JPEGs mosaicked from the Landsat scene (true / false colour, mirrored tiles, offsets)."""
    import tifffile

    scene = tifffile.imread(source)  # (352, 349, 6) uint8
    paths = []
    for i in range(n):
        rgb = scene[..., [2, 1, 0]] if i % 2 == 0 else scene[..., [3, 2, 1]]
        row = np.concatenate([rgb, rgb[:, ::-1]], axis=1)
        tile = np.concatenate([row, row[::-1]], axis=0)  # mirrored 2x2: seamless
        reps = (side // tile.shape[0] + 2, side // tile.shape[1] + 2, 1)
        big = np.tile(tile, reps)
        y0, x0 = (37 * i) % tile.shape[0], (53 * i) % tile.shape[1]
        img = np.ascontiguousarray(big[y0:y0 + side, x0:x0 + side])
        path = out / f"aerial_{i}.jpg"
        Image.fromarray(img).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8, help="images per call (one batch)")
    ap.add_argument("--side", type=int, default=2112, help="JPEG side in pixels")
    ap.add_argument("--image-size", type=int, default=None, help="ours: data.image_size (default: no upsampling)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved calls of each pipeline per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=98)
    ap.add_argument("--n-local", type=int, default=8)
    args = ap.parse_args(argv)
    if not LANDSAT.is_file():
        raise SystemExit(f"jpeg_multicrop: needs the Landsat scene at {LANDSAT}")
    torch.set_num_threads(1)
    size = args.image_size or no_upsampling_side(args.global_size, args.local_size)
    ours_mc = MultiCrop(args.global_size, args.local_size, args.n_local)
    pipes = torchvision_recipe(args.global_size, args.local_size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = aerial_jpegs(Path(tmp), args.n, args.side)
        jpeg_kib = statistics.median(p.stat().st_size for p in paths) / 1024
        decoded = read_rgb(paths[0], min_side=size).shape[-2:]

        def ours(step: int) -> float:
            t = time.perf_counter()
            batch = torch.stack([resize_square(read_rgb(p, min_side=size), size) for p in paths])
            out = ours_mc(batch, torch.Generator().manual_seed(step))
            assert out["local"].shape[0] == args.n_local * args.n
            return time.perf_counter() - t

        def baseline() -> float:
            t = time.perf_counter()
            pils = []
            for p in paths:
                with Image.open(p) as im:
                    pils.append(im.convert("RGB"))
            run_torchvision(pils, pipes, args.n_local)
            return time.perf_counter() - t

        ours(-1), baseline()  # warm-up
        t_ours, t_base, ratios = [], [], []
        for rnd in range(args.rounds):
            r_o, r_b = [], []
            for r in range(args.repeats):
                r_o.append(ours(rnd * args.repeats + r))
                r_b.append(baseline())
            ratios.append(statistics.median(r_b) / statistics.median(r_o))
            t_ours += r_o
            t_base += r_b
    ips_ours, ips_base = args.n / statistics.median(t_ours), args.n / statistics.median(t_base)
    ratio = round(ips_ours / ips_base, 3)
    result = {
        "benchmark": "jpeg_multicrop.py",
        "ours_images_per_s_per_core": round(ips_ours, 2),
        "baseline_images_per_s_per_core": round(ips_base, 2),
        "ratio": ratio,
        "round_ratios": [round(r, 3) for r in ratios],
        "targets": {"ratio": verdict(ratio, *MULTICROP_TARGETS["ratio"])},
        "ours_s_per_call": [round(t, 4) for t in t_ours],
        "baseline_s_per_call": [round(t, 4) for t in t_base],
        "settings": {"images": f"{args.n} JPEGs {args.side}x{args.side}, quality 90, median {jpeg_kib:.0f} KiB, "
                               f"mosaicked from the Landsat-7 scene {LANDSAT.name} (true/false colour)",
                     "image_size": size, "decoded_at": list(decoded),
                     "crops": f"2x{args.global_size} + {args.n_local}x{args.local_size}",
                     "repeats": args.repeats, "rounds": args.rounds, "threads": 1},
        "machine": machine(),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
