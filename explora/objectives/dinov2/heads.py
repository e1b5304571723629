"""DINO / iBOT projection head (DinoV2 ``dinov2/layers/dino_head.py``, described in DINO, Caron et al. 2021, §3).

MLP (in -> hidden -> hidden -> bottleneck, GELU), L2 normalisation, then a weight-normalised linear layer to K
prototypes without bias, ``W = g * V / ||V||`` per prototype, so logits are ``g`` times cosine similarities to the
prototypes. ``g`` starts at 1. DinoV2 trains it (``dino_head.py`` fills ``weight_g`` with 1 and leaves it
trainable; its optimiser groups give it weight decay); DINO v1 froze it (``norm_last_layer=True``), which
``freeze_weight_norm_gain=True`` reproduces. The prototype layer is named ``last_layer`` because the engine freezes
parameters with that name (``g`` included, as upstream) for the first steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """Projection head: (N, in_dim) -> (N, n_prototypes) logits.

    Attributes:
        mlp: ``nlayers`` Linear layers with GELU between them, ending at ``bottleneck_dim``.
        last_layer: weight-normalised Linear(bottleneck_dim, n_prototypes, bias=False); its gain ``original0`` (g,
            shape (n_prototypes, 1)) starts at 1 and trains unless ``freeze_weight_norm_gain``.
    """

    def __init__(self, in_dim: int, n_prototypes: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, freeze_weight_norm_gain: bool = False) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():  # DinoV2 init: trunc-normal std 0.02, zero bias
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, n_prototypes, bias=False), dim=0)
        g = self.last_layer.parametrizations.weight.original0  # (n_prototypes, 1)
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not freeze_weight_norm_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # (N, bottleneck)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)  # (N, K)
