"""One supervised LoRA-r8 fine-tuning step: ours (explora.recipes.finetune) vs the peft-based step a user would write.

OURS: ``build_backbone`` + ``prepare_classifier(mode="lora")`` (preset LoRA-r8: rank 8 on the q/v slices of every
block's fused qkv, norms frozen) + ``FinetuneObjective`` (soft-target cross-entropy) + the engine's fused AdamW
parameter groups, run by the engine's ``forward_backward`` as ``explora finetune`` runs it (autocast, and in bf16
on a CPU the matmul attention backward of ``explora.vit.attention``). BASELINE: timm ViT + peft LoRA r8 on the
fused ``qkv`` of every block + a linear head on the CLS token + ``F.cross_entropy`` + plain ``torch.optim.AdamW``.
Inputs are a pre-made normalised batch with labels.

Same protocol as ``pretrain_step.py``: one subprocess per variant and round (own peak RSS), interleaved rounds,
medians, FLOPs of one step and the fractions of the measured matmul peak (large square, and at the step's own
linear shapes), both measured at the workers' thread count.
Run: ``python benchmarks/finetune_step.py --model test_dinov2 --img-size 32`` -> JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

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
    linear_shapes,
    machine,
    n_trainable,
    peak_rss_mib,
    peaks,
    plain_timm_vit,
    summarise,
    time_steps,
)
from targets import FINETUNE_TARGETS, step_targets  # noqa: E402


def _batch(args) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"images": torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g),
            "labels": torch.randint(0, args.num_classes, (args.batch_size,), generator=g)}


def ours(args):
    from explora.engine.optim import build_optimizer, build_param_groups
    from explora.models.backbone import build_backbone
    from explora.recipes.finetune import FinetuneObjective, prepare_classifier

    torch.manual_seed(0)
    backbone = build_backbone(args.model, img_size=args.img_size)
    model = prepare_classifier(backbone, args.num_classes, mode="lora", lora_rank=args.rank)
    obj = FinetuneObjective(model, args.num_classes, args.img_size, (0.5,) * 3, (0.25,) * 3)
    groups = build_param_groups(obj.named_parameters(), num_layers=len(backbone.blocks), layer_decay=0.75)
    opt = build_optimizer(groups, (0.9, 0.999), fused=True)
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 1e-3 * g["lr_multiplier"], 0.05 * g["wd_multiplier"]
    batch = _batch(args)
    obj.train()

    from explora.engine.step import forward_backward

    device = torch.device("cpu")

    def step(i: int) -> None:
        forward_backward(obj, obj, batch, i, args.precision, device)  # the engine's step: autocast, attention
        opt.step()
        opt.zero_grad(set_to_none=True)

    return obj, step


def baseline(args):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    vit = plain_timm_vit(args.model, args.img_size)
    vit = inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["qkv"]), vit)
    for n, p in vit.named_parameters():
        p.requires_grad_("lora_" in n)
    model = nn.ModuleDict({"backbone": vit, "head": nn.Linear(vit.embed_dim, args.num_classes)})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    batch = _batch(args)
    model.train()

    def step(i: int) -> None:
        with autocast(args.precision):
            logits = model["head"](vit.forward_features(batch["images"])[:, 0])
            loss = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def worker(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = import_runtime()
    module, step = {"ours": ours, "baseline": baseline}[args.worker](args)
    times = time_steps(step, args.steps, args.warmup)
    peak = peak_rss_mib()
    flops = count_flops(lambda: step(10_000))
    return {"times": times, "flops": flops, "peak_rss_mib": peak, "runtime_rss_mib": runtime,
            "trainable_params": n_trainable(module), "linear_shapes": linear_shapes(lambda: step(10_001))}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
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
    peak, shaped, peak_record = peaks(args, runs)  # the rooflines at the workers' thread count
    results = {v: summarise(r, args.batch_size, peak, shaped.get(v)) for v, r in runs.items()}
    report = {"benchmark": "finetune_step.py", "args": {k: v for k, v in vars(args).items() if k != "worker"},
              "machine": machine(), "matmul_peak_gflops": None if peak is None else round(peak, 2),
              "matmul_peak": peak_record, **results,
              "comparison": compare(results)}
    report["targets"] = step_targets(FINETUNE_TARGETS, results, report["comparison"], args.precision)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
