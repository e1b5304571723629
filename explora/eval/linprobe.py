"""DinoV2/ExPLoRA linear probing: a grid of linear heads trained at once on frozen, cached features.

Protocol (ExPLoRA ``linprobe/linear.py`` + ``scripts/linprobe.sh``, itself DinoV2 ``eval/linear.py``):
heads = {last n in (1, 4) blocks' CLS} x {avgpool False/True} x lr grid, lr scaled by ``batch / 256``; each head a
single ``nn.Linear`` (weight N(0, 0.01), bias 0); the loss is the *sum* of the heads' cross-entropies; SGD momentum
0.9, weight decay 0, cosine decay to 0 over all iterations; the best head is chosen by top-1 on the validation split
and reused unchanged on any further test split.

One deliberate difference: upstream recomputes features every step from RandomResizedCrop + flip views; we train on
features of the eval transform cached once (:mod:`explora.eval.features`), so a 28-head sweep costs one forward pass.
Expect slightly lower numbers than the augmented protocol on small datasets. Iterations are configurable
(upstream: 10 epochs x 1500 iterations at batch 256).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from explora.core.errors import ConfigError
from explora.eval.features import FeatureSet
from explora.eval.metrics import classification_metrics

UPSTREAM_LRS = (1e-4, 1e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


@dataclass
class LinearProbeConfig:
    """Sweep and optimisation settings; defaults are upstream's except ``iters_per_epoch`` (one pass over the data)."""

    lrs: tuple[float, ...] = UPSTREAM_LRS
    n_blocks: tuple[int, ...] = (1, 4)
    avgpool: tuple[bool, ...] = (False, True)
    batch_size: int = 256
    epochs: int = 10
    iters_per_epoch: int | None = None  # None: len(train) // batch_size (drop_last); upstream fixes 1500
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"


def head_name(n_blocks: int, avgpool: bool, lr: float) -> str:
    """Upstream's classifier naming: ``classifier_4_blocks_avgpool_True_lr_0_01000``."""
    return f"classifier_{n_blocks}_blocks_avgpool_{avgpool}_lr_{lr:.5f}".replace(".", "_")


@dataclass
class HeadSpec:
    n_blocks: int
    avgpool: bool
    lr: float  # base lr, before the batch/256 scaling


class LinearHeads(nn.Module):
    """All probe heads; ``forward(features)`` returns ``{name: logits (N, K)}``."""

    def __init__(self, specs: dict[str, HeadSpec], dims: dict[tuple[int, bool], int], num_classes: int):
        super().__init__()
        self.specs = specs
        self.heads = nn.ModuleDict()
        for name, s in specs.items():
            head = nn.Linear(dims[(s.n_blocks, s.avgpool)], num_classes)
            nn.init.normal_(head.weight, mean=0.0, std=0.01)
            nn.init.zeros_(head.bias)
            self.heads[name] = head

    def forward(self, inputs: dict[tuple[int, bool], torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.heads[name](inputs[(s.n_blocks, s.avgpool)]) for name, s in self.specs.items()}


@dataclass
class LinearProbeResult:
    """The trained heads, every head's val top-1, the chosen head and its full val metrics."""

    heads: LinearHeads
    head_top1: dict[str, float]
    best_head: str
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def best_spec(self) -> HeadSpec:
        return self.heads.specs[self.best_head]

    @torch.no_grad()
    def evaluate(self, features: FeatureSet, num_classes: int | None = None) -> dict[str, Any]:
        """Metrics of the head chosen on val on another split (upstream reuses it on extra test sets)."""
        s = self.best_spec
        logits = self.heads.heads[self.best_head](features.linear_input(s.n_blocks, s.avgpool).to(_device(self.heads)))
        return classification_metrics(logits, features.labels, num_classes or logits.shape[1])


def _device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


def _inputs(
    features: FeatureSet, keys: set[tuple[int, bool]], device: torch.device
) -> dict[tuple[int, bool], torch.Tensor]:
    return {k: features.linear_input(*k).to(device) for k in keys}


def train_linear_probe(
    train: FeatureSet, val: FeatureSet, num_classes: int, cfg: LinearProbeConfig | None = None, progress: bool = True
) -> LinearProbeResult:
    """Train every head of the grid at once on ``train`` features; pick the best by top-1 on ``val``."""
    cfg = cfg or LinearProbeConfig()
    n_blocks = tuple(n for n in cfg.n_blocks if n <= train.n_blocks)
    avgpools = tuple(a for a in cfg.avgpool if not a or train.patch_mean is not None)
    if not n_blocks or not avgpools or not cfg.lrs:
        raise ConfigError(
            f"linear probe grid is empty: n_blocks={cfg.n_blocks} (features hold {train.n_blocks}), "
            f"avgpool={cfg.avgpool}, lrs={cfg.lrs}"
        )
    if int(train.labels.max()) >= num_classes or int(train.labels.min()) < 0:
        raise ConfigError(
            f"train labels span [{int(train.labels.min())}, {int(train.labels.max())}] but num_classes={num_classes}"
        )
    device = torch.device(cfg.device)
    specs = {head_name(n, a, lr): HeadSpec(n, a, lr) for n in n_blocks for a in avgpools for lr in cfg.lrs}
    keys = {(s.n_blocks, s.avgpool) for s in specs.values()}
    train_in = _inputs(train, keys, device)  # {(n, avgpool): (N, dim)}
    dims = {k: v.shape[1] for k, v in train_in.items()}
    torch.manual_seed(cfg.seed)
    heads = LinearHeads(specs, dims, num_classes).to(device)

    batch = min(cfg.batch_size, len(train))
    scale = batch / 256  # upstream: lr * (batch_per_gpu * world_size) / 256
    groups = [{"params": heads.heads[name].parameters(), "lr": s.lr * scale} for name, s in specs.items()]
    opt = torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    iters_per_epoch = cfg.iters_per_epoch or max(1, len(train) // batch)
    max_iter = cfg.epochs * iters_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max_iter, eta_min=0)

    g = torch.Generator().manual_seed(cfg.seed)
    labels = train.labels.to(device)
    perm, pos = torch.randperm(len(train), generator=g), 0
    heads.train()
    for _ in tqdm(range(max_iter), desc="linprobe", disable=not progress, leave=False):
        if pos + batch > len(perm):  # drop_last, reshuffle: an infinite sampler like upstream's
            perm, pos = torch.randperm(len(train), generator=g), 0
        idx = perm[pos : pos + batch].to(device)
        pos += batch
        logits = heads({k: v[idx] for k, v in train_in.items()})
        loss = sum(F.cross_entropy(out, labels[idx]) for out in logits.values())  # upstream: sum over heads
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    heads.eval()
    with torch.no_grad():
        val_logits = heads(_inputs(val, keys, device))
    val_labels = val.labels.to(device)
    head_top1 = {name: 100.0 * (out.argmax(1) == val_labels).float().mean().item() for name, out in val_logits.items()}
    best = max(head_top1, key=lambda n: head_top1[n])  # first in grid order on ties
    metrics = classification_metrics(val_logits[best], val.labels, num_classes)
    s = specs[best]
    metrics.update(
        protocol="linear_probe",
        best_head=best,
        best_n_blocks=s.n_blocks,
        best_avgpool=s.avgpool,
        best_lr=s.lr,
        best_lr_scaled=s.lr * scale,
        head_top1=head_top1,
        iterations=max_iter,
    )
    return LinearProbeResult(heads, head_top1, best, metrics, config=asdict(cfg))


def max_iterations(num_train: int, cfg: LinearProbeConfig) -> int:
    """Total SGD steps the config implies (epochs x iterations per epoch)."""
    batch = min(cfg.batch_size, num_train)
    return cfg.epochs * (cfg.iters_per_epoch or max(1, math.floor(num_train / batch)))
