"""Peak training memory of an ExPLoRA DinoV2 pre-training run, predicted from its config without allocating it.

Why a prediction and not a trial run: the question "does ViT-L D-[L]-r64 at batch 32 fit in 80 GB, and with
checkpointing?" must be answerable on a laptop. The model of memory (docs/memory.md) has two kinds of terms:

- **static** tensors, counted exactly from the objective built on the ``meta`` device: frozen weights (stored once,
  shared by student and teacher), trainable weights, the teacher's EMA copies of the trainable ones, DINO/iBOT heads,
  buffers, fp32 gradients of the trainable tensors and AdamW's two fp32 moments;
- **activations**: the bytes autograd keeps for backward. Rather than hand-copy per-op rules (which tensors a frozen
  ``Linear`` saves, what SDPA keeps, what autocast copies), each block and the head are *traced* under
  ``FakeTensorMode`` (shapes and dtypes only, no memory, no compute) with ``saved_tensors_hooks``, at 1 and 2 images.
  The difference is the per-image cost; the rest is the per-call cost (bf16 weight copies autocast saves for the
  backward of frozen matmuls, LoRAQKV's (T*r, 3*dim) up-projection matrix, the weight-normalised prototype
  matrix). Blocks whose input needs no gradient (frozen blocks below the first trainable tensor) trace to zero by
  themselves.

Then the peak is static + kept activations of the student on all crops + what lives alongside them (teacher outputs
and targets, the batch) + the largest transient (the loss over K prototypes, one block's backward; with gradient
checkpointing one recomputed block). The teacher forward runs without grad before the student's, so it only adds
transients that are freed before the student's activations exist (reported as its own phase).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from explora.core.errors import ConfigError
from explora.core.precision import resolve_precision
from explora.models.params import ParamReport, gradient_and_moment_bytes
from explora.recipes.pretrain import build_objective

MIB = 1024**2
PRECISIONS = ("fp32", "bf16")


@dataclass
class MemoryReport:
    """Predicted peak memory of one training setting, by component (bytes)."""

    components: dict[str, int]
    peak_components: list[str]  # the components that are alive together at the peak
    precision: str
    grad_checkpointing: bool
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.components[k] for k in self.peak_components)

    @property
    def static(self) -> int:
        return sum(self.components[k] for k in STATIC)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "grad_checkpointing": self.grad_checkpointing,
            "components_bytes": dict(self.components),
            "components_mib": {k: round(v / MIB, 1) for k, v in self.components.items()},
            "peak_components": list(self.peak_components),
            "peak_bytes": self.peak,
            "peak_mib": round(self.peak / MIB, 1),
            "details": dict(self.details),
        }

    def to_markdown(self) -> str:
        title = f"{self.precision}, gradient checkpointing {'on' if self.grad_checkpointing else 'off'}"
        lines = [f"| component ({title}) | MiB |", "|---|---:|"]
        for k, v in self.components.items():
            mark = "" if k in self.peak_components else " (not at peak)"
            lines.append(f"| {k.replace('_', ' ')}{mark} | {v / MIB:,.1f} |")
        lines.append(f"| **predicted peak** | **{self.peak / MIB:,.1f}** |")
        return "\n".join(lines)


STATIC = ("frozen_weights", "trainable_weights", "head_weights", "teacher_ema_copies", "buffers", "gradients",
          "adamw_moments")


# -- tracing ------------------------------------------------------------------------------------------------------
def _fake_copy(module: nn.Module, mode: Any) -> nn.Module:
    """A copy of ``module`` whose parameters/buffers are CPU fake tensors (same shapes, dtypes, requires_grad)."""
    clone = copy.deepcopy(module)
    with mode:
        for m in clone.modules():
            for k, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[k] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
            for k, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[k] = torch.empty(b.shape, dtype=b.dtype)
    return clone


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def saved_bytes(module: nn.Module, fn, shapes: list[tuple[int, ...]], precision: str, requires_grad: bool) -> int:
    """Bytes of the distinct storages autograd saves when ``fn(fake_module, *inputs)`` runs on fake inputs.

    Storages of the module's own parameters (and views of them, e.g. ``weight.t()``) are not counted: they exist
    anyway. Each storage is counted once however many saved views point into it.
    """

    mode = FakeTensorMode()
    fake = _fake_copy(module, mode)
    with mode:
        params = {p.untyped_storage()._cdata for p in fake.parameters()}
        inputs = [torch.empty(s, requires_grad=requires_grad) for s in shapes]
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st._cdata not in params:
                seen[st._cdata] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(precision):
            fn(fake, *inputs)
    return sum(seen.values())


def per_image_and_call(module: nn.Module, fn, shape_of, precision: str, requires_grad: bool) -> tuple[int, int]:
    """(bytes per image, bytes per call) from traces at 1 and 2 images; ``shape_of(n)`` gives the input shape."""
    one = saved_bytes(module, fn, [shape_of(1)], precision, requires_grad)
    two = saved_bytes(module, fn, [shape_of(2)], precision, requires_grad)
    per_image = two - one
    return per_image, max(one - per_image, 0)


def _call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x)


def _block_call(vit: nn.Module, size: int, patch: int):
    """How a block of ``vit`` is called on crops of ``size`` px: ``blk(x)``, or for a RoPE ViT (timm ``Eva``, DINOv3)
    ``blk(x, rope=...)`` with a rotary embedding of the crop's grid, whose q/k rotations keep tensors alive too."""
    rope = getattr(vit, "rope", None)
    if rope is None or not hasattr(rope, "get_embed"):
        return _call
    with torch.device("meta"):
        shape = tuple(rope.get_embed(shape=(size // patch, size // patch)).shape)  # (N, rope_dim)

    def call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x, rope=torch.zeros(shape, dtype=x.dtype))  # a fake tensor under saved_bytes' FakeTensorMode

    return call


# -- the estimate -------------------------------------------------------------------------------------------------
def _tokens(size: int, patch: int, prefix: int) -> int:
    return (size // patch) ** 2 + prefix


def _meta_objective(cfg: Any) -> nn.Module:
    """The configured DinoV2 objective on the meta device (no memory, no weights read), as the run builds it.

    Compilation, gradient checkpointing and the uniform drop-path layout are left out: the estimate models
    checkpointing itself, and the others do not change what a step keeps alive.
    """

    model = replace(cfg.model, weights=None, compile=False, grad_checkpointing=False, drop_path_uniform=False)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # build_objective seeds the global RNG
        return build_objective(replace(cfg, model=model))


def _static(objective: nn.Module) -> dict[str, int]:
    """Exact bytes of parameters (frozen once: the teacher shares them), buffers, grads and AdamW moments."""
    student = {id(p): (n, p) for n, p in objective.named_parameters(prefix="", remove_duplicate=True)
               if not n.startswith("teacher.")}
    out = dict.fromkeys(("frozen_weights", "trainable_weights", "head_weights", "teacher_ema_copies"), 0)
    trainable = 0
    for name, p in student.values():
        b = p.numel() * p.element_size()
        if not p.requires_grad:
            out["frozen_weights"] += b
            continue
        trainable += p.numel()
        out["head_weights" if "_head." in name else "trainable_weights"] += b
    for name, p in objective.named_parameters():
        if name.startswith("teacher.") and id(p) not in student:
            out["teacher_ema_copies"] += p.numel() * p.element_size()
    out["buffers"] = sum(b.numel() * b.element_size() for b in objective.buffers())
    out["gradients"], out["adamw_moments"] = gradient_and_moment_bytes(trainable)  # fp32 parameters
    out["_trainable_params"] = trainable
    return out


def estimate_pretrain_memory(cfg: Any, *, precision: str | None = None, grad_checkpointing: bool | None = None,
                             fused_attention: bool | None = None) -> MemoryReport:
    """Predict the peak memory of one training step of ``cfg`` (a :class:`PretrainConfig`) on one device.

    ``precision`` / ``grad_checkpointing`` default to the config's; ``fused_attention=False`` forces timm's explicit
    attention (the (heads, T, T) attention matrices are then kept), ``None`` keeps timm's choice.
    """
    if cfg.objective != "dinov2":
        raise ConfigError(f"objective: the memory estimate models the DinoV2 objective, got {cfg.objective!r}")
    precision = precision or cfg.train.precision
    if precision == "auto":  # the estimate is for the machine the run will use: assume bf16-capable hardware (GPU)
        precision = "bf16"
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision: got {precision!r}, expected one of {PRECISIONS}")
    ckpt = cfg.model.grad_checkpointing if grad_checkpointing is None else grad_checkpointing
    objective = _meta_objective(cfg)
    dcfg = objective.config
    vit = objective.student["backbone"]
    if fused_attention is not None:
        for blk in vit.blocks:
            blk.attn.fused_attn = fused_attention
    comps = _static(objective)
    n_trainable = comps.pop("_trainable_params")

    B, D, patch, prefix = cfg.train.batch_size, vit.embed_dim, objective.patch_size, vit.num_prefix_tokens
    t_global, t_local = _tokens(dcfg.global_size, patch, prefix), _tokens(dcfg.local_size, patch, prefix)
    groups = [("global", t_global, True, dcfg.global_size)]  # the mask token trains: grads from block 0
    if dcfg.n_local:
        groups.append(("local", t_local, _stem_trains(vit), dcfg.local_size))

    # per crop group: kept activations per image (without / with checkpointing), per-call copies, largest block
    per_group: dict[str, dict[str, int]] = {}
    cache: dict[tuple, tuple[int, int]] = {}
    for gname, tokens, needs_grad, size in groups:
        g = per_group[gname] = dict.fromkeys(("acts", "acts_ckpt", "calls", "block_img", "block_call"), 0)
        call = _block_call(vit, size, patch)
        for blk in vit.blocks:
            needs_grad = needs_grad or any(p.requires_grad for p in blk.parameters())
            key = (_signature(blk), tokens, needs_grad)
            if key not in cache:
                cache[key] = per_image_and_call(blk, call, lambda n, t=tokens: (n, t, D), precision, needs_grad)
            per_img, per_call = cache[key]
            g["acts"] += per_img
            g["calls"] += per_call
            if per_img + per_call > g["block_img"] + g["block_call"]:
                g["block_img"], g["block_call"] = per_img, per_call
            if needs_grad:
                g["acts_ckpt"] += tokens * D * 4  # a checkpointed block keeps only its fp32 input
        norm_img, _ = per_image_and_call(vit.norm, _call, lambda n, t=tokens: (n, t, D), precision, needs_grad)
        g["acts"] += norm_img + 4 * tokens * D
        g["acts_ckpt"] += norm_img + tokens * D * 4  # the final norm's output: heads/KoLeo keep views of it

    # heads: per row (MLP inputs, GELU inputs, logits, fp32 log-softmax) and per call (weight-normalised prototypes);
    # a separate iBOT head (its own sizes: DinoV2's ViT-L recipe) takes the masked patch rows
    temp = dcfg.student_temp

    def head_loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(m(x).float() / temp, dim=-1)

    row, per_head_call = per_image_and_call(objective.student["dino_head"], head_loss, lambda n: (n, D), precision,
                                            True)
    ibot_row, ibot_call = (per_image_and_call(objective.student["ibot_head"], head_loss, lambda n: (n, D), precision,
                                              True) if dcfg.separate_head else (row, per_head_call))
    n_tokens = (dcfg.global_size // patch) ** 2
    n_masked_imgs = int(2 * B * dcfg.mask_probability)
    masked = int(n_masked_imgs * sum(dcfg.mask_ratio_min_max) / 2 * n_tokens)  # expected masked patches M
    K = dcfg.n_prototypes
    K_ibot = (dcfg.ibot_n_prototypes or K) if dcfg.separate_head else K

    # the stages of dinov2.split_backward (DinoV2Objective.stage_plan): each stage's crops back-propagate before
    # the next stage runs, so the peak is that of the largest stage; "none" is one stage with every crop
    plan = objective.stage_plan()

    def stage_components(kind: str, n_views: int) -> dict[str, int]:
        parts = [("global", 2), ("local", dcfg.n_local)] if kind == "all" else [(kind, n_views)]
        parts = [(name, n) for name, n in parts if n]
        head_bytes = loss_bytes = 0
        for name, n in parts:
            m = masked * n // 2 if name == "global" else 0  # masked patches of n global views
            head_bytes += row * n * B + per_head_call  # the CLS rows through the DINO head
            if m:
                head_bytes += ibot_row * m + ibot_call  # the masked patch rows through the iBOT head
            loss_bytes += (n * B * K + m * K_ibot) * 4  # fp32 gradient of the logits
        c = {"head_activations": head_bytes, "loss_transient": loss_bytes}
        largest = max(per_group[name]["block_img"] * n * B + per_group[name]["block_call"] for name, n in parts)
        if ckpt:
            c["student_activations"] = sum(per_group[name]["acts_ckpt"] * n * B for name, n in parts)
            c["recompute_one_block"] = largest
            c["autocast_weight_copies"] = 0
        else:
            c["student_activations"] = sum(per_group[name]["acts"] * n * B for name, n in parts)
            c["autocast_weight_copies"] = sum(per_group[name]["calls"] for name, _ in parts)
        c["backward_working_set"] = largest  # grads w.r.t. one block's activations while it back-propagates
        return c

    per_stage = [stage_components(kind, n) for kind, _, n in plan]
    peak_stage = max(range(len(plan)), key=lambda i: sum(per_stage[i].values()))
    comps.update(per_stage[peak_stage])
    comps["teacher_outputs"] = (2 * B * K + masked * K_ibot) * 4  # fp32 teacher targets, kept for the whole step
    comps["batch"] = 4 * (2 * B * cfg.model.in_chans * dcfg.global_size ** 2
                          + dcfg.n_local * B * cfg.model.in_chans * dcfg.local_size ** 2) + 2 * B * n_tokens
    comps["teacher_forward_transient"] = (per_group["global"]["block_img"] * 2 * B  # own phase, no grad
                                          + per_group["global"]["block_call"])
    # the transients do not coexist: the loss buffers are freed before the blocks back-propagate
    block_phase = ["backward_working_set"] + (["recompute_one_block"] if ckpt else [])
    loss_phase = ["loss_transient"]
    smaller = loss_phase if comps["loss_transient"] < sum(comps[k] for k in block_phase) else block_phase
    at_peak = [k for k in comps if k != "teacher_forward_transient" and k not in smaller]
    return MemoryReport(
        components=comps,
        peak_components=at_peak,
        precision=precision,
        grad_checkpointing=ckpt,
        details={
            "model": cfg.model.name,
            "preset": cfg.adapt.preset,
            "batch_size": B,
            "crops": f"2x{dcfg.global_size} + {dcfg.n_local}x{dcfg.local_size}",
            "tokens_global": t_global,
            "tokens_local": t_local,
            "depth": len(vit.blocks),
            "width": D,
            "heads": vit.blocks[0].attn.num_heads,
            "fused_attention": bool(getattr(vit.blocks[0].attn, "fused_attn", False)),
            "trainable_params": n_trainable,
            "expected_masked_patches": masked,
            "split_backward": dcfg.split_backward,
            "backward_stages": len(plan),
            "peak_stage": "{} views {}..{}".format(*plan[peak_stage][:2], sum(plan[peak_stage][1:]) - 1)
            if plan[peak_stage][0] != "all" else "all crops",
            "n_prototypes": K,
        },
    )


def estimate_all(cfg: Any, fused_attention: bool | None = None) -> list[MemoryReport]:
    """The four settings: fp32 / bf16 autocast, each without and with gradient checkpointing."""
    return [estimate_pretrain_memory(cfg, precision=p, grad_checkpointing=c, fused_attention=fused_attention)
            for p in PRECISIONS for c in (False, True)]


def summary_markdown(reports: list[MemoryReport]) -> str:
    """One line per setting: precision, checkpointing, predicted peak (MiB and GiB)."""
    lines = ["| precision | grad checkpointing | predicted peak MiB | GiB |", "|---|---|---:|---:|"]
    for r in reports:
        lines.append(f"| {r.precision} | {'on' if r.grad_checkpointing else 'off'} | {r.peak / MIB:,.0f} | "
                     f"{r.peak / 1024**3:.1f} |")
    return "\n".join(lines)


def _stem_trains(vit: nn.Module) -> bool:
    """True when a tensor before the first block trains (patch/pos embedding, tokens): block 0's input needs grad."""
    return any(p.requires_grad for n, p in vit.named_parameters() if not n.startswith(("blocks.", "norm.", "fc_norm.")))


def _signature(blk: nn.Module) -> tuple:
    """Blocks with the same structure and trainable set save the same bytes: trace one of each."""
    return tuple((n, tuple(p.shape), p.requires_grad) for n, p in blk.named_parameters()) + (
        bool(getattr(getattr(blk, "attn", None), "fused_attn", False)),)


def objective_report(cfg: Any) -> ParamReport:
    """The parameter report of a pre-training config's objective, built on the meta device (no memory, no weights).

    Heads (DINO/iBOT) or the MAE decoder are reported as ``extra``, outside the paper's backbone count.
    """
    cfg = replace(cfg, model=replace(cfg.model, weights=None))
    with torch.device("meta"):
        objective = build_objective(cfg)
    return objective.parameter_report()


# -- dinov2.split_backward: auto ----------------------------------------------------------------------------------
# The memory-saving settings of a DinoV2 step, fastest first: (split_backward, gradient checkpointing). The split
# backward costs smaller matmuls (measured ~1.2x the joint step's time in bf16 on CPU, docs/performance.md);
# checkpointing recomputes the forward of every block that trains (~1.3x: with LoRA in every block, all of them),
# so it comes after the splits, and joint + checkpointing before a split with checkpointing.
AUTO_SETTINGS: tuple[tuple[str, bool], ...] = (
    ("none", False), ("crop_size", False), ("view", False), ("none", True), ("crop_size", True), ("view", True))
AUTO_MARGIN = 0.2  # keep 20% of the available memory free: allocator fragmentation, the runtime, data workers


def choose_setting(estimates: list[int], available: int, margin: float = AUTO_MARGIN) -> tuple[int, bool]:
    """Index of the first (fastest) estimate that fits ``available * (1 - margin)`` bytes, and whether one fits.

    ``estimates`` are predicted peaks in bytes, fastest setting first. When none fits, the smallest one is chosen
    (the run may still fit: the estimate is an upper bound of what autograd keeps) and ``False`` says so.
    """
    if not estimates:
        raise ValueError("choose_setting: no estimates")
    if not 0 <= margin < 1:
        raise ConfigError(f"memory margin must be in [0, 1), got {margin}")
    budget = available * (1 - margin)
    for i, peak in enumerate(estimates):
        if peak <= budget:
            return i, True
    return min(range(len(estimates)), key=estimates.__getitem__), False


def available_memory(device: torch.device) -> tuple[int, str]:
    """Bytes a run on ``device`` may use, and where the figure comes from.

    CUDA: the device's free memory (``torch.cuda.mem_get_info``). CPU: the machine's ``MemAvailable``
    (``/proc/meminfo``), divided among the processes ``torchrun`` started on this machine (``LOCAL_WORLD_SIZE``).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError) as e:
        raise ConfigError("dinov2.split_backward: auto needs the available memory, and /proc/meminfo has no "
                          f"MemAvailable ({e}); set dinov2.split_backward to none, crop_size or view") from e
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return kib * 1024 // local, "MemAvailable" + (f" / {local} local processes" if local > 1 else "")


def auto_choice(cfg: Any, available: int, *, precision: str, source: str = "given",
                margin: float = AUTO_MARGIN) -> dict[str, Any]:
    """The setting ``dinov2.split_backward: auto`` picks for ``cfg`` with ``available`` bytes, with its estimates.

    Every setting of :data:`AUTO_SETTINGS` is estimated (a user's ``model.grad_checkpointing: true`` is kept:
    then only the settings with checkpointing are candidates); :func:`choose_setting` picks. The record (also
    written to the run's ``run_metadata.json``) holds the choice, every estimate and the budget.
    """
    settings = [s for s in AUTO_SETTINGS if s[1] or not cfg.model.grad_checkpointing]
    estimates = []
    for mode, ckpt in settings:
        mode_cfg = replace(cfg, dinov2={**cfg.dinov2, "split_backward": mode})
        estimates.append(estimate_pretrain_memory(mode_cfg, precision=precision, grad_checkpointing=ckpt).peak)
    i, fits = choose_setting(estimates, available, margin)
    return {
        "split_backward": settings[i][0],
        "grad_checkpointing": settings[i][1],
        "fits": fits,
        "predicted_peak_mib": round(estimates[i] / MIB, 1),
        "available_mib": round(available / MIB, 1),
        "available_source": source,
        "margin": margin,
        "precision": precision,
        "estimates_mib": {f"{m}{' + checkpointing' if c else ''}": round(e / MIB, 1)
                          for (m, c), e in zip(settings, estimates)},
    }


def resolve_auto_memory(cfg: Any, device: torch.device) -> tuple[Any, dict[str, Any] | None]:
    """``cfg`` with ``dinov2.split_backward: auto`` replaced by the choice for ``device`` (and gradient
    checkpointing switched on when the choice needs it), plus the choice's record; ``(cfg, None)`` when there is
    nothing to resolve (MAE, or an explicit split mode)."""
    if cfg.objective != "dinov2" or cfg.dinov2.get("split_backward", "auto") != "auto":
        return cfg, None
    available, source = available_memory(device)
    precision = resolve_precision(cfg.train.precision, device)
    record = auto_choice(cfg, available, precision=precision, source=source)
    resolved = replace(cfg, dinov2={**cfg.dinov2, "split_backward": record["split_backward"]},
                       model=replace(cfg.model, grad_checkpointing=record["grad_checkpointing"]))
    return resolved, record
