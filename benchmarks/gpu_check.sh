#!/usr/bin/env bash
# The ExPLoRA DinoV2 pre-training step on one GPU at the paper's settings (benchmarks/gpu_step.py: ViT-L/14,
# D-[L]-r64, 2 x 224 + 8 x 98 px crops, batch 32, bf16, 65,536 prototypes, fused AdamW + clip + EMA).
# One process per variant (each peak is its own), one JSON line each:
#   auto     - dinov2.split_backward: auto, resolved for this GPU's free memory as `explora pretrain` does
#   joint    - one backward over all crops (split_backward: none)
#   view     - crops back-propagated view by view (split_backward: view)
#   ckpt     - auto's split + per-block activation checkpointing
#   compile  - auto's choice, every block of student and teacher compiled in place
# then the largest per-GPU batch that fits in 16 GiB (the paper's 16 GB GPUs; the official code runs 8 per GPU
# with accumulation 32) for none / view / none + checkpointing.
# Images/s (median step after warm-up), peak GPU memory, TFLOP/s (FlopCounterMode) and MFU against the H200's dense
# bf16 peak (989 TFLOP/s; override PEAK_TFLOPS). Budget: ~9 minutes on one H200.
# Usage: bash benchmarks/gpu_check.sh [STEPS]   (from the repository root; needs CUDA)
set -euo pipefail
STEPS="${1:-10}"
cd "$(dirname "$0")/.."
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: CUDA is not available" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true

for VARIANT in auto joint view ckpt compile; do
  case "$VARIANT" in compile) LIMIT=180 ;; *) LIMIT=80 ;; esac  # 4 x 80 + 180 s
  timeout "$LIMIT" python benchmarks/gpu_step.py --variant "$VARIANT" --steps "$STEPS" \
    || echo "{\"variant\": \"$VARIANT\", \"error\": \"failed or timed out (exit $?)\"}"
done
timeout 150 python benchmarks/gpu_step.py --max-batch-gib 16 \
  || echo "{\"max_batch_gib\": 16, \"error\": \"failed or timed out (exit $?)\"}"
