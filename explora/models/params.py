"""Trainable-parameter counts per group, in the form the paper reports them.

The paper quotes "pre-training parameters" such as 18.7M for DinoV2 ViT-L ``D-[L]-r64`` and 12.7M for ``[L]``
without LoRA. Those numbers are exactly: every parameter of the unfrozen block(s) + the LoRA A/B matrices + the
norm layers outside the unfrozen blocks (paper-notes §1.2). SSL heads / decoders are *not* included; we report them
separately as ``extra`` so both the paper's figure and the true optimiser size are visible.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from explora.models.adapt import is_norm

GROUPS = ("unfrozen_blocks", "lora", "norms", "embeddings", "other")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class ParamReport:
    """Trainable counts per group; ``paper_count`` is what the paper calls the pre-training parameters."""

    groups: dict[str, int]
    extra: dict[str, int]
    unfrozen_block_indices: list[int]
    backbone_total: int  # parameters of the plain architecture (LoRA excluded)
    lora_total: int  # all LoRA parameters, trainable or not
    frozen_total: int  # backbone + LoRA parameters that do not train

    @property
    def paper_count(self) -> int:
        """Trainable backbone parameters (unfrozen blocks + LoRA + norms + embeddings + other); heads excluded."""
        return sum(self.groups.values())

    @property
    def extra_total(self) -> int:
        return sum(self.extra.values())

    @property
    def trainable_total(self) -> int:
        """Everything the optimiser updates: backbone groups plus heads/extra modules."""
        return self.paper_count + self.extra_total

    @property
    def percentage(self) -> float:
        """Trainable backbone parameters as a percentage of the plain backbone's size."""
        return 100.0 * self.paper_count / max(self.backbone_total, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": dict(self.groups),
            "extra": dict(self.extra),
            "unfrozen_block_indices": list(self.unfrozen_block_indices),
            "trainable_backbone": self.paper_count,
            "trainable_extra": self.extra_total,
            "trainable_total": self.trainable_total,
            "backbone_total": self.backbone_total,
            "lora_total": self.lora_total,
            "frozen_total": self.frozen_total,
            "percentage": round(self.percentage, 4),
        }

    def to_markdown(self) -> str:
        rows = [("group", "trainable params", "millions")]
        blocks = ",".join(str(i) for i in self.unfrozen_block_indices) or "-"
        for g in GROUPS:
            label = f"unfrozen blocks [{blocks}]" if g == "unfrozen_blocks" else g.replace("_", " ")
            rows.append((label, f"{self.groups.get(g, 0):,}", _m(self.groups.get(g, 0))))
        n = self.paper_count
        rows.append(("**trainable backbone (paper count)**", f"**{n:,}**", f"**{_m(n)}**"))
        for name, n in self.extra.items():
            rows.append((f"extra: {name}", f"{n:,}", _m(n)))
        rows.append(("trainable total", f"{self.trainable_total:,}", _m(self.trainable_total)))
        rows.append(("backbone total (LoRA excluded)", f"{self.backbone_total:,}", _m(self.backbone_total)))
        lines = [f"| {a} | {b} | {c} |" for a, b, c in rows]
        lines.insert(1, "|---|---:|---:|")
        lines.append("")
        lines.append(f"Trainable: {self.percentage:.2f}% of the backbone.")
        return "\n".join(lines)


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _norm_param_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        if is_norm(mod):
            prefix = f"{mod_name}." if mod_name else ""
            names.update(prefix + n for n, _ in mod.named_parameters(recurse=False))
    return names


def parameter_report(model: nn.Module, extra: dict[str, nn.Module | nn.Parameter] | None = None) -> ParamReport:
    """Count trainable parameters of a (possibly ExPLoRA-adapted) timm ViT per group.

    A block counts as unfrozen when all of its non-LoRA parameters train; norms inside it are counted with it.
    ``extra`` maps names to other trained modules (DINO/iBOT heads, MAE decoder, mask token, classifier).
    """
    params = list(model.named_parameters())
    norm_names = _norm_param_names(model)

    block_all: dict[int, bool] = {}
    for name, p in params:
        m = _BLOCK_RE.match(name)
        if m and "lora_" not in name:
            i = int(m.group(1))
            block_all[i] = block_all.get(i, True) and p.requires_grad
    unfrozen = sorted(i for i, all_train in block_all.items() if all_train)

    groups = dict.fromkeys(GROUPS, 0)
    backbone_total = lora_total = frozen_total = 0
    for name, p in params:
        n = p.numel()
        is_lora = "lora_" in name
        if is_lora:
            lora_total += n
        else:
            backbone_total += n
        if not p.requires_grad:
            frozen_total += n
            continue
        m = _BLOCK_RE.match(name)
        if is_lora:
            groups["lora"] += n
        elif m and int(m.group(1)) in unfrozen:
            groups["unfrozen_blocks"] += n
        elif name in norm_names:
            groups["norms"] += n
        elif not m:
            groups["embeddings"] += n  # patch_embed, pos_embed, cls/reg tokens, and any other stem tensor
        else:
            groups["other"] += n  # a partly trainable block: not an ExPLoRA setting, shown so it is not hidden

    extra_counts: dict[str, int] = {}
    for key, mod in (extra or {}).items():
        tensors = [mod] if isinstance(mod, nn.Parameter) else list(mod.parameters())
        extra_counts[key] = sum(t.numel() for t in tensors if t.requires_grad)
    return ParamReport(
        groups=groups,
        extra=extra_counts,
        unfrozen_block_indices=unfrozen,
        backbone_total=backbone_total,
        lora_total=lora_total,
        frozen_total=frozen_total,
    )


@dataclass
class MemoryEstimate:
    """Static training memory (bytes): weights, gradients and AdamW moments; activations are not included."""

    weights: int
    gradients: int
    optimizer: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "total": self.total, "notes": list(self.notes)}

    def to_markdown(self) -> str:
        gib = 1024**3
        rows = [(k, getattr(self, k)) for k in ("weights", "gradients", "optimizer", "total")]
        lines = ["| memory | GiB |", "|---|---:|"] + [f"| {k} | {v / gib:.3f} |" for k, v in rows]
        return "\n".join(lines + [""] + self.notes)


def gradient_and_moment_bytes(trainable: int, bytes_per_param: int = 4) -> tuple[int, int]:
    """Bytes of the gradients (parameter dtype, also under autocast) and of AdamW's two fp32 moments (exp_avg,
    exp_avg_sq) of ``trainable`` parameters: the part of training memory both estimates share
    (:func:`memory_estimate` here, ``explora.recipes.memory`` per step)."""
    return trainable * bytes_per_param, 2 * trainable * 4


def memory_estimate(report: ParamReport, bytes_per_param: int = 4, teacher_copy: bool = False) -> MemoryEstimate:
    """Weights (+ an EMA teacher copy of the trainable tensors if asked), fp32 grads and two AdamW moments.

    The static part only, from a parameter count; ``explora.recipes.memory.estimate_pretrain_memory`` predicts a
    whole pre-training step (activations included) from a config."""
    all_params = report.backbone_total + report.lora_total + report.extra_total
    weights = all_params * bytes_per_param
    if teacher_copy:
        weights += report.trainable_total * bytes_per_param
    gradients, optimizer = gradient_and_moment_bytes(report.trainable_total, bytes_per_param)
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        notes=["Activations are not included; they depend on batch size, crops and gradient checkpointing."],
    )
