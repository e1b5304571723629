"""Linear-probe feature extraction throughput: ``explora.eval.features.extract_features`` vs a plain timm loop.

Both run the same frozen backbone (eval mode, no autograd) over the same in-memory uint8 dataset with the same
normalisation and take the CLS tokens of the last ``--n-blocks`` blocks + the mean patch token through the final
norm. OURS: ``extract_features`` (DataLoader, transform, ``forward_intermediates``, optional autocast).
BASELINE: ``for x in batches: model.forward_intermediates(...)`` under ``torch.inference_mode``.
Rounds alternate ours/baseline in one process (no memory figure: extraction holds no optimiser state);
images/s are medians over rounds.

Run: ``python benchmarks/features.py --model test_dinov2 --img-size 32`` -> JSON on stdout.
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
from pretrain_step import machine  # noqa: E402


class Normalise:
    """uint8 (B, C, H, W) -> float normalised; a class so ``repr`` is stable (extract_features' cache key)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - 0.5) / 0.25

    def __repr__(self) -> str:
        return "Normalise(0.5, 0.25)"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--n-images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n-blocks", type=int, default=4)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    from explora.eval.features import extract_features
    from explora.models.backbone import build_backbone

    torch.manual_seed(0)
    model = build_backbone(args.model, img_size=args.img_size).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n_images, 3, args.img_size, args.img_size), dtype=torch.uint8, generator=g)
    labels = torch.arange(args.n_images) % 10
    dataset = torch.utils.data.TensorDataset(images, labels)
    norm = Normalise()
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def ours() -> None:
        extract_features(model, dataset, norm, n_blocks=args.n_blocks, batch_size=args.batch_size,
                         autocast_dtype=dtype, progress=False)

    def baseline() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            for i in range(0, args.n_images, args.batch_size):
                x = norm(images[i : i + args.batch_size])
                out = model.forward_intermediates(x, indices=args.n_blocks, norm=True, return_prefix_tokens=True,
                                                  output_fmt="NLC", intermediates_only=True)
                torch.stack([p[:, 0] for _, p in out], 1).float(), out[-1][0].mean(1).float()

    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    ours(), baseline()  # warm-up
    for _ in range(args.rounds):
        for name, fn in (("ours", ours), ("baseline", baseline)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    res = {k: {"images_per_s": round(args.n_images / statistics.median(v), 2),
               "images_per_s_rounds": [round(args.n_images / t, 2) for t in v]} for k, v in times.items()}
    report = {"benchmark": "features.py", "args": vars(args), "machine": machine(), **res,
              "comparison": {"speedup": round(res["ours"]["images_per_s"] / res["baseline"]["images_per_s"], 3)}}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
