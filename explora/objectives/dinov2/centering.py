"""Teacher target normalisation: EMA centering (DINO) and Sinkhorn-Knopp (SwAV; DinoV2's ``train.centering``).

Both follow DinoV2's ``dinov2/loss/dino_clstoken_loss.py`` and ``ibot_patch_loss.py``. Every collective goes through
:func:`explora.core.distributed.all_reduce_`, a no-op without a process group, so the same code runs in one process
(upstream's iBOT Sinkhorn all-reduce is unguarded and crashes without a process group). Both run in fp32 with
autocast disabled (:func:`~explora.objectives.dinov2.losses.autocast_off`), whatever the dtype of the teacher's
logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from explora.core.distributed import all_reduce_
from explora.objectives.dinov2.losses import autocast_off


class EMACenter(nn.Module):
    """EMA of the teacher's mean output, subtracted before the sharpened softmax (DINO's collapse prevention).

    ``softmax_centered`` uses the centre accumulated from previous batches; ``update`` then folds in this batch's
    mean over all processes (sum and count all-reduced), as upstream does one step later asynchronously.
    """

    center: torch.Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    def softmax_centered(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """(N, K) teacher logits -> (N, K) probabilities ``softmax((t - center) / temp)`` in fp32."""
        with autocast_off(teacher_logits):
            return F.softmax((teacher_logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """``center <- momentum * center + (1 - momentum) * mean(teacher_logits)`` over the rows of every process."""
        with autocast_off(teacher_logits):
            n = teacher_logits.new_tensor([len(teacher_logits)], dtype=torch.float32)
            stats = torch.cat([teacher_logits.float().sum(0), n])
            all_reduce_(stats)  # (K + 1,): global sum and count
            if stats[-1] > 0:
                mean = stats[:-1] / stats[-1]
                self.center.mul_(self.momentum).add_(mean[None], alpha=1 - self.momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Balanced teacher assignments (N, K) from logits (N, K): each row sums to 1, prototypes used ~equally.

    Q = exp(t / temp) normalised to total 1, then ``n_iterations`` of (prototype totals -> 1/K, sample totals ->
    1/N_global), all sums over every process; finally scaled by N_global so each sample's row sums to 1.
    ``N_global`` counts samples on all processes, so ranks may hold different (even zero) counts.
    """
    with autocast_off(teacher_logits):
        return _sinkhorn_knopp_fp32(teacher_logits.float(), temp, n_iterations)


def _sinkhorn_knopp_fp32(teacher_logits: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """:func:`sinkhorn_knopp` on fp32 logits (N, K), autocast already off."""
    t = teacher_logits / temp  # (N, K)
    shift = all_reduce_(t.max().reshape(1) if t.numel() else t.new_full((1,), -1e30), "max")
    q = torch.exp(t - shift).t()  # (K, N); the global shift cancels in the normalisation
    k = q.shape[0]
    n_global = all_reduce_(q.new_tensor([q.shape[1]])).item()
    if n_global == 0:
        return teacher_logits.new_zeros(teacher_logits.shape)
    q /= all_reduce_(q.sum().reshape(1))
    for _ in range(n_iterations):
        q /= all_reduce_(q.sum(dim=1, keepdim=True))  # each prototype total 1 ...
        q /= k  # ... then 1/K
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)  # each sample total 1 ...
        q /= n_global  # ... then 1/N
    q *= n_global
    return q.t()  # (N, K)
