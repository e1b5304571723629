"""DinoV2Objective against an independent transcription of DinoV2's whole step loss.

The reference below is written in plain torch from upstream's formulas (facebookresearch/dinov2
``dinov2/train/ssl_meta_arch.py`` ``SSLMetaArch.forward_backward``, ``dinov2/loss/dino_clstoken_loss.py``,
``ibot_patch_loss.py``, ``koleo_loss.py``, ``dinov2/data/collate.py``, the teacher schedules of
``dinov2/train/train.py``). It uses none of explora's loss, centering, masking-forward or schedule code: only the
objective's modules (the timm backbones, the heads, the mask token) and its batch. Upstream's structure is kept on
purpose: explicit loops over (student crop, teacher view) pairs, the swap of the teacher's two CLS views, the pair
normalisation ``n_global_crops_loss_terms + n_local_crops_loss_terms``, ``loss_scales = 2`` and
``ibot_loss_scale = 1 / 2``, per-image iBOT weights, KoLeo per global view, the centre used before its update,
Sinkhorn-Knopp without a max shift.

Upstream logs ``ibot_loss / 2`` and ``koleo_weight * koleo / 2``; explora's ``terms`` hold the iBOT loss as it
enters the total (before ``ibot_loss_weight``) and the unweighted KoLeo sum over the two views. Both are compared
in explora's convention.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explora.engine.step import forward_backward
from explora.models.adapt import apply_preset
from explora.models.backbone import build_backbone
from explora.objectives.dinov2 import DinoV2Config, DinoV2Objective

N_GLOBAL = 2
B = 4  # images per batch
WEIGHTS = dict(dino_loss_weight=0.7, ibot_loss_weight=1.3, koleo_loss_weight=0.2)  # not 1: a weight mix-up shows
SEPARATE_SIZES = dict(ibot_n_prototypes=48, ibot_hidden_dim=24, ibot_bottleneck_dim=8, ibot_head_nlayers=2)
TOTAL_STEPS, WARMUP = 10, 5


# -- the reference ----------------------------------------------------------------------------------------------
def ref_dino_loss(student_output_list, teacher_list, student_temp: float) -> torch.Tensor:
    """``DINOLoss.forward``: for each student crop, for each teacher view, minus the batch mean of sum(t * lsm)."""
    total = 0
    for s in student_output_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_list:
            total = total - torch.sum(t * lsm, dim=-1).mean()
    return total


def ref_sinkhorn(logits: torch.Tensor, temp: float, n_samples: int, n_iterations: int) -> torch.Tensor:
    """``sinkhorn_knopp_teacher`` in one process: Q = exp(t / temp), K-by-B; rows to 1/K, columns to 1/B."""
    q = torch.exp(logits / temp).t()
    k = q.shape[0]
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n_samples
    return (q * n_samples).t()


def ref_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``KoLeoLoss.forward``: nearest other point by inner product, -mean log(distance + eps)."""
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = torch.mm(x, x.t())
    n = x.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, nearest = torch.max(dots, dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


def ref_teacher_temp(step: int, start: float, final: float, warmup: int) -> float:
    """``CosineScheduler(base=final, final=final, warmup_iters=warmup, start_warmup_value=start)[step]``."""
    return float(np.linspace(start, final, warmup)[step]) if step < warmup else final


def ref_momentum(step: int, m0: float, m1: float, total: int) -> float:
    """``CosineScheduler(base=m0, final=m1, total_iters=total)[step]``."""
    return m1 + 0.5 * (m0 - m1) * (1 + math.cos(math.pi * step / total)) if step < total else m1


def _features(vit, x: torch.Tensor, masks: torch.Tensor | None = None, token: torch.Tensor | None = None):
    """timm ``forward_features`` -> (CLS (n, D), patch tokens (n, N, D)); masked patch embeddings replaced by the
    mask token before the position embeddings (DinoV2 ``prepare_tokens_with_masks``) by a hook on ``patch_embed``."""
    hook = None
    if masks is not None:
        def swap(_module, _inputs, out):  # out: (n, H, W, D)
            return torch.where(masks.view(*out.shape[:-1], 1), token.to(out.dtype).view(-1), out)
        hook = vit.patch_embed.register_forward_hook(swap)
    try:
        out = vit.forward_features(x)  # (n, P + N, D)
    finally:
        if hook is not None:
            hook.remove()
    return out[:, 0], out[:, vit.num_prefix_tokens:]


def reference_step(obj: DinoV2Objective, batch: dict[str, torch.Tensor], step: int,
                   centers: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """DinoV2's ``forward_backward`` loss on the objective's modules; returns (loss, terms, centres after)."""
    cfg = obj.config
    student, teacher, token = obj.student, obj.teacher, obj.mask_token
    global_crops, local_crops, masks = batch["global"], batch["local"], batch["masks"].bool()
    n_local_crops = local_crops.shape[0] // B
    temp = ref_teacher_temp(step, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_steps)
    mask_indices_list = masks.flatten().nonzero().flatten()
    n_masked_patches = mask_indices_list.shape[0]
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]  # collate.py

    n_local_crops_loss_terms = max(n_local_crops * N_GLOBAL, 1)
    n_global_crops_loss_terms = (N_GLOBAL - 1) * N_GLOBAL
    ibot_loss_scale = 1.0 / N_GLOBAL
    ibot_head_name = "ibot_head" if cfg.separate_head else "dino_head"

    with torch.no_grad():  # teacher
        t_cls, t_patch = _features(teacher["backbone"], global_crops)
        t_cls = t_cls.chunk(N_GLOBAL)
        t_cls = torch.cat((t_cls[1], t_cls[0]))  # A is matched to B
        t_cls_after_head = teacher["dino_head"](t_cls)  # (2B, K)
        t_patch_after_head = teacher[ibot_head_name](t_patch.flatten(0, 1)[mask_indices_list])  # (M, K')
        new_centers = dict(centers)
        if cfg.centering == "centering":
            m = cfg.center_momentum
            dino_targets = F.softmax((t_cls_after_head - centers["dino"]) / temp, dim=-1).view(N_GLOBAL, B, -1)
            new_centers["dino"] = centers["dino"] * m + t_cls_after_head.sum(0, keepdim=True) / len(
                t_cls_after_head) * (1 - m)
            p = t_patch_after_head.unsqueeze(0)  # (1, M, K'): upstream's iBOT centre is (1, 1, K')
            ibot_targets = F.softmax((p - centers["ibot"]) / temp, dim=-1).squeeze(0)
            new_centers["ibot"] = centers["ibot"] * m + p.mean(1).sum(0, keepdim=True) / len(p) * (1 - m)
        else:
            n_it = cfg.sinkhorn_iterations
            dino_targets = ref_sinkhorn(t_cls_after_head, temp, t_cls_after_head.shape[0], n_it).view(N_GLOBAL, B, -1)
            ibot_targets = ref_sinkhorn(t_patch_after_head, temp, n_masked_patches, n_it)

    s_global_cls, s_global_patch = _features(student["backbone"], global_crops, masks, token)
    s_global_cls_after_head = student["dino_head"](s_global_cls)
    s_patch_after_head = student[ibot_head_name](s_global_patch.flatten(0, 1)[mask_indices_list])

    terms: dict[str, torch.Tensor] = {}
    loss_accumulator = 0
    denominator = n_global_crops_loss_terms + n_local_crops_loss_terms
    if n_local_crops > 0:
        s_local_cls, _ = _features(student["backbone"], local_crops)
        s_local_cls_after_head = student["dino_head"](s_local_cls)
        terms["dino_local"] = ref_dino_loss(s_local_cls_after_head.chunk(n_local_crops), list(dino_targets),
                                            cfg.student_temp) / denominator
        loss_accumulator = loss_accumulator + cfg.dino_loss_weight * terms["dino_local"]
    loss_scales = 2
    terms["dino_global"] = ref_dino_loss([s_global_cls_after_head], [dino_targets.flatten(0, 1)],
                                         cfg.student_temp) * loss_scales / denominator
    loss_accumulator = loss_accumulator + cfg.dino_loss_weight * terms["dino_global"]
    terms["koleo"] = sum(ref_koleo(p) for p in s_global_cls.chunk(2))
    loss_accumulator = loss_accumulator + cfg.koleo_loss_weight * terms["koleo"]
    per_token = torch.sum(ibot_targets * F.log_softmax(s_patch_after_head / cfg.student_temp, dim=-1), dim=-1)
    ibot_patch_loss = -(per_token * masks_weight).sum() / masks.shape[0]  # forward_masked
    terms["ibot"] = ibot_patch_loss * loss_scales * ibot_loss_scale
    loss_accumulator = loss_accumulator + cfg.ibot_loss_weight * terms["ibot"]
    terms["teacher_temp"] = torch.tensor(temp)
    terms["momentum"] = torch.tensor(ref_momentum(step, cfg.momentum_teacher, cfg.final_momentum_teacher,
                                                  obj.total_steps))
    terms["masked_tokens"] = torch.tensor(float(n_masked_patches))
    return loss_accumulator, terms, new_centers


# -- the comparison ---------------------------------------------------------------------------------------------
def _objective(centering: str, separate: bool, n_local: int, split: str) -> DinoV2Objective:
    """A D-[L]-r4 tiny DinoV2 objective whose every tensor is off its initialisation; the same for every ``split``."""
    torch.manual_seed(0)
    vit = build_backbone("test_dinov2")
    apply_preset(vit, "D-[L]-r64", lora_rank=4)
    with torch.no_grad():
        for n, p in vit.named_parameters():
            if n.endswith(".gamma"):  # LayerScale 1e-5 would make every block (and LoRA) nearly the identity
                p.copy_(0.3 + 0.1 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    cfg = DinoV2Config(n_prototypes=64, hidden_dim=32, bottleneck_dim=16, n_local=n_local, global_size=32,
                       local_size=16, centering=centering, separate_head=separate, split_backward=split,
                       warmup_teacher_temp_steps=WARMUP, **WEIGHTS, **(SEPARATE_SIZES if separate else {}))
    obj = DinoV2Objective(vit, cfg, total_steps=TOTAL_STEPS).train()
    with torch.no_grad():
        obj.mask_token.copy_(torch.randn_like(obj.mask_token))
        teacher = dict(obj.teacher.named_parameters())
        for n, p in obj.student.named_parameters():
            if p.requires_grad:  # the teacher's EMA copies differ from the student
                teacher[n].add_(0.05 * torch.randn_like(p))
            if n.endswith("original0"):  # weight-norm gains off 1, in both
                p.mul_(1 + 0.2 * torch.rand_like(p))
                teacher[n].mul_(1 + 0.2 * torch.rand_like(p))
    return obj


def _batches(obj: DinoV2Objective) -> list[dict[str, torch.Tensor]]:
    """Two batches whose masks reach both global views (so every term and both centres are non-trivial)."""
    transform = obj.batch_transform()
    out = []
    for seed in range(100):
        images = torch.randint(0, 256, (B, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        batch = transform(images, torch.Generator().manual_seed(seed))
        if batch["masks"][:B].any() and batch["masks"][B:].any():
            out.append(batch)
        if len(out) == 2:
            return out
    raise AssertionError("no batch with masks in both views")


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


CASES = [(c, s, n) for c in ("centering", "sinkhorn_knopp") for s in (False, True) for n in (0, 4)]


@pytest.mark.parametrize("split", ["none", "crop_size", "view"])
@pytest.mark.parametrize("centering, separate, n_local", CASES)
def test_step_equals_the_dinov2_reference(centering, separate, n_local, split):
    """Two steps: total loss, every term, gradients of every trainable tensor and both centres as upstream's."""
    obj = _objective(centering, separate, n_local, split)
    n_stages = {"none": 1, "crop_size": 2 if n_local else 1, "view": 4 if n_local else 2}[split]
    assert obj.backward_stages() == n_stages
    params = {n: p for n, p in obj.named_parameters() if p.requires_grad}
    centers = {"dino": obj.dino_center.center.clone(), "ibot": obj.ibot_center.center.clone()}
    for step, batch in enumerate(_batches(obj)):
        ref_loss, ref_terms, centers = reference_step(obj, batch, step, centers)
        ref_grads = torch.autograd.grad(ref_loss, list(params.values()), allow_unused=True)
        obj.zero_grad(set_to_none=True)
        out = forward_backward(obj, obj, batch, step, "fp32", torch.device("cpu"))
        assert out.finite
        _close(out.loss, ref_loss, f"step {step} loss")
        if not n_local:
            ref_terms["dino_local"] = torch.zeros(())
        assert set(out.terms) == set(ref_terms)
        for name, want in ref_terms.items():
            _close(out.terms[name], want, f"step {step} term {name}")
        for (name, p), want in zip(params.items(), ref_grads):
            got = p.grad
            if want is None:  # a tensor the step does not use
                assert got is None or not got.any(), name
                continue
            assert got is not None, name
            assert (got - want).norm() <= 1e-4 * want.norm() + 1e-9, f"step {step} gradient of {name}"
        _close(obj.dino_center.center, centers["dino"], f"step {step} DINO centre")
        _close(obj.ibot_center.center, centers["ibot"].reshape(obj.ibot_center.center.shape),
               f"step {step} iBOT centre")
    if centering == "centering":
        assert obj.dino_center.center.abs().sum() > 0 and obj.ibot_center.center.abs().sum() > 0
