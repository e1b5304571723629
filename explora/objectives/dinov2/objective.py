"""The DinoV2 objective for ExPLoRA: student/EMA-teacher self-distillation with DINO, iBOT and KoLeo losses.

Follows DinoV2's ``dinov2/train/ssl_meta_arch.py`` (student and teacher ``ModuleDict``s with ``backbone``,
``dino_head`` and optional ``ibot_head``; teacher sees only the unmasked global crops; swapped teacher views for
the global DINO term). What ExPLoRA changes: the backbone arrives with most weights frozen, so the teacher is a
deep copy that *shares* every frozen tensor with the student and keeps its own EMA copy of the trainable ones only
(frozen W stays identical in both, LoRA/unfrozen blocks/norms/heads are EMAs).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import numbers
import warnings

import torch
from torch import nn

from explora.core.distributed import full_tensor, local_shards
from explora.core.errors import ConfigError
from explora.core.schedules import cosine, linspace_warmup
from explora.data.multicrop import MultiCrop
from explora.models.params import ParamReport, parameter_report
from explora.models.record import attach_record, record_of
from explora.objectives.base import Objective, ObjectiveOutput
from explora.objectives.dinov2.centering import EMACenter, sinkhorn_knopp
from explora.objectives.dinov2.config import DinoV2Config
from explora.objectives.dinov2.heads import DINOHead
from explora.objectives.dinov2.losses import DINOLoss, GramLoss, KoLeoLoss, iBOTPatchLoss
from explora.objectives.dinov2.masking import BlockMaskSampler
from explora.vit.cast_cache import FrozenWeightCastCache
from explora.vit.tokens import forward_tokens

_log = logging.getLogger(__name__)


class DinoV2BatchTransform:
    """Picklable worker-side transform: multi-crop + iBOT masks -> {'global', 'local', 'masks' (2B, N) bool}."""

    def __init__(self, multicrop: MultiCrop, masks: BlockMaskSampler) -> None:
        self.multicrop, self.masks = multicrop, masks

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = self.multicrop(images, generator)
        out["masks"] = self.masks(out["global"].shape[0], generator)  # (2B, N)
        return out


def teacher_temperature(cfg: DinoV2Config, step: int) -> float:
    """Linear warm-up from ``warmup_teacher_temp`` (step 0) to ``teacher_temp`` (step ``warmup_teacher_temp_steps-1``).

    Upstream (``dinov2/train/train.py``, ``CosineScheduler`` with ``base_value = final_value = teacher_temp``) takes
    ``np.linspace(warmup_teacher_temp, teacher_temp, W)`` over the ``W`` warm-up iterations, so the last warm-up step
    already has ``teacher_temp``; ``W = 0`` means no warm-up.
    """
    return linspace_warmup(step, cfg.warmup_teacher_temp_steps, cfg.warmup_teacher_temp, cfg.teacher_temp)


def teacher_momentum(cfg: DinoV2Config, step: int, total_steps: int) -> float:
    """Cosine schedule from ``momentum_teacher`` (step 0) to ``final_momentum_teacher`` (step ``total_steps``)."""
    return cosine(step, total_steps, cfg.momentum_teacher, cfg.final_momentum_teacher)


def _checked_total_steps(total_steps: int, cfg: DinoV2Config) -> int:
    """``total_steps`` as an int >= 1; warns when the run ends inside the teacher-temperature warm-up."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
        raise ConfigError(f"DinoV2Objective: total_steps must be a positive int (the run's optimiser steps, "
                          f"train.steps), got {total_steps!r}")
    w = cfg.warmup_teacher_temp_steps
    if total_steps < w:
        last = teacher_temperature(cfg, total_steps - 1)
        warnings.warn(f"DinoV2Objective: the run has total_steps={total_steps} optimiser steps, fewer than "
                      f"dinov2.warmup_teacher_temp_steps={w}: the teacher temperature rises from "
                      f"{cfg.warmup_teacher_temp} only to {last:.5g} at the last step and never reaches "
                      f"teacher_temp={cfg.teacher_temp}. Set dinov2.warmup_teacher_temp_steps to at most "
                      f"{total_steps} (0 = no warm-up) if that is not intended.", UserWarning, stacklevel=3)
    return int(total_steps)


def n_loss_terms(n_local: int, n_global: int = 2) -> int:
    """What upstream divides both DINO terms by: ``n_global_crops_loss_terms + n_local_crops_loss_terms``.

    ``ssl_meta_arch.py`` ``forward_backward``: ``(n_global - 1) * n_global + max(n_local * n_global, 1)``, i.e. the
    number of (student crop, other teacher view) pairs, except that with no local crops it is 3, not 2.
    """
    return (n_global - 1) * n_global + max(n_local * n_global, 1)


def _check_crop_sizes(cfg: DinoV2Config, patch: int) -> None:
    """Both crop sizes must be multiples of the patch size (DINOv3's 16: 256/112; DinoV2's 14: 224/98): otherwise
    the patch embedding drops the remainder and the iBOT mask grid (``global_size // patch``) would not be the one
    the model sees."""
    for key in ("global_size", "local_size"):
        size = getattr(cfg, key)
        if size % patch:
            lo, hi = size // patch * patch, -(-size // patch) * patch
            raise ConfigError(f"dinov2.{key}={size} is not a multiple of the backbone's patch size {patch}; "
                              f"use {lo or hi} or {hi}")


class DinoV2Objective(Objective):
    """DinoV2 continued pre-training of an ExPLoRA-parameterised backbone.

    ``student`` holds ``backbone`` (the one passed in), ``dino_head`` and, with ``separate_head``, ``ibot_head``;
    ``teacher`` has the same structure, eval mode, no grads, frozen tensors shared with the student. ``mask_token``
    (1, D) is the trainable iBOT mask embedding, initialised from ``record_of(backbone).mask_token`` when the
    checkpoint carried one, zeros otherwise (DinoV2's init).

    ``total_steps`` (required) is the length of the run in optimiser steps: the teacher momentum's cosine schedule
    ends there (upstream: ``optim.epochs * OFFICIAL_EPOCH_LENGTH``). A run shorter than
    ``cfg.warmup_teacher_temp_steps`` warns: its teacher temperature never reaches ``teacher_temp``.
    """

    name = "dinov2"

    def __init__(self, backbone: nn.Module, cfg: DinoV2Config | None = None, *, total_steps: int) -> None:
        super().__init__()
        self.config = cfg = cfg or DinoV2Config()
        if cfg.split_backward == "auto":  # the recipe resolves it from the memory estimate before building us
            _log.info("dinov2.split_backward: auto without a memory estimate (objective built directly): "
                      "back-propagating view by view, the lowest-memory mode")
            self.config = cfg = dataclasses.replace(cfg, split_backward="view")
        pretrained = [p for p in backbone.parameters() if not p.requires_grad]  # frozen by apply_explora
        self.total_steps = _checked_total_steps(total_steps, cfg)
        dim = backbone.embed_dim
        gain = dict(freeze_weight_norm_gain=cfg.freeze_weight_norm_gain)
        student = nn.ModuleDict({"backbone": backbone, "dino_head": DINOHead(
            dim, cfg.n_prototypes, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_nlayers, **gain)})
        if cfg.separate_head:
            student["ibot_head"] = DINOHead(dim, **cfg.ibot_head_sizes(), **gain)
        init = record_of(backbone).mask_token
        token = init.detach().float().reshape(1, dim).clone() if init is not None else torch.zeros(1, dim)
        self.mask_token = nn.Parameter(token)
        # teacher: deep copy sharing frozen tensors (memo maps each frozen param to itself)
        frozen = {id(p): p for p in student.parameters() if not p.requires_grad}
        teacher = copy.deepcopy(student, memo=dict(frozen))
        names = [n for n, p in student.named_parameters() if p.requires_grad]
        t_params = dict(teacher.named_parameters())
        self._ema_names = names
        for n in names:
            t_params[n].requires_grad_(False)
        teacher.eval()
        self.student, self.teacher = student, teacher
        # DINOv3 Gram anchoring: the Gram teacher is the source model, i.e. this backbone as it arrives (LoRA B = 0),
        # frozen for good: frozen tensors shared, a fixed copy of the ones this run trains
        self.gram_teacher = None
        if cfg.gram_loss_weight > 0:
            self.gram_teacher = copy.deepcopy(backbone, memo={id(p): p for p in pretrained}).requires_grad_(False)
            self.gram_teacher.eval()
            self.gram_loss = GramLoss(cfg.gram_remove_neg)
        self.register_buffer("teacher_mask_token", token.clone())
        # losses and target normalisation
        self.dino_loss, self.ibot_loss, self.koleo_loss = (
            DINOLoss(cfg.student_temp), iBOTPatchLoss(cfg.student_temp), KoLeoLoss())
        self.dino_center = EMACenter(cfg.n_prototypes, cfg.center_momentum)
        self.ibot_center = EMACenter(cfg.ibot_head_sizes()["n_prototypes"] if cfg.separate_head
                                     else cfg.n_prototypes, cfg.center_momentum)
        patch = backbone.patch_embed.patch_size
        self.patch_size = patch[0] if isinstance(patch, tuple | list) else int(patch)
        _check_crop_sizes(cfg, self.patch_size)
        self._cast_cache = FrozenWeightCastCache()  # one bf16 copy of each frozen weight under autocast
        self._kept_targets: tuple | None = None  # (step, teacher targets) between the stages of a split backward
        self.record_frozen(pretrained)  # in the student and, shared, in the teacher; not the heads' fixed gains

    # -- engine contract ---------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DinoV2Objective:
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout / drop-path
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    def batch_transform(self) -> DinoV2BatchTransform:
        cfg = self.config
        multicrop = MultiCrop(cfg.global_size, cfg.local_size, cfg.n_local, cfg.global_scale, cfg.local_scale,
                              cfg.mean, cfg.std, cfg.photometric, blur_p=cfg.blur_p)
        masks = BlockMaskSampler(cfg.global_size // self.patch_size, cfg.mask_probability, cfg.mask_ratio_min_max)
        return DinoV2BatchTransform(multicrop, masks)

    def export_backbone(self) -> nn.Module:
        """The teacher backbone (as DinoV2/ExPLoRA release it), with the EMA mask token in its record."""
        backbone = self.teacher["backbone"]
        token = self.teacher_mask_token.detach().clone()
        attach_record(backbone, dataclasses.replace(record_of(backbone), mask_token=token))
        return backbone

    def parameter_report(self) -> ParamReport:
        """The student backbone per ExPLoRA group; the DINO (and iBOT) head as ``extra``."""
        student = self.student
        return parameter_report(student["backbone"], extra={k: v for k, v in student.items() if k != "backbone"})

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Matching (student, teacher) lists of the trainable tensors, looked up by name (robust to ``.to()``)."""
        s, t = dict(self.student.named_parameters()), dict(self.teacher.named_parameters())
        return [s[n] for n in self._ema_names], [t[n] for n in self._ema_names]

    def clip_groups(self) -> dict[str, list[torch.Tensor]]:
        """One gradient-clipping group per student module, as DinoV2 (``dinov2/train/train.py``: ``for v in
        model.student.values(): v.clip_grad_norm_(clip_grad)``): the backbone with the mask token (a backbone
        parameter upstream), ``dino_head`` and, with ``separate_head``, ``ibot_head``."""
        groups = {name: [p for p in module.parameters() if p.requires_grad] for name, module in self.student.items()}
        if self.mask_token.requires_grad:
            groups["backbone"].append(self.mask_token)
        return groups

    @torch.no_grad()
    def on_optimizer_step(self, step: int) -> None:
        """EMA update of the teacher's trainable tensors (frozen ones are shared, nothing to do)."""
        m = teacher_momentum(self.config, step, self.total_steps)
        s, t = self.ema_pairs()
        if t:  # under FSDP2 both sides are DTensors sharded alike: update shard-to-shard, no gather
            t = local_shards(t)
            torch._foreach_mul_(t, m)
            torch._foreach_add_(t, local_shards([p.detach() for p in s]), alpha=1 - m)
        token = self.mask_token.detach()
        token = full_tensor(token)  # (1, D); a collective under FSDP2
        self.teacher_mask_token.mul_(m).add_(token, alpha=1 - m)

    # -- loss --------------------------------------------------------------------------------------------------
    def _targets(self, logits: torch.Tensor, center: EMACenter, temp: float) -> torch.Tensor:
        if self.config.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.config.sinkhorn_iterations)
        probs = center.softmax_centered(logits, temp)
        center.update(logits)
        return probs

    def _heads(self, net: nn.ModuleDict, cls: list[torch.Tensor], patch: torch.Tensor | None
               ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """DINO head on each CLS batch and the iBOT head on the masked patch tokens (M, D), if any.

        With the shared head (DinoV2's default) all rows go through ONE call: the head is row-wise, so this equals
        separate calls (up to matmul rounding) while its weights are read and cast once and the matmuls are larger.
        """
        sizes = [c.shape[0] for c in cls]
        if self.config.separate_head:
            return (list(net["dino_head"](torch.cat(cls)).split(sizes)),
                    None if patch is None else net["ibot_head"](patch))
        rows = cls if patch is None else [*cls, patch.to(cls[0].dtype)]
        out = net["dino_head"](torch.cat(rows)).split([r.shape[0] for r in rows])
        return list(out[:len(cls)]), None if patch is None else out[-1]

    def stage_plan(self) -> list[tuple[str, int, int]]:
        """The crops of each backward stage as ``(kind, first_view, n_views)``; kind is ``all``, ``local``, ``global``.

        ``split_backward``: ``none`` -> one stage with every crop; ``crop_size`` -> all local crops, then both
        global crops; ``view`` -> local views packed evenly into stages of at most one global view's tokens, then
        each global view alone. Local stages come first and the teacher runs in stage 0; the global crops come last
        because they use every trainable tensor (the mask token, the iBOT head): the last stage is the one DDP
        synchronises, and DDP expects a gradient for every parameter it manages.
        """
        mode, n_local = self.config.split_backward, self.config.n_local
        if mode == "none" or (mode == "crop_size" and not n_local):
            return [("all", 0, 0)]
        if mode == "crop_size":
            return [("local", 0, n_local), ("global", 0, 2)]
        prefix = self.student["backbone"].num_prefix_tokens
        t_global = (self.config.global_size // self.patch_size) ** 2 + prefix
        t_local = (self.config.local_size // self.patch_size) ** 2 + prefix
        n_stages = -(-n_local // max(1, t_global // t_local)) if n_local else 0  # ceil
        sizes = [n_local // n_stages + (i < n_local % n_stages) for i in range(n_stages)]
        starts = [sum(sizes[:i]) for i in range(n_stages)]
        return [("local", a, n) for a, n in zip(starts, sizes)] + [("global", 0, 1), ("global", 1, 1)]

    def backward_stages(self) -> int:
        """Number of forward/backward passes per step (:meth:`stage_plan`); 1 with ``split_backward: none``."""
        return len(self.stage_plan())

    def forward(self, batch: dict[str, torch.Tensor], step: int,  # type: ignore[override]
                stage: int | None = None) -> ObjectiveOutput:
        if stage is not None and not 0 <= stage < self.backward_stages():
            raise ValueError(f"stage must be None or in [0, {self.backward_stages()}), got {stage}")
        with self._cast_cache.under_autocast(batch["global"].device):
            return self._forward(batch, step, stage)

    @torch.no_grad()
    def _teacher_targets(self, glob: torch.Tensor, masks: torch.Tensor, temp: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher probabilities for the CLS of each global crop, views swapped (2B, K), and masked patches (M, K).

        Only the targets leave this function: the teacher's tokens are freed before the student runs.
        """
        t_cls, t_patch = forward_tokens(self.teacher["backbone"], glob)  # (2B, D), (2B, N, D)
        t_cls = torch.cat(t_cls.chunk(2)[::-1])  # swap views: student view v learns from teacher view 1-v
        (t_cls_logits,), t_patch_logits = self._heads(self.teacher, [t_cls], t_patch[masks])  # (2B, K), (M, K)
        return (self._targets(t_cls_logits, self.dino_center, temp),
                self._targets(t_patch_logits, self.ibot_center, temp))

    def _stage_targets_for(self, batch: dict[str, torch.Tensor], step: int, stage: int | None, n_stages: int,
                           temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher targets: computed in the first stage of a step, kept until its last stage."""
        if stage is None or stage == 0:  # the teacher runs once per step, on the unmasked global crops
            targets = self._teacher_targets(batch["global"], batch["masks"].bool(), temp)
            self._kept_targets = (step, *targets) if stage is not None and n_stages > 1 else None
            return targets
        kept = self._kept_targets
        if kept is None or kept[0] != step:
            raise RuntimeError(f"DinoV2Objective: stage {stage} of step {step} called without stage 0 first")
        if stage == n_stages - 1:
            self._kept_targets = None
        return kept[1], kept[2]

    def _forward(self, batch: dict[str, torch.Tensor], step: int, stage: int | None) -> ObjectiveOutput:
        cfg = self.config
        glob, local, masks = batch["global"], batch["local"], batch["masks"].bool()  # (2B,C,G,G) (nB,C,L,L) (2B,N)
        n_img = glob.shape[0]
        B = n_img // 2
        n_local = local.shape[0] // B if n_img else 0
        temp = teacher_temperature(cfg, step)
        plan = self.stage_plan()
        kind, first, n_views = plan[stage] if stage is not None else ("all", 0, 0)
        t_cls_probs, t_patch_probs = self._stage_targets_for(batch, step, stage, len(plan), temp)

        cls_batches, patch = [], None
        if kind in ("all", "global"):  # global views [first, first + n_views) of the 2 (view-major rows)
            g0, g1 = (0, n_img) if kind == "all" else (first * B, (first + n_views) * B)
            g_masks = masks[g0:g1]
            m0 = int(masks[:g0].sum())
            g_patch_probs = t_patch_probs[m0:m0 + int(g_masks.sum())]  # masked rows are in image order
            s_cls, s_patch = forward_tokens(self.student["backbone"], glob[g0:g1], g_masks, self.mask_token)
            cls_batches.append(s_cls)
            patch = s_patch[g_masks]  # (M_stage, D)
        l_views = n_local if kind == "all" else n_views if kind == "local" else 0
        if l_views:
            l0 = 0 if kind == "all" else first * B
            cls_batches.append(forward_tokens(self.student["backbone"], local[l0:l0 + l_views * B])[0])
        logits, s_patch_logits = self._heads(self.student, cls_batches, patch)  # [(g, K)], [(l, K)], (M, K)
        n_pairs = n_loss_terms(n_local)  # (student crop, other teacher view) pairs; 3 without local crops
        terms: dict[str, torch.Tensor] = {}
        loss = logits[0].new_zeros((), dtype=torch.float32)
        if l_views:  # each local crop against both teacher views
            terms["dino_local"] = self.dino_loss(logits[-1], t_cls_probs, l_views, 2) / n_pairs
            loss = loss + cfg.dino_loss_weight * terms["dino_local"]
        elif not n_local:
            terms["dino_local"] = loss.new_zeros(())
        if patch is not None:  # every term is a sum over global views; a view's share is 1/2 of a mean over both
            g_views = s_cls.shape[0] // B
            terms["dino_global"] = self.dino_loss(logits[0], t_cls_probs[g0:g1], 1, 1) * g_views / n_pairs
            terms["ibot"] = self.ibot_loss(s_patch_logits, g_patch_probs, g_masks) * (g_views / 2)
            terms["koleo"] = sum(self.koleo_loss(c) for c in s_cls.chunk(g_views))
            loss = loss + (cfg.dino_loss_weight * terms["dino_global"] + cfg.ibot_loss_weight * terms["ibot"]
                           + cfg.koleo_loss_weight * terms["koleo"])
            if self.gram_teacher is not None:  # a mean over all global crops; this stage's views' share of it
                with torch.no_grad():
                    target = forward_tokens(self.gram_teacher, glob[g0:g1])[1]  # (g, N, D), unmasked crops
                terms["gram"] = self.gram_loss(s_patch, target) * (g_views / 2)
                loss = loss + cfg.gram_loss_weight * terms["gram"]
        if not stage:
            terms.update(teacher_temp=torch.tensor(temp),
                         momentum=torch.tensor(teacher_momentum(cfg, step, self.total_steps)),
                         masked_tokens=torch.tensor(float(masks.sum())))
        return ObjectiveOutput(loss=loss, terms={k: v.detach().float() for k, v in terms.items()})
