"""DinoV2's three losses as small modules, following ``dinov2/loss/`` and ``dinov2/train/ssl_meta_arch.py``.

DINOv3's Gram anchoring (:class:`GramLoss`) is here too.

- [0]: DINO, Caron et al. 2021, https://arxiv.org/abs/2104.14294
- [1]: iBOT, Zhou et al. 2022, https://arxiv.org/abs/2111.07832
- [2]: DinoV2, Oquab et al. 2024, https://arxiv.org/abs/2304.07193 (KoLeo: Sablayrolles et al. 2019)
- [3]: DINOv3, Siméoni et al. 2025, https://arxiv.org/abs/2508.10104 (Gram anchoring, ``dinov3/loss/gram_loss.py``)

Every loss (and every teacher-target computation in ``centering.py``) runs in fp32 with autocast disabled
(:func:`autocast_off`): the heads' logits may arrive in bf16, but a bf16 contraction over 65,536 prototypes quantises
a DINO loss of 5.5 in steps of 0.03 and puts bf16 rounding into every gradient. Upstream keeps these sums in fp32
as well (``log_softmax`` autocasts to fp32; the fp32 centre promotes the teacher side; KoLeo turns autocast off).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def autocast_off(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``t``'s device (a no-op where the device has no autocast, e.g. ``meta``)."""
    dev = t.device.type
    if torch.amp.is_autocast_available(dev):
        return torch.autocast(device_type=dev, enabled=False)
    return contextlib.nullcontext()


class DINOLoss(nn.Module):
    """Cross-entropy between teacher probabilities and student log-softmax over (student crop, teacher view) pairs [0].

    ``forward(student_logits, teacher_probs)`` takes ``student_logits`` (S*B, K) — S crops, crop-major — and
    ``teacher_probs`` (T*B, K) — T teacher views, view-major — and returns the sum over every pair (s, t) of the
    batch-mean cross-entropy ``-sum_k p_t log softmax(z_s / student_temp)`` (upstream ``DINOLoss.forward``: the
    double loop over ``student_output_list`` x ``teacher_out_softmaxed_centered_list``). Callers exclude same-view
    pairs by passing the swapped teacher views for the global crops as one (2B, K) "pair" with ``n_student =
    n_teacher = 1`` (times 2 for the two pairs), and divide by the number of pairs (``objective.n_loss_terms``).
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, n_student: int,
                n_teacher: int) -> torch.Tensor:
        with autocast_off(student_logits):
            lsm = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)  # (S*B, K)
            lsm = lsm.view(n_student, -1, lsm.shape[-1])  # (S, B, K)
            tp = teacher_probs.float().view(n_teacher, -1, teacher_probs.shape[-1])  # (T, B, K)
            ce = -torch.einsum("tbk,sbk->tsb", tp, lsm)  # (T, S, B) per-pair, per-sample cross-entropy
            return ce.mean(-1).sum()


class iBOTPatchLoss(nn.Module):  # noqa: N801 - the paper's spelling
    """Masked-patch cross-entropy (iBOT [1]) with DinoV2's per-image weighting (``iBOTPatchLoss.forward_masked``).

    ``forward(student_logits, teacher_probs, masks)``: logits and probabilities (M, K) for the M masked tokens
    (row-major order of ``masks[masks]``), ``masks`` (N_img, N) bool. Each token is weighted by 1 / (masked tokens
    of its image) (``collate.py`` ``masks_weight``), and the weighted sum is divided by N_img, so unmasked images
    count with zero loss.
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        with autocast_off(student_logits):
            lsm = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)  # (M, K)
            ce = -(teacher_probs.float() * lsm).sum(-1)  # (M,)
            per_image = masks.sum(-1).clamp(min=1).float()  # (N_img,)
            weight = (1.0 / per_image)[:, None].expand_as(masks)[masks]  # (M,)
            return (ce * weight).sum() / masks.shape[0]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator on L2-normalised features [2]: ``-mean_i log(d(x_i, NN(x_i)) + eps)``.

    ``forward(x)`` with ``x`` (B, D); runs in fp32 with autocast disabled (``koleo_loss.py``). DinoV2 applies it to
    the student's backbone CLS token of each global view separately and sums the views.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x):
            x = F.normalize(x.float(), p=2, dim=-1, eps=self.eps)  # (B, D)
            dots = x @ x.t()  # (B, B)
            dots.fill_diagonal_(-1.0)  # never pick yourself
            nn_idx = dots.argmax(dim=1)  # (B,)
            dist = F.pairwise_distance(x, x[nn_idx], p=2, eps=self.eps)  # (B,)
            return -torch.log(dist + self.eps).mean()


class GramLoss(nn.Module):
    """DINOv3's Gram anchoring [3]: MSE between the patch-similarity (Gram) matrices of the student and of a fixed
    "Gram teacher", per image: ``mean((S S^T - T T^T)^2)`` over L2-normalised patch features ``S``, ``T`` (B, N, D).

    As ``dinov3/loss/gram_loss.py`` with ``apply_norm=True`` and ``img_level=True`` (the settings of
    ``configs/train/dinov3_vit7b16_gram_anchor.yaml``); ``remove_neg`` zeroes negative similarities on both sides
    (upstream's ``remove_neg``, off there). fp32 with autocast disabled.
    """

    def __init__(self, remove_neg: bool = False) -> None:
        super().__init__()
        self.remove_neg = remove_neg

    def forward(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with autocast_off(student):
            s = F.normalize(student.float(), dim=-1)  # (B, N, D)
            t = F.normalize(target.float(), dim=-1)
            s_sim, t_sim = s @ s.transpose(-1, -2), t @ t.transpose(-1, -2)  # (B, N, N)
            if self.remove_neg:
                s_sim, t_sim = s_sim.clamp_min(0.0), t_sim.clamp_min(0.0)
            return F.mse_loss(s_sim, t_sim)
