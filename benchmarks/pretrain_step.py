"""One ExPLoRA pre-training step, ours vs the straightforward implementation a user would write today.

OURS (``--objective dinov2``): ``build_backbone`` + ``apply_explora`` preset D-[L]-r64 (rank from ``--rank``) +
``DinoV2Objective`` + the engine's fused AdamW parameter groups + grad clipping + the objective's EMA.
BASELINE: timm ViT + peft LoRA on the *fused* ``qkv`` (every block but the unfrozen last one) + ``copy.deepcopy``
teacher with an EMA over *all* its parameters + the same DINO/iBOT/KoLeo loss modules + plain ``torch.optim.AdamW``.

``--objective mae``: ours = preset M-[1,L] + ``MAEObjective``; baseline = timm + peft LoRA on fused qkv + the plain
MAE decoder of MAE's ``models_mae.py`` written out with timm ``Block``s (``PlainMAEDecoder`` below).

Inputs are pre-made crop tensors (the batch transform runs once, outside the timing), so data is not measured.
Every variant runs in its own subprocess (separate peak RSS); variants are interleaved round by round and the
medians over all timed steps are reported with the FLOPs of one step (``FlopCounterMode``) and the fraction of
the machine's measured matmul peak (``benchmarks/matmul_peak.py``) at the step's precision.

Run: ``python benchmarks/pretrain_step.py --model test_dinov2 --global-size 32 --local-size 16`` -> JSON on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine  # noqa: E402,F401  (finetune_step.py and features.py import it from here)
from targets import PRETRAIN_TARGETS, step_targets  # noqa: E402


# -- shared helpers (finetune_step.py and features.py import these) ---------------------------------------------
def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident set size now (``VmRSS``), in MiB."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024


def import_runtime() -> float:
    """Import every library any variant uses (torch, timm, peft, explora), then return the RSS.

    Both variants then start from the same runtime, and ``peak - runtime`` is the memory the step itself needs
    (the CPU analogue of ``torch.cuda.max_memory_allocated``, which leaves out the CUDA context and libraries).
    """
    import peft  # noqa: F401
    import timm  # noqa: F401

    import explora.engine.optim  # noqa: F401
    import explora.models.adapt  # noqa: F401
    import explora.objectives.dinov2  # noqa: F401
    import explora.objectives.mae  # noqa: F401

    return current_rss_mib()


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention) by torch's ``FlopCounterMode``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def linear_shapes(fn: Callable[[], object]) -> list[list[int]]:
    """``[rows, in, out, calls]`` of every ``nn.Linear`` module called during one call of ``fn`` (rows: the
    input's leading dimensions flattened), for the matmul peak at the step's own shapes."""
    seen: dict[tuple[int, int, int], int] = {}

    def hook(module, inputs):  # noqa: ANN001, ANN202
        if isinstance(module, torch.nn.Linear) and inputs and torch.is_tensor(inputs[0]):
            key = (inputs[0].numel() // module.in_features, module.in_features, module.out_features)
            seen[key] = seen.get(key, 0) + 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        fn()
    finally:
        handle.remove()
    return [[*k, n] for k, n in sorted(seen.items())]


def time_steps(step: Callable[[int], object], steps: int, warmup: int) -> list[float]:
    """Wall time of each of ``steps`` calls after ``warmup`` untimed ones."""
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    return times


def run_worker(script: str, variant: str, argv: list[str], timeout: float | None = None) -> dict:
    """Run ``script --worker variant argv`` in a fresh interpreter and parse the JSON line it prints last."""
    cmd = [sys.executable, script, "--worker", variant, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleaved_runs(script: str, variants: list[str], argv: list[str], rounds: int) -> dict[str, list[dict]]:
    """``rounds`` rounds of one fresh worker per variant, the variants alternating within each round, so that load
    from other users of a shared machine hits every variant alike. Returns each variant's worker reports."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            runs[v].append(run_worker(script, v, argv))
    return runs


def summarise(runs: list[dict], items_per_step: int, peak_gflops: float | None,
              shape_peak: dict | None = None) -> dict:
    """Medians over all timed steps of all rounds of one variant. ``peak_gflops``: the large-square matmul peak;
    ``shape_peak``: :func:`matmul_peak.measure_linear_shapes_peak` at this variant's own linear shapes (both at the
    workers' thread count)."""
    times = [t for r in runs for t in r["times"]]
    s = statistics.median(times)
    flops = runs[0]["flops"]
    out = {
        "s_per_step": round(s, 4),
        "s_per_step_rounds": [round(statistics.median(r["times"]), 4) for r in runs],
        "images_per_s": round(items_per_step / s, 3),
        "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
        "runtime_rss_mib": round(max(r.get("runtime_rss_mib", 0.0) for r in runs), 1),
        "step_memory_mib": round(max(r["peak_rss_mib"] - r.get("runtime_rss_mib", 0.0) for r in runs), 1),
        "gflop_per_step": round(flops / 1e9, 3),
        "achieved_gflops": round(flops / s / 1e9, 3),
    }
    if peak_gflops:
        out["fraction_of_matmul_peak"] = round(flops / s / 1e9 / peak_gflops, 3)
    if shape_peak and shape_peak.get("gflops"):
        out["step_shape_peak_gflops"] = shape_peak["gflops"]
        out["fraction_of_step_shape_peak"] = round(flops / s / 1e9 / shape_peak["gflops"], 3)
    if "trainable_params" in runs[0]:
        out["trainable_params"] = runs[0]["trainable_params"]
    if "memory_choice" in runs[0]:
        out["memory_choice"] = runs[0]["memory_choice"]
    return out


def compare(results: dict[str, dict], ours: str = "ours", base: str = "baseline") -> dict:
    """Speed-up (baseline time / ours time) and memory ratio (ours peak RSS / baseline peak RSS)."""
    a, b = results[ours], results[base]
    return {
        "speedup": round(b["s_per_step"] / a["s_per_step"], 3),
        "speedup_per_round": [round(y / x, 3) for x, y in zip(a["s_per_step_rounds"], b["s_per_step_rounds"])],
        "peak_rss_ratio": round(a["peak_rss_mib"] / b["peak_rss_mib"], 3),
        "step_memory_ratio": round(a["step_memory_mib"] / b["step_memory_mib"], 3),
    }


def matmul_peak(precision: str, size: int = 1024, budget_s: float = 6.0) -> float:
    """The machine's measured matmul GFLOP/s at ``precision`` (benchmarks/matmul_peak.py)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from matmul_peak import measure_matmul_peak

    return measure_matmul_peak(PRECISIONS[precision], size=size, repeats=10, budget_s=budget_s)


def peaks(args, runs: dict[str, list[dict]]) -> tuple[float | None, dict[str, dict], dict]:
    """Both rooflines, measured by the parent after the workers at the workers' thread count (``--threads``; 0:
    torch's default, as in the workers): the ``--peak-size`` square matmul peak, and per variant the peak at the
    linear shapes its worker recorded; and the copy bandwidth (the memory roofline). Returns (square GFLOP/s,
    per-variant shape peaks, the JSON record)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_peak:
        return None, {}, {"threads": torch.get_num_threads(), "square": None, "step_shapes": None}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from matmul_peak import measure_copy_bandwidth, measure_linear_shapes_peak

    square = matmul_peak(args.precision, args.peak_size)
    bandwidth = measure_copy_bandwidth()
    shaped = {v: measure_linear_shapes_peak(r[0]["linear_shapes"], PRECISIONS[args.precision], budget_s=4.0)
              for v, r in runs.items() if r and r[0].get("linear_shapes")}
    record = {"threads": torch.get_num_threads(), "square": {"size": args.peak_size, "gflops": round(square, 2)},
              "step_shapes": shaped, "copy_bandwidth_gbs": round(bandwidth, 1),
              "ridge_flop_per_byte": round(square / bandwidth, 1)}  # below this intensity work is memory-bound
    return square, shaped, record


def autocast(precision: str):
    """The engine's autocast (``explora.core.precision``) on this run's device."""
    from explora.core.precision import autocast as engine_autocast

    return engine_autocast(precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def plain_timm_vit(model: str, img_size: int, **extra) -> nn.Module:
    """The baselines' backbone: a plain timm ViT (registry short names map to their timm name and kwargs)."""
    import timm

    from explora.models.registry import get_backbone_spec

    try:
        spec = get_backbone_spec(model)
        name, kw = spec.timm_name, dict(spec.timm_kwargs)
    except Exception:  # any timm name
        name, kw = model, {}
    kw.pop("img_size", None)
    return timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **extra, **kw)


def n_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# -- DinoV2 -----------------------------------------------------------------------------------------------------
def _dinov2_cfg(args):
    from explora.objectives.dinov2 import DinoV2Config

    return DinoV2Config(n_prototypes=args.prototypes, global_size=args.global_size, local_size=args.local_size,
                        n_local=args.n_local)


def _dinov2_batch(args, patch: int) -> dict[str, torch.Tensor]:
    """Pre-made multi-crop + masks from a fixed uint8 batch (made once, outside the timing)."""
    from explora.data.multicrop import MultiCrop
    from explora.objectives.dinov2.masking import BlockMaskSampler
    from explora.objectives.dinov2.objective import DinoV2BatchTransform

    cfg = _dinov2_cfg(args)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, 2 * args.global_size, 2 * args.global_size),
                           dtype=torch.uint8, generator=g)
    mc = MultiCrop(cfg.global_size, cfg.local_size, cfg.n_local, cfg.global_scale, cfg.local_scale, cfg.mean,
                   cfg.std, cfg.photometric, blur_p=cfg.blur_p)
    masks = BlockMaskSampler(cfg.global_size // patch, cfg.mask_probability, cfg.mask_ratio_min_max)
    return DinoV2BatchTransform(mc, masks)(images, g)


def _backbone(args, img_size: int) -> nn.Module:
    from explora.models.backbone import build_backbone

    return build_backbone(args.model, img_size=img_size)


def _engine_step(obj: nn.Module, batch: dict, precision: str, *, depth: int, layer_decay: float,
                 patch_embed_lr_mult: float, betas: tuple[float, float], weight_decay: float,
                 ema: bool, device: torch.device | None = None) -> Callable[[int], None]:
    """One optimisation step as the engine takes it: the objective's backward stages, DinoV2-style groups, fused
    AdamW, clip 3.0 (+ EMA update). ``obj`` and ``batch`` are on ``device`` (default: CUDA if present, else CPU)."""
    from explora.engine.optim import build_optimizer, build_param_groups

    groups = build_param_groups(obj.named_parameters(), num_layers=depth, layer_decay=layer_decay,
                                patch_embed_lr_mult=patch_embed_lr_mult)
    opt = build_optimizer(groups, betas, fused=True)
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 1e-4 * g["lr_multiplier"], weight_decay * g["wd_multiplier"]
    params = [p for g in groups for p in g["params"]]
    obj.train()

    from explora.engine.step import forward_backward

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def step(i: int) -> None:
        forward_backward(obj, obj, batch, i, precision, device)  # the objective's stages (split backward)
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema:
            obj.on_optimizer_step(i)

    return step


MEMORY_CHOICE: dict = {}  # the auto choice of the variant this worker built (reported in its JSON)


def auto_memory_choice(args, available: int | None = None) -> dict:
    """What ``dinov2.split_backward: auto`` picks for this setting on this machine, by ``explora pretrain``'s rule
    (``explora.recipes.memory.auto_choice``) on the available memory, or on ``available`` bytes when given."""
    from explora.recipes.memory import auto_choice, available_memory
    from explora.recipes.pretrain import load_config

    cfg = load_config(None, [
        f"model.name={args.model}", "model.weights=null", f"train.batch_size={args.batch_size}",
        f"train.precision={args.precision}", "adapt.preset=D-[L]-r64", f"adapt.lora_rank={args.rank}",
        f"dinov2.global_size={args.global_size}", f"dinov2.local_size={args.local_size}",
        f"dinov2.n_local={args.n_local}", f"dinov2.n_prototypes={args.prototypes}"])
    if available is None:
        available, source = available_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        source = f"{available / 2**30:.1f} GiB given"
    return auto_choice(cfg, available, precision=args.precision, source=source)


def ours_dinov2(args, split_backward: str | None = None) -> tuple[nn.Module, Callable[[int], None], dict]:
    """Our step: apply_explora + DinoV2Objective + engine param groups + fused AdamW + clip + EMA.

    ``split_backward``: None resolves the library default ``auto`` as ``explora pretrain`` does (the fastest setting
    whose predicted peak fits this machine's memory, gradient checkpointing included); ``ours_view`` passes
    ``view`` (crops back-propagated view by view), ``ours_joint`` passes ``none`` (one backward over all crops).
    """
    from explora.models.adapt import apply_explora, preset_options
    from explora.objectives.dinov2 import DinoV2Objective

    checkpointing = False
    if split_backward is None:
        MEMORY_CHOICE.update(auto_memory_choice(args))
        split_backward, checkpointing = MEMORY_CHOICE["split_backward"], MEMORY_CHOICE["grad_checkpointing"]
    torch.manual_seed(0)
    backbone = _backbone(args, args.global_size)
    if checkpointing:
        backbone.set_grad_checkpointing(True)
    apply_explora(backbone, **preset_options("D-[L]-r64", lora_rank=args.rank))
    cfg = _dinov2_cfg(args)
    cfg.split_backward = split_backward
    obj = DinoV2Objective(backbone, cfg, total_steps=10_000)
    batch = _dinov2_batch(args, obj.patch_size)
    step = _engine_step(obj, batch, args.precision, depth=len(backbone.blocks), layer_decay=0.9,
                        patch_embed_lr_mult=0.2, betas=(0.9, 0.999), weight_decay=0.04, ema=True)
    return obj, step, batch


def _peft_lora(vit: nn.Module, blocks: list[int], rank: int) -> nn.Module:
    """peft LoRA on the fused ``attn.qkv`` of ``blocks`` (peft cannot target q/v slices of a fused layer)."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                     target_modules=[f"blocks.{i}.attn.qkv" for i in blocks])
    return inject_adapter_in_model(cfg, vit)


def _baseline_freeze(vit: nn.Module, unfrozen: list[int]) -> None:
    """Freeze everything, then unfreeze the given blocks and every LayerNorm (LoRA params stay trainable)."""
    for n, p in vit.named_parameters():
        p.requires_grad_("lora_" in n)
    for i in unfrozen:
        vit.blocks[i].requires_grad_(True)
    for m in vit.modules():
        if isinstance(m, nn.LayerNorm):
            m.requires_grad_(True)


def baseline_dinov2(args) -> tuple[nn.Module, Callable[[int], None], dict]:
    """timm + peft LoRA on fused qkv + deepcopy EMA teacher over all parameters + our losses + plain AdamW."""

    from explora.objectives.dinov2.centering import EMACenter
    from explora.objectives.dinov2.heads import DINOHead
    from explora.objectives.dinov2.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
    from explora.objectives.dinov2.objective import teacher_temperature
    from explora.vit.tokens import forward_tokens

    cfg = _dinov2_cfg(args)
    torch.manual_seed(0)
    vit = plain_timm_vit(args.model, args.global_size, dynamic_img_size=True)
    depth = len(vit.blocks)
    vit = _peft_lora(vit, list(range(depth - 1)), args.rank)
    _baseline_freeze(vit, [depth - 1])
    student = nn.ModuleDict({"backbone": vit, "head": DINOHead(vit.embed_dim, cfg.n_prototypes, cfg.hidden_dim,
                                                                 cfg.bottleneck_dim, cfg.head_nlayers)})
    mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim))
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    s_all, t_all = list(student.parameters()), list(teacher.parameters())
    params = [p for p in student.parameters() if p.requires_grad] + [mask_token]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04)
    dino, ibot, koleo = DINOLoss(cfg.student_temp), iBOTPatchLoss(cfg.student_temp), KoLeoLoss()
    c_cls, c_patch = EMACenter(cfg.n_prototypes), EMACenter(cfg.n_prototypes)
    batch = _dinov2_batch(args, vit.patch_embed.patch_size[0])
    student.train()
    glob, local, masks = batch["global"], batch["local"], batch["masks"].bool()
    n_local = args.n_local

    def step(i: int) -> None:
        temp = teacher_temperature(cfg, i)
        with autocast(args.precision):
            with torch.no_grad():
                t_cls, t_patch = forward_tokens(teacher["backbone"], glob)
                t_cls = torch.cat(t_cls.chunk(2)[::-1])
                t_logits, tp_logits = teacher["head"](t_cls), teacher["head"](t_patch[masks])
                t_probs = c_cls.softmax_centered(t_logits, temp)
                c_cls.update(t_logits)
                tp_probs = c_patch.softmax_centered(tp_logits, temp)
                c_patch.update(tp_logits)
            s_cls, s_patch = forward_tokens(vit, glob, masks, mask_token)
            l_cls, _ = forward_tokens(vit, local)
            n_pairs = 2 * n_local + 2
            loss = (dino(student["head"](s_cls), t_probs, 1, 1) * 2 / n_pairs
                    + dino(student["head"](l_cls), t_probs, n_local, 2) / n_pairs
                    + ibot(student["head"](s_patch[masks]), tp_probs, masks)
                    + 0.1 * sum(koleo(c) for c in s_cls.chunk(2)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # EMA over every teacher parameter, one tensor at a time
            m = 0.994
            for s, t in zip(s_all, t_all):
                t.mul_(m).add_(s.detach(), alpha=1 - m)

    return nn.ModuleList([student, teacher]), step, batch


# -- MAE --------------------------------------------------------------------------------------------------------
class PlainMAEDecoder(nn.Module):
    """The decoder of MAE's ``models_mae.py`` (He et al. 2022) as a user writes it: embed, mask tokens,
    un-shuffle, learned position embeddings, timm ``Block``s, norm, pixel head."""

    def __init__(self, embed_dim: int, n_patches: int, patch: int, chans: int = 3, dim: int = 512, depth: int = 8,
                 heads: int = 16) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, 4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch * patch * chans)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)  # (B, 1 + K, d)
        B, N = ids_restore.shape
        fill = self.mask_token.expand(B, N + 1 - x.shape[1], -1)  # (B, N - K, d)
        x_ = torch.cat([x[:, 1:], fill], dim=1)  # (B, N, d) shuffled order
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # un-shuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.pos  # (B, 1 + N, d)
        return self.pred(self.norm(self.blocks(x)))[:, 1:]  # (B, N, p*p*C)


def _mae_batch(args, patch: int) -> dict[str, torch.Tensor]:
    from explora.objectives.mae.objective import MAEBatchTransform

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.global_size, args.global_size), dtype=torch.uint8,
                           generator=g)
    return MAEBatchTransform(img_size=args.global_size, patch_size=patch)(images, g)


def ours_mae(args) -> tuple[nn.Module, Callable[[int], None], dict]:
    """Our MAE step: apply_explora M-[1,L] (rank from ``--rank``) + MAEObjective + engine fused AdamW + clip."""
    import warnings

    from explora.models.adapt import apply_explora, preset_options
    from explora.objectives.mae import MAEConfig, MAEObjective

    torch.manual_seed(0)
    backbone = _backbone(args, args.global_size)
    apply_explora(backbone, **preset_options("M-[1,L]-r32", lora_rank=args.rank))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = MAEObjective(backbone, MAEConfig(mask_ratio=args.mask_ratio, img_size=args.global_size))
    batch = _mae_batch(args, obj.patch_size)
    step = _engine_step(obj, batch, args.precision, depth=len(backbone.blocks), layer_decay=1.0,
                        patch_embed_lr_mult=1.0, betas=(0.9, 0.95), weight_decay=0.05, ema=False)
    return obj, step, batch


def baseline_mae(args) -> tuple[nn.Module, Callable[[int], None], dict]:
    """timm + peft LoRA on fused qkv (blocks 1..L-2) + first/last block + norms + plain MAE decoder + AdamW."""

    from explora.objectives.mae.loss import masked_mse, normalize_patches, patchify
    from explora.objectives.mae.masking import gather_tokens, random_masking

    torch.manual_seed(0)
    vit = plain_timm_vit(args.model, args.global_size)
    depth, patch = len(vit.blocks), vit.patch_embed.patch_size[0]
    vit = _peft_lora(vit, list(range(1, depth - 1)), args.rank)
    _baseline_freeze(vit, [0, depth - 1])
    n = (args.global_size // patch) ** 2
    dec = PlainMAEDecoder(vit.embed_dim, n, patch)
    model = nn.ModuleDict({"encoder": vit, "decoder": dec})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    batch = _mae_batch(args, patch)
    images, noise = batch["images"], batch["noise"]
    model.train()

    def step(i: int) -> None:
        with autocast(args.precision):
            mask = random_masking(noise, args.mask_ratio)
            x = vit._pos_embed(vit.patch_embed(images))  # (B, 1 + N, D)
            x = torch.cat([x[:, :1], gather_tokens(x[:, 1:], mask.ids_keep)], 1)
            latent = vit.norm(vit.blocks(x))
            pred = dec(latent, mask.ids_restore)
            loss = masked_mse(pred, normalize_patches(patchify(images, patch), 1e-6), mask.mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, batch


def ours_joint_dinov2(args) -> tuple[nn.Module, Callable[[int], None], dict]:
    """Our step with one joint backward over all crops (``dinov2.split_backward: none``)."""
    return ours_dinov2(args, split_backward="none")


def ours_view_dinov2(args) -> tuple[nn.Module, Callable[[int], None], dict]:
    """Our step back-propagated view by view (``dinov2.split_backward: view``, the lowest-memory split)."""
    return ours_dinov2(args, split_backward="view")


def ours_compile_dinov2(args) -> tuple[nn.Module, Callable[[int], None], dict]:
    """Our step (``auto``'s choice) with every block of student and teacher compiled in place (``model.compile:
    true``, ``explora.recipes.pretrain.compile_blocks``); give ``--warmup 2``: both crop shapes compile first."""
    from explora.recipes.pretrain import compile_blocks

    obj, step, batch = ours_dinov2(args)
    compile_blocks(obj)
    return obj, step, batch


VARIANTS = {("dinov2", "ours"): ours_dinov2, ("dinov2", "ours_compile"): ours_compile_dinov2,
            ("dinov2", "baseline"): baseline_dinov2, ("dinov2", "ours_joint"): ours_joint_dinov2,
            ("dinov2", "ours_view"): ours_view_dinov2, ("mae", "ours"): ours_mae, ("mae", "baseline"): baseline_mae}


def worker(args) -> dict:
    """Build one variant, count one step's FLOPs, time ``--steps`` steps after ``--warmup``; report."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    runtime = import_runtime()
    module, step, _ = VARIANTS[(args.objective, args.worker)](args)
    times = time_steps(step, args.steps, args.warmup)
    peak = peak_rss_mib()  # before the FLOP count, whose dispatch mode keeps its own bookkeeping
    flops = count_flops(lambda: step(10_000))  # counted after timing: FlopCounterMode slows the step it watches
    out = {"times": times, "flops": flops, "peak_rss_mib": peak, "runtime_rss_mib": runtime,
           "trainable_params": n_trainable(module), "linear_shapes": linear_shapes(lambda: step(10_001))}
    if MEMORY_CHOICE:
        out["memory_choice"] = dict(MEMORY_CHOICE)
    return out


def items_per_step(args) -> int:
    return args.batch_size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objective", choices=["dinov2", "mae"], default="dinov2")
    ap.add_argument("--model", default=None, help="registry short name or timm name (default: vit_small_patch14_"
                    "dinov2 for dinov2, vit_base_patch16_224 for mae)")
    ap.add_argument("--global-size", type=int, default=None, help="global crop (MAE: image) size; default 112 / 224")
    ap.add_argument("--local-size", type=int, default=56)
    ap.add_argument("--n-local", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--prototypes", type=int, default=4096)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved ours/baseline rounds (one subprocess each)")
    ap.add_argument("--variants", nargs="+", default=["ours", "baseline"],
                    choices=["ours", "baseline", "ours_joint", "ours_view", "ours_compile"],
                    help="ours: dinov2.split_backward auto (resolved for this machine); ours_joint (dinov2): "
                    "split_backward none; ours_view: split_backward view; ours_compile: ours with every block "
                    "compiled (model.compile)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch default; use 1 "
                    "on a shared machine: with 2 threads on 2 busy cores every op waits for a descheduled thread)")
    ap.add_argument("--peak-size", type=int, default=1024, help="matrix side of the matmul-peak measurement")
    ap.add_argument("--no-peak", action="store_true", help="skip the matmul-peak measurement")
    ap.add_argument("--worker", choices=["ours", "baseline", "ours_joint", "ours_view", "ours_compile"],
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model is None:
        args.model = "vit_small_patch14_dinov2" if args.objective == "dinov2" else "vit_base_patch16_224"
    if args.global_size is None:
        args.global_size = 112 if args.objective == "dinov2" else 224
    return args


def forward_argv(args, parent_only: tuple[str, ...] = ("variants", "peak_size", "no_peak")) -> list[str]:
    """The worker's command line: every option except ``worker``, ``rounds`` and the other ``parent_only`` ones."""
    skip = {"worker", "rounds", *parent_only}
    out = []
    for k, v in vars(args).items():
        if k in skip or v is None or v is False:
            continue
        out += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    return out


def main(argv: list[str] | None = None, script: str = __file__, worker_fn=None, items=None) -> dict:
    """Parent: interleave the variants' subprocesses, then summarise; ``--worker``: run one variant."""
    args = parse_args(argv)
    if args.worker:
        print(json.dumps((worker_fn or worker)(args)))
        return {}
    runs = interleaved_runs(script, args.variants, forward_argv(args), args.rounds)
    peak, shaped, peak_record = peaks(args, runs)  # the rooflines at the workers' thread count
    n_items = (items or items_per_step)(args)
    results = {v: summarise(r, n_items, peak, shaped.get(v)) for v, r in runs.items()}
    report = {"benchmark": os.path.basename(script), "args": {k: v for k, v in vars(args).items() if k != "worker"},
              "machine": machine(), "matmul_peak_gflops": None if peak is None else round(peak, 2),
              "matmul_peak": peak_record, **results}
    if {"ours", "baseline"} <= set(results):
        report["comparison"] = compare(results)
        report["targets"] = step_targets(PRETRAIN_TARGETS[args.objective][args.precision], results,
                                         report["comparison"], args.precision,
                                         ridge_flop_per_byte=peak_record.get("ridge_flop_per_byte"))
    for v in ("ours_joint", "ours_view", "ours_compile"):
        if {v, "baseline"} <= set(results):
            report[f"comparison_{v}"] = compare(results, ours=v)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
