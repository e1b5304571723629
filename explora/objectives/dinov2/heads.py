"""DINO / iBOT projection head (DinoV2 ``dinov2/layers/dino_head.py``, described in DINO, Caron et al. 2021, §3).

MLP (in -> hidden -> hidden -> bottleneck, GELU), L2 normalisation, then a weight-normalised linear layer to K
prototypes without bias whose norm ``g`` is fixed to 1, so logits are cosine similarities to the prototypes. The
prototype layer is named ``last_layer`` because the engine freezes parameters with that name for the first epoch.
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
        last_layer: weight-normalised Linear(bottleneck_dim, n_prototypes, bias=False); ``original0`` (g) frozen at 1.
    """

    def __init__(self, in_dim: int, n_prototypes: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3) -> None:
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
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # (N, bottleneck)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)  # (N, K)
