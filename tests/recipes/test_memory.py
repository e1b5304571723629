"""Memory estimate: exact static counts, traced activations, and prediction vs a measured peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from explora.core.errors import ConfigError
from explora.recipes.memory import (
    MIB,
    _meta_objective,
    estimate_all,
    estimate_pretrain_memory,
    per_image_and_call,
    saved_bytes,
)
from explora.recipes.pretrain import load_config
from explora.vit.lora import LoRAQKV

# test_dinov2 (dim 64, depth 4, patch 8) with small heads and many crops, so activations dominate
TINY = ["model.name=test_dinov2", "model.weights=null", "train.batch_size=48", "train.precision=fp32",
        "dinov2.global_size=64", "dinov2.local_size=32", "dinov2.n_local=4", "dinov2.n_prototypes=4096",
        "dinov2.hidden_dim=256", "dinov2.bottleneck_dim=64", "dinov2.mean=[0.5,0.5,0.5]", "dinov2.std=[0.2,0.2,0.2]"]


def test_static_counts_are_exact():
    r = estimate_pretrain_memory(load_config(None, TINY))
    c = r.components
    # hand count: test_dinov2 D-[L]-r64 trainable backbone = last block + LoRA r64 (q, v) on 3 blocks + norms
    d, h = 64, 256
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d + 2 * d
    lora = 3 * 2 * 64 * (d + d)
    norms = 3 * 4 * d + 2 * d
    mask_token = d
    assert c["trainable_weights"] == 4 * (block + lora + norms + mask_token)
    head = (d * h + h) + (h * h + h) + (h * 64 + 64) + 4096 * 64 + 4096  # MLP + prototypes V + their gains g
    assert c["head_weights"] == 4 * head
    trainable = block + lora + norms + mask_token + head
    assert r.details["trainable_params"] == trainable
    assert c["teacher_ema_copies"] == 4 * (trainable - mask_token)  # the teacher mask token is a buffer
    assert c["gradients"] == 4 * trainable and c["adamw_moments"] == 8 * trainable
    assert r.details["tokens_global"] == 65 and r.details["tokens_local"] == 17


def test_native_grid_backbone_counts_its_stored_positions_and_the_crops_tokens():
    """dinov2_vits14 stores the hub file's 37x37 position embedding; token counts follow the crop sizes."""
    from explora.models.backbone import build_backbone

    cfg = load_config(None, ["model.name=dinov2_vits14", "model.weights=null", "train.batch_size=2",
                             "dinov2.n_prototypes=256", "dinov2.hidden_dim=64", "dinov2.bottleneck_dim=32",
                             "dinov2.n_local=2"])
    r = estimate_pretrain_memory(cfg, precision="fp32")
    with torch.device("meta"):
        vit = build_backbone("dinov2_vits14")
    assert vit.pos_embed.shape == (1, 1 + 37 * 37, 384)
    backbone = sum(p.numel() for p in vit.parameters())  # timm's exact count, 1370 positions included
    d = 384  # hand count of what D-[L]-r64 trains in the base ViT: the last block (with LayerScale) and all norms
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d + 2 * d
    norms = 11 * 4 * d + 2 * d
    # the weight-norm gain of the prototype layer trains (DinoV2), so no head tensor is frozen
    assert r.components["frozen_weights"] == 4 * (backbone - block - norms)
    assert r.details["tokens_global"] == 16 * 16 + 1 and r.details["tokens_local"] == 7 * 7 + 1


def test_trace_counts_saved_tensors_of_a_linear():
    lin = torch.nn.Linear(8, 16)
    # trainable weight: the (n, 8) input is saved; nothing else (weight views are not counted)
    per_img, per_call = per_image_and_call(lin, lambda m, x: m(x), lambda n: (n, 8), "fp32", False)
    assert (per_img, per_call) == (8 * 4, 0)
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    assert saved_bytes(lin, lambda m, x: m(x), [(3, 8)], "fp32", True) == 0  # frozen: only the weight is needed
    # bf16 autocast: the frozen weight is cast once per call and that copy is saved for the input's gradient
    per_img, per_call = per_image_and_call(lin, lambda m, x: m(x), lambda n: (n, 8), "bf16", True)
    assert (per_img, per_call) == (0, 16 * 8 * 2)


def test_checkpointing_bf16_and_explicit_attention_change_activations():
    cfg = load_config(None, TINY)
    fp32, fp32_ck, bf16, bf16_ck = estimate_all(cfg)
    assert fp32_ck.components["student_activations"] < fp32.components["student_activations"] / 5
    assert bf16.components["student_activations"] < fp32.components["student_activations"]
    # fp32 copies nothing per call except each LoRAQKV's (T*r, 3*dim) up-projection matrix, which its addmm_ keeps
    lora = [m for m in _meta_objective(cfg).student["backbone"].modules() if isinstance(m, LoRAQKV)]
    up_bytes = sum(m.lora_A.shape[0] * m.rank * m.out_features * 4 for m in lora)
    assert lora and up_bytes <= fp32.components["autocast_weight_copies"] < up_bytes + 1024
    assert bf16.components["autocast_weight_copies"] > up_bytes + 1024  # + the frozen weights' bf16 copies
    explicit = estimate_pretrain_memory(cfg, fused_attention=False)
    extra = explicit.components["student_activations"] - fp32.components["student_activations"]
    assert extra > 0  # explicit attention keeps its (heads, T, T) probabilities instead of out + logsumexp


def test_frozen_blocks_below_first_trainable_keep_nothing():
    base = TINY + ["adapt.preset=null", "adapt.unfrozen_blocks=[-1]", "adapt.lora_rank=0", "adapt.train_norms=false",
                   "dinov2.n_local=0"]
    last_only = estimate_pretrain_memory(load_config(None, base))
    lora_all = estimate_pretrain_memory(load_config(None, TINY + ["dinov2.n_local=0"]))
    # the mask token trains, so global crops need grads through every block either way; but frozen LayerNorms and
    # no LoRA keep less per block than trainable norms + LoRA
    assert last_only.components["student_activations"] < lora_all.components["student_activations"]


def test_rejects_mae_and_bad_precision():
    with pytest.raises(ConfigError, match="DinoV2"):
        estimate_pretrain_memory(load_config(None, TINY + ["objective=mae"]))
    with pytest.raises(ConfigError, match="precision"):
        estimate_pretrain_memory(load_config(None, TINY), precision="fp16")


MEASURE = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    from explora.recipes.pretrain import load_config, build_objective
    from explora.engine.optim import build_optimizer, build_param_groups
    from explora.engine.step import forward_backward

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    cfg = load_config(None, sys.argv[1:])
    obj = build_objective(cfg).train()
    groups = build_param_groups(obj.named_parameters(), num_layers=len(obj.student["backbone"].blocks))
    opt = build_optimizer(groups, (0.9, 0.999), fused=True)
    g = torch.Generator().manual_seed(0)
    tf = obj.batch_transform()
    size = cfg.dinov2["global_size"]
    imgs = torch.rand(cfg.train.batch_size, 3, size, size, generator=g)
    batch, small = tf(imgs, g), tf(imgs[:2], g)
    cpu = torch.device("cpu")
    forward_backward(obj, obj, small, 0, cfg.train.precision, cpu)  # warm-up: kernels, thread pools, autograd
    opt.zero_grad(set_to_none=True)
    base = kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    for step in range(2):
        forward_backward(obj, obj, batch, step, cfg.train.precision, cpu)
        opt.step()
        opt.zero_grad(set_to_none=True)
        obj.on_optimizer_step(step)
    print(json.dumps({"increase": (kib("VmHWM:") - base) * 1024}))
''')


# the DINOv3 layout (timm Eva: RoPE in every block, cls + 4 registers, patch 16) at the same token counts
TINY_DINOV3 = [a.replace("test_dinov2", "test_dinov3") for a in TINY if "_size=" not in a] + [
    "dinov2.global_size=128", "dinov2.local_size=64"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("split,base", [("view", TINY), ("crop_size", TINY), ("none", TINY), ("view", TINY_DINOV3)])
def test_predicted_peak_matches_measured_rss(tmp_path, split, base):
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    args = [*base, f"dinov2.split_backward={split}"]
    # a fixed mmap threshold makes glibc return every freed large buffer, so RSS follows live tensor memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["increase"]
    r = estimate_pretrain_memory(load_config(None, args))
    assert r.details["split_backward"] == split
    present_before = ("frozen_weights", "trainable_weights", "head_weights", "teacher_ema_copies", "buffers", "batch")
    predicted = r.peak - sum(r.components[k] for k in present_before)
    # activations are the largest part of this run (45 of 93 MiB with view since LoRAQKV adds its update as a slice)
    assert r.components["student_activations"] > 0.4 * predicted
    assert max(r.peak_components, key=r.components.get) == "student_activations"
    print(f"predicted {predicted / MIB:.1f} MiB, measured {measured / MIB:.1f} MiB")
    assert abs(measured / predicted - 1) < 0.2


def test_params_cli_memory_json(capsys):
    import argparse

    from explora.cli.export import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["params", "--model", "test_dinov2", "--memory", "--json", *TINY[2:]])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["all"]) == 4 and out["configured"]["precision"] == "fp32"
    assert out["configured"]["peak_bytes"] == sum(out["configured"]["components_bytes"][k]
                                                  for k in out["configured"]["peak_components"])


def test_separate_ibot_head_activations_follow_its_own_sizes():
    """The masked patch rows go through the iBOT head: a separate head of the DINO head's sizes costs what the shared
    one does, a wider one (DinoV2's ViT-L recipe gives it its own sizes) costs more, per row."""
    def head_acts(*extra: str) -> int:
        return estimate_pretrain_memory(load_config(None, [*TINY, "dinov2.split_backward=none", *extra])).components[
            "head_activations"]

    shared = head_acts()
    same = head_acts("dinov2.separate_head=true")
    wide = head_acts("dinov2.separate_head=true", "dinov2.ibot_hidden_dim=1024", "dinov2.ibot_bottleneck_dim=128")
    assert same == shared and wide > same
