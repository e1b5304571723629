"""One LoRA-r8 segmentation training step and sliding-window inference (windows/s): ours vs the straightforward code.

TRAIN. OURS: ``build_backbone`` + ``explora.recipes.segment.prepare_segmenter(mode="lora", head=...)`` (preset
LoRA-r8 on the q/v slices of every block's fused qkv) + ``SegmentationObjective`` (cross-entropy, ignore index) +
the engine's fused AdamW groups. BASELINE: timm ViT + peft LoRA r8 on the fused ``qkv`` of every block + the user's
own decoder (BatchNorm + 1x1 conv on the last block's patch-token map, bilinear upsampling: the same linear head,
written by hand) + ``F.cross_entropy`` + plain ``torch.optim.AdamW``. Inputs are a pre-made normalised batch.

INFER. OURS: ``explora.eval.sliding.sliding_window_probs`` over a ``--scene`` px scene, windows batched
``--infer-batch`` at a time, Hann blending. BASELINE: the loop a user writes: each window cut out and run alone
through the model (full forward per window, batch 1), its softmax added into the output. Same model, same
windows, same overlap; both in eval mode under ``torch.no_grad``.

Same protocol as ``pretrain_step.py`` for the training step (one subprocess per variant and round, medians, FLOPs,
peak RSS); inference is timed in the same subprocesses. Run:
``python benchmarks/segment_step.py --model test_dinov2 --img-size 32 --scene 96`` -> JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pretrain_step import (  # noqa: E402
    autocast,
    compare,
    count_flops,
    forward_argv,
    import_runtime,
    interleaved_runs,
    machine,
    matmul_peak,
    n_trainable,
    peak_rss_mib,
    plain_timm_vit,
    summarise,
    time_steps,
)


def _batch(args) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, args.num_classes, (args.batch_size, args.img_size, args.img_size), generator=g)
    masks[:, :2] = 255  # a few ignored rows, as real masks have
    return {"images": torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g), "masks": masks}


def ours(args):
    from explora.engine.optim import build_optimizer, build_param_groups
    from explora.models.backbone import build_backbone
    from explora.objectives.segmentation import SegmentationObjective, SegmentationSettings
    from explora.recipes.segment import prepare_segmenter

    torch.manual_seed(0)
    backbone = build_backbone(args.model, img_size=args.img_size)
    model = prepare_segmenter(backbone, args.num_classes, mode="lora", head=args.head, lora_rank=args.rank)
    obj = SegmentationObjective(model, SegmentationSettings(args.num_classes, args.img_size, (0.5,) * 3,
                                                            (0.25,) * 3))
    groups = build_param_groups(obj.named_parameters(), num_layers=len(backbone.blocks), layer_decay=1.0)
    opt = build_optimizer(groups, (0.9, 0.999), fused=True)
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 1e-3 * g["lr_multiplier"], 0.05 * g["wd_multiplier"]
    batch = _batch(args)
    obj.train()

    def step(i: int) -> None:
        with autocast(args.precision):
            out = obj(batch, i)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return obj, step, model


class _UserSegmenter(nn.Module):
    """What a user writes: timm tokens -> (B, D, h, w) -> BN + 1x1 conv -> bilinear upsampling."""

    def __init__(self, vit: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.vit = vit
        self.bn = nn.BatchNorm2d(vit.embed_dim)
        self.conv = nn.Conv2d(vit.embed_dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]  # (B, N, D)
        p = self.vit.patch_embed.patch_size[0]
        h, w = x.shape[-2] // p, x.shape[-1] // p
        fmap = tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return F.interpolate(self.conv(self.bn(fmap)), size=x.shape[-2:], mode="bilinear", align_corners=False)


def baseline(args):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    vit = plain_timm_vit(args.model, args.img_size)
    vit = inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["qkv"]), vit)
    for n, p in vit.named_parameters():
        p.requires_grad_("lora_" in n)
    model = _UserSegmenter(vit, args.num_classes)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    batch = _batch(args)
    model.train()

    def step(i: int) -> None:
        with autocast(args.precision):
            logits = model(batch["images"])
            loss = F.cross_entropy(logits.float(), batch["masks"], ignore_index=255)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, model


def _windows_per_s(args, model: nn.Module, variant: str) -> dict:
    from explora.eval.sliding import iter_windows, num_windows, sliding_window_probs

    model.eval()
    g = torch.Generator().manual_seed(1)
    scene = torch.rand(3, args.scene, args.scene, generator=g)
    win, ov, k = args.img_size, args.img_size // 4, args.num_classes
    n = num_windows(args.scene, args.scene, win, ov)

    def ours_run() -> None:
        sliding_window_probs(lambda t: model(t), lambda t, lf, h, w: scene[:, t:t + h, lf:lf + w], args.scene,
                             args.scene, k, window=win, overlap=ov, batch_size=args.infer_batch)

    def base_run() -> None:
        out = torch.zeros(k, args.scene, args.scene)
        with torch.no_grad():
            for t, lf in iter_windows(args.scene, args.scene, win, ov):
                out[:, t:t + win, lf:lf + win] += model(scene[None, :, t:t + win, lf:lf + win]).softmax(1)[0]

    run = ours_run if variant == "ours" else base_run
    with torch.no_grad(), autocast(args.precision):
        run()  # warm-up
        times = []
        for _ in range(args.infer_repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {"windows": n, "s_per_scene": round(s, 4), "windows_per_s": round(n / s, 2)}


def worker(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = import_runtime()
    module, step, model = {"ours": ours, "baseline": baseline}[args.worker](args)
    times = time_steps(step, args.steps, args.warmup)
    peak = peak_rss_mib()
    flops = count_flops(lambda: step(10_000))
    infer = _windows_per_s(args, model, args.worker)
    return {"times": times, "flops": flops, "peak_rss_mib": peak, "runtime_rss_mib": runtime,
            "trainable_params": n_trainable(module), "infer": infer}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--head", choices=["linear"], default="linear")  # the baseline writes the linear head
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--num-classes", type=int, default=6)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scene", type=int, default=448, help="square scene side for the inference benchmark")
    ap.add_argument("--infer-batch", type=int, default=8, help="windows per forward (ours)")
    ap.add_argument("--infer-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--peak-size", type=int, default=1024)
    ap.add_argument("--no-peak", action="store_true")
    ap.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    runs = interleaved_runs(__file__, ["ours", "baseline"], forward_argv(args), args.rounds)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = None if args.no_peak else matmul_peak(args.precision, args.peak_size)
    results = {v: summarise(r, args.batch_size, peak) for v, r in runs.items()}
    for v, r in runs.items():
        wps = [x["infer"]["windows_per_s"] for x in r]
        results[v]["inference"] = {"windows": r[0]["infer"]["windows"], "windows_per_s": statistics.median(wps),
                                   "windows_per_s_rounds": wps}
    comparison = compare(results)
    comparison["inference_speedup"] = round(results["ours"]["inference"]["windows_per_s"]
                                            / results["baseline"]["inference"]["windows_per_s"], 3)
    report = {"benchmark": "segment_step.py", "args": {k: v for k, v in vars(args).items() if k != "worker"},
              "machine": machine(), "matmul_peak_gflops": None if peak is None else round(peak, 2), **results,
              "comparison": comparison}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
