#!/usr/bin/env bash
# ExPLoRA DinoV2 pre-training step on one GPU at the paper's settings: ViT-L/14 (dinov2_vitl14 architecture,
# random weights: no hub access), preset D-[L]-r64, 2 x 224 px global + 8 x 98 px local crops, batch 32, bf16
# autocast, 65,536 prototypes, split backward (the default), fused AdamW + clip 3.0 + EMA, exactly as
# benchmarks/pretrain_step.py's OURS step.
# Four variants, each in its own process (separate peak memory):
#   plain        - eager
#   ckpt         - per-block activation checkpointing (vit.grad_checkpointing = True, non-reentrant)
#   joint        - eager with one backward over all crops (dinov2.split_backward: none), for the memory comparison
#   compile      - every block of student and teacher compiled in place (Module.compile; default mode)
# Prints one JSON line per variant: images/s (median step after warm-up), peak GPU memory (GiB), TFLOP/s
# (FlopCounterMode on one step) and MFU against the H200's dense bf16 peak (~989 TFLOP/s; override PEAK_TFLOPS).
# Budget: ~8 minutes on one H200 (each variant: model build + warm-up + STEPS timed steps; compile adds ~1-2 min).
# Usage: bash benchmarks/gpu_check.sh [STEPS]   (run from the repository root; needs CUDA)
set -euo pipefail
STEPS="${1:-10}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
cd "$(dirname "$0")/.."
python - <<'PY' || { echo "gpu_check: CUDA is not available" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

for VARIANT in plain ckpt joint compile; do
  case "$VARIANT" in compile) LIMIT=180 ;; *) LIMIT=100 ;; esac  # 3 x 100 + 180 s = 8 minutes at most
  VARIANT="$VARIANT" STEPS="$STEPS" PEAK_TFLOPS="$PEAK_TFLOPS" timeout "$LIMIT" python - <<'PY' || echo "{\"variant\": \"$VARIANT\", \"error\": \"failed or timed out (exit $?)\"}"
import json, os, statistics, sys, time

import torch
from torch.utils.flop_counter import FlopCounterMode

from explora.models.adapt import apply_explora, preset_options
from explora.data.multicrop import MultiCrop
from explora.engine.optim import build_optimizer, build_param_groups
from explora.engine.step import forward_backward
from explora.models.backbone import build_backbone
from explora.objectives.dinov2 import DinoV2Config, DinoV2Objective
from explora.objectives.dinov2.masking import BlockMaskSampler
from explora.objectives.dinov2.objective import DinoV2BatchTransform

sys.path.insert(0, "benchmarks")
from machine import machine

variant, steps, peak = os.environ["VARIANT"], int(os.environ["STEPS"]), float(os.environ["PEAK_TFLOPS"])
dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
torch.manual_seed(0)
B = 32
cfg = DinoV2Config(global_size=224, local_size=98, n_local=8,  # 65,536 prototypes (ssl_default_config)
                   split_backward="none" if variant == "joint" else "view")
backbone = build_backbone("dinov2_vitl14", img_size=224)
apply_explora(backbone, **preset_options("D-[L]-r64"))
backbone.grad_checkpointing = variant == "ckpt"
obj = DinoV2Objective(backbone, cfg, total_steps=10_000).to(dev)
if variant == "compile":
    for net in (obj.student, obj.teacher):  # in place (Module.compile): parameter names stay as they are
        for blk in net["backbone"].blocks:
            blk.compile()
groups = build_param_groups(obj.named_parameters(), num_layers=len(backbone.blocks), layer_decay=0.9,
                            patch_embed_lr_mult=0.2)
opt = build_optimizer(groups, (0.9, 0.999), fused=True)
for g in opt.param_groups:
    g["lr"], g["weight_decay"] = 1e-4 * g["lr_multiplier"], 0.04 * g["wd_multiplier"]
params = [p for g in groups for p in g["params"]]
gen = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (B, 3, 256, 256), dtype=torch.uint8, generator=gen)
transform = DinoV2BatchTransform(
    MultiCrop(cfg.global_size, cfg.local_size, cfg.n_local, cfg.global_scale, cfg.local_scale, cfg.mean, cfg.std),
    BlockMaskSampler(cfg.global_size // 14, cfg.mask_probability, cfg.mask_ratio_min_max))
batch = {k: v.to(dev) for k, v in transform(images, gen).items()}  # pre-made crops: data is not measured
obj.train()

def step(i):
    forward_backward(obj, obj, batch, i, "bf16", dev)  # split backward: view by view (joint: one backward)
    torch.nn.utils.clip_grad_norm_(params, 3.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    obj.on_optimizer_step(i)

t0 = time.perf_counter()
for i in range(3):  # warm-up (and compilation)
    step(i)
torch.cuda.synchronize()
warm_s = time.perf_counter() - t0
torch.cuda.reset_peak_memory_stats()
times = []
for i in range(3, 3 + steps):
    torch.cuda.synchronize(); t = time.perf_counter()
    step(i)
    torch.cuda.synchronize(); times.append(time.perf_counter() - t)
peak_gib = torch.cuda.max_memory_allocated() / 2**30
if variant == "compile":
    flops = None  # FlopCounterMode does not see inside compiled graphs; use the eager count printed above
else:
    with FlopCounterMode(display=False) as fc:
        step(10_000)
    flops = fc.get_total_flops()
s = statistics.median(times)
res = {"variant": variant, "steps": steps, "warmup_s": round(warm_s, 1), "s_per_step": round(s, 4),
       "images_per_s": round(B / s, 1), "peak_gpu_gib": round(peak_gib, 2),
       "tflop_per_step": None if flops is None else round(flops / 1e12, 2),
       "tflops": None if flops is None else round(flops / s / 1e12, 1),
       "mfu": None if flops is None else round(flops / s / 1e12 / peak, 3),
       "device": torch.cuda.get_device_name(), "torch": torch.__version__, "machine": machine()}
print(json.dumps(res), flush=True)
PY
done
