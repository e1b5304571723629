"""The one training loop: pre-training (DinoV2, MAE) and supervised fine-tuning are objectives it trains.

:func:`train` reads like MAE's ``engine_pretrain.py``: schedules -> one optimiser step over the micro-batches
(``step.py``: forward under autocast and backward per micro-batch, as MAE's ``accum_iter``; non-finite checks,
per-module clipping, the update, the EMA) -> divergence guard (``guard.py``) -> log (``logs.py``) -> checkpoint
(``state.py``). What makes it safe to kill at any moment: the data order and augmentation are functions of (seed,
step, micro-batch) (``loader.py``; :class:`RestartingLoader` rebuilds a crashed one at the same position),
checkpoints are atomic with manifests (``checkpoint.py``) and written between optimiser steps, and everything the
step changes (trainable tensors, teacher copies, buffers, optimiser, torch RNG) is in the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from explora.core.errors import ConfigError
from explora.core.schedules import scaled_lr, warmup_cosine
from explora.engine import parallel as D
from explora.engine.guard import DivergenceGuard
from explora.engine.lengths import DEFAULT_STEPS, resolve_lengths
from explora.engine.loader import make_loader, resilient_batches
from explora.engine.logs import LOGGERS, TRACKERS, MetricLogger, SkippedSamples, StepLog
from explora.engine.optim import apply_schedules, build_optimizer, build_param_groups
from explora.engine.state import RunCheckpoints, training_state
from explora.engine.step import StepBatches, optimizer_step
from explora.objectives.base import Objective

__all__ = ["OptimConfig", "TrainConfig", "TrainResult", "clip_partition", "train", "training_state"]

_log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """AdamW with DinoV2-style groups. Defaults: DinoV2 ``ssl_default_config.yaml`` (``optim.*``).

    Lengths are in optimiser steps, or in epochs (``*_epochs``, converted once the dataset is known:
    ``explora.engine.lengths``); give one of the two. Left unset, the warm-up is 10 % and the last-layer freeze 1 %
    of the run (DinoV2's 10 and 1 of 100 epochs); 0 disables either.
    """

    base_lr: float = 4e-3  # optim.base_lr, per `reference_batch` images of the effective batch
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"  # optim.scaling_rule sqrt_wrt_1024 (MAE: linear /256)
    reference_batch: int = 1024
    min_lr: float = 1e-6  # optim.min_lr
    warmup_steps: int | None = None  # None: warmup_epochs, else 10 % of the run (optim.warmup_epochs 10 of 100)
    warmup_epochs: float | None = None  # optim.warmup_epochs (MAE --warmup_epochs)
    weight_decay: float = 0.04  # optim.weight_decay
    weight_decay_end: float = 0.4  # optim.weight_decay_end (cosine)
    betas: tuple[float, float] = (0.9, 0.999)  # optim.adamw_beta1/2 (MAE: 0.9, 0.95)
    layer_decay: float = 0.9  # optim.layerwise_decay
    patch_embed_lr_mult: float = 0.2  # optim.patch_embed_lr_mult
    decay_tokens: bool = True  # weight decay on cls/register/mask tokens and position embeddings, as DinoV2 and MAE
    clip_grad: float = 3.0  # optim.clip_grad (0 disables)
    # DinoV2 clips the backbone, the DINO head and the iBOT head separately (train.py: `for v in
    # model.student.values(): v.clip_grad_norm_(clip_grad)`); "global": one norm over every trainable tensor
    clip_grad_mode: Literal["per_module", "global"] = "per_module"
    # lr 0 for the DINO head's last layer (DinoV2 last_layer_lr_schedule); None: freeze_last_layer_epochs, else 1 %
    freeze_last_layer_steps: int | None = None
    freeze_last_layer_epochs: float | None = None  # optim.freeze_last_layer_epochs (1)
    fused: bool = True  # one fused AdamW kernel over all tensors

    def validate(self) -> None:
        if self.base_lr <= 0:
            raise ConfigError(f"optim.base_lr: got {self.base_lr}, expected a positive number.")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"optim.layer_decay: got {self.layer_decay}, expected a number in (0, 1].")
        for name in ("warmup_steps", "warmup_epochs", "freeze_last_layer_steps", "freeze_last_layer_epochs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"optim.{name}: got {value}, expected a number >= 0 (0 disables it).")
        for steps, epochs in (("warmup_steps", "warmup_epochs"),
                              ("freeze_last_layer_steps", "freeze_last_layer_epochs")):
            if getattr(self, steps) is not None and getattr(self, epochs) is not None:
                raise ConfigError(f"optim.{steps} ({getattr(self, steps)}) and optim.{epochs} "
                                  f"({getattr(self, epochs)}) are both set; set one of them.")


@dataclass
class TrainConfig:
    """Run length, batch and loop settings. Lengths count optimiser steps; ``epochs`` instead of ``steps`` gives
    the length in passes over the dataset (``explora.engine.lengths``). ``steps`` defaults to 1000 when
    ``epochs`` is not given; giving both is an error."""

    steps: int | None = None  # optimiser steps; None: from `epochs`, or 1000 when neither is set
    epochs: float | None = None  # steps = ceil(epochs x len(dataset) / effective batch) (MAE --epochs)
    batch_size: int = 32  # per process and micro-batch
    accum_steps: int = 1  # micro-batches per optimiser step (MAE --accum_iter)
    effective_batch: int | None = None  # batch_size x processes x accum_steps; when set, accum_steps is derived
    steps_per_epoch: int | None = None  # epoch length for `epochs`/`*_epochs` (DinoV2 OFFICIAL_EPOCH_LENGTH)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the hardware is fast at it (precision.py)
    num_workers: int = 2
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int = 2
    strategy: Literal["auto", "none", "ddp", "fsdp2"] = "auto"
    max_nonfinite_steps: int = 5  # stop after this many non-finite steps in a row
    deterministic: bool = False
    eval_every: int = 0  # steps; 0 = only at the end (when an eval function is given)
    tensorboard: bool = True  # false: no TensorBoard even when train.loggers names it (kept for existing configs)
    # Trackers fed every logged row: tensorboard, wandb, mlflow (the optional extras); metrics.csv is always written
    # ("csv" may be listed) and is what reports and model cards read.
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    max_loader_restarts: int = 3  # a crashed data-loader worker is replaced this many times before the run stops

    def __post_init__(self) -> None:
        if self.steps is None and self.epochs is None:
            self.steps = DEFAULT_STEPS

    def validate(self) -> None:
        for name in ("steps", "batch_size", "accum_steps", "effective_batch", "steps_per_epoch", "log_every",
                     "ckpt_every", "keep_last", "max_nonfinite_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"train.{name}: got {value}, expected an integer >= 1.")
        for name in ("num_workers", "max_loader_restarts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: got {getattr(self, name)}, expected an integer >= 0.")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"train.epochs: got {self.epochs}, expected a positive number.")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError(f"train.steps ({self.steps}) and train.epochs ({self.epochs}) are both set; set one "
                              "of them (add train.steps=null to train for a number of epochs).")
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise ConfigError(f"train.loggers: unknown logger(s) {unknown}; expected some of {list(LOGGERS)}.")

    def trackers(self) -> list[str]:
        """The optional trackers of ``loggers`` (W&B, MLflow), in order, each once."""
        return list(dict.fromkeys(name for name in self.loggers if name in TRACKERS))

    def use_tensorboard(self) -> bool:
        return self.tensorboard and "tensorboard" in self.loggers


@dataclass
class TrainResult:
    out_dir: Path
    steps_done: int
    skipped_steps: int
    last_terms: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    skipped_samples: int = 0  # unreadable samples replaced under data.on_error=skip (incl. before a resume)
    loader_restarts: int = 0  # data-loader rebuilds after a worker crash (this process)


def train(
    objective: Objective,
    dataset: Dataset,
    optim: OptimConfig,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    eval_fn: Callable[[Objective, int], dict[str, Any]] | None = None,
    on_checkpoint: Callable[[Objective, int], None] | None = None,
) -> TrainResult:
    """Train ``objective`` on ``dataset`` for ``cfg.steps`` optimiser steps (or ``cfg.epochs``); logs and
    checkpoints go to ``out_dir``. Each step accumulates ``cfg.accum_steps`` micro-batches of ``cfg.batch_size``."""
    out_dir = Path(out_dir)
    device = D.init_distributed()
    world = D.world_size()
    optim, cfg = resolve_lengths(optim, cfg, len(dataset), world)  # type: ignore[arg-type]
    _log_plan(optim, cfg, world)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed + D.rank())
    objective.to(device)
    if not any(p.requires_grad for p in objective.parameters()):
        raise ConfigError("nothing to train: every parameter is frozen. Check the explora/adapt settings.")
    ckpts = RunCheckpoints(out_dir / "checkpoints", keep_last=cfg.keep_last, every=cfg.ckpt_every,
                           total_steps=cfg.steps, frozen=objective.frozen_state_names(),
                           sharded=D.is_dist() and cfg.strategy == "fsdp2")
    resumed = ckpts.resume(objective) if resume else None
    start = resumed.step if resumed else 0
    guard = DivergenceGuard(cfg.max_nonfinite_steps, skipped=resumed.skipped_steps if resumed else 0)
    samples = SkippedSamples(dataset, before=resumed.skipped_samples if resumed else 0)
    if start >= cfg.steps:
        return TrainResult(out_dir, start, guard.skipped, skipped_samples=samples.before)
    # Built now, so a too-small dataset fails before the model is wrapped.
    loaders = RestartingLoader(dataset, objective.batch_transform(), cfg, device, start)
    model = D.wrap_model(objective, "ddp" if cfg.strategy == "auto" else cfg.strategy, device, cfg.precision)
    optimizer, clip = build_training_optimizer(objective, optim, device)  # sees the parameters as wrapped
    if resumed is not None:
        ckpts.restore_optimizer(objective, optimizer, resumed)
    peak_lr = scaled_lr(optim.base_lr, cfg.batch_size * world * cfg.accum_steps, optim.reference_batch,
                        optim.lr_scaling)  # MAE main_pretrain.py: eff_batch_size
    run_settings = {**{f"train.{k}": v for k, v in asdict(cfg).items()},
                    **{f"optim.{k}": v for k, v in asdict(optim).items()}}
    metric_log = MetricLogger(out_dir, start, cfg.steps, enabled=D.is_main(), tensorboard=cfg.use_tensorboard(),
                              trackers=cfg.trackers(), config=run_settings)
    log = StepLog(metric_log, log_every=cfg.log_every, total_steps=cfg.steps, world_size=world, samples=samples)
    eval_metrics: dict[str, Any] = {}
    try:
        batches = resilient_batches(loaders.at, start, cfg.steps, max_restarts=cfg.max_loader_restarts,
                                    on_restart=loaders.on_restart, accum_steps=cfg.accum_steps)
        for step, micro, batch in batches:
            if micro:  # the rest of a step dropped at a non-finite micro-batch: consumed, not computed
                continue
            lr = warmup_cosine(step, cfg.steps, peak_lr, optim.min_lr, optim.warmup_steps)
            wd = warmup_cosine(step, cfg.steps, optim.weight_decay, optim.weight_decay_end)
            apply_schedules(optimizer, lr, wd, last_layer_lr=0.0 if step < optim.freeze_last_layer_steps else lr)
            micro_batches = StepBatches(batch, batches, step, cfg.accum_steps, device)
            done = optimizer_step(model, objective, optimizer, clip, optim.clip_grad, micro_batches, cfg.precision,
                                  device)
            if done.nonfinite:
                guard.skip(step, done.out.terms, done.nonfinite)
                continue
            guard.ok()
            log.step(step, done.out.loss, done.out.terms, done.grad_norm, lr, wd, micro_batches.images)
            if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 != cfg.steps:
                eval_metrics = eval_fn(objective, step + 1)
            if ckpts.due(step + 1):  # a collective under FSDP2
                ckpts.save(objective, optimizer, step + 1, guard.skipped, samples.total() or 0, on_checkpoint)
        if ckpts.sharded:
            D.gather_full_(objective)  # every rank: from here on rank 0 may evaluate/export as in one process
        if eval_fn is not None:
            eval_metrics = eval_fn(objective, cfg.steps)
    finally:
        log.close()
    return TrainResult(out_dir, cfg.steps, guard.skipped, log.last_terms, eval_metrics,
                       skipped_samples=samples.total() or 0, loader_restarts=loaders.restarts)


def _log_plan(optim: OptimConfig, cfg: TrainConfig, world: int) -> None:
    if D.is_main():
        _log.info("%d optimiser steps of %d images (batch_size %d x %d processes x %d micro-batches); warm-up %d "
                  "steps, last layer frozen %d steps.", cfg.steps, cfg.batch_size * world * cfg.accum_steps,
                  cfg.batch_size, world, cfg.accum_steps, optim.warmup_steps, optim.freeze_last_layer_steps)


class RestartingLoader:
    """Data loaders of the run's micro-batches from any (step, micro-batch) position: the first one is built at
    construction (at ``start_step``), each later one when :func:`resilient_batches` replaces a crashed worker."""

    def __init__(self, dataset: Dataset, transform: Any, cfg: TrainConfig, device: torch.device,
                 start_step: int) -> None:
        self.dataset, self.transform, self.cfg, self.device = dataset, transform, cfg, device
        self.restarts = 0
        self._first: Any = self._build(start_step, 0)

    def _build(self, step: int, micro: int) -> Any:
        cfg = self.cfg
        return make_loader(
            self.dataset, self.transform, batch_size=cfg.batch_size, total_steps=cfg.steps, seed=cfg.seed,
            start_step=step, rank=D.rank(), world_size=D.world_size(), num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda", accum_steps=cfg.accum_steps, start_micro=micro,
        )[0]

    def at(self, step: int, micro: int) -> Any:
        """A loader whose first batch is micro-batch ``micro`` of ``step``."""
        first, self._first = self._first, None
        return first if first is not None else self._build(step, micro)

    def on_restart(self, step: int, n: int, err: BaseException) -> None:
        self.restarts = n
        if D.is_main():
            _log.warning("step %d: data-loader worker crashed (%s); rebuilt the loader at step %d (restart %d/%d).",
                         step, err, step, n, self.cfg.max_loader_restarts)


def _num_layers(objective: nn.Module) -> int:
    depths = [
        len(m.blocks)
        for m in objective.modules()
        if isinstance(getattr(m, "blocks", None), nn.Sequential | nn.ModuleList)
    ]
    return max(depths) if depths else 0


def build_training_optimizer(objective: Objective, optim: OptimConfig, device: torch.device
                             ) -> tuple[torch.optim.Optimizer, list[list[torch.Tensor]]]:
    """AdamW over DinoV2-style parameter groups of ``objective`` (as wrapped: FSDP2 has replaced each parameter by
    a sharded DTensor), and the gradient-clipping groups over the same tensors."""
    groups = build_param_groups(
        objective.named_parameters(),
        num_layers=_num_layers(objective),
        layer_decay=optim.layer_decay,
        patch_embed_lr_mult=optim.patch_embed_lr_mult,
        decay_tokens=optim.decay_tokens,
    )
    optimizer = build_optimizer(groups, optim.betas, fused=optim.fused and device.type in ("cpu", "cuda"))
    params = [p for g in groups for p in g["params"]]
    return optimizer, clip_partition(objective, params, optim.clip_grad_mode)


def clip_partition(objective: nn.Module, params: list[torch.Tensor], mode: str) -> list[list[torch.Tensor]]:
    """The gradient-clipping groups: the objective's ``clip_groups()`` (``per_module``) or one group (``global``).

    Checked to partition the optimiser's tensors, so the clip covers every one once and the logged norm is total.
    """
    if mode == "global":
        return [params]
    groups = list(objective.clip_groups().values())  # type: ignore[operator]
    ids = [id(p) for g in groups for p in g]
    if len(ids) != len(set(ids)) or set(ids) != {id(p) for p in params}:
        names = {id(p): n for n, p in objective.named_parameters()}
        missing = [names.get(id(p), "?") for p in params if id(p) not in set(ids)]
        raise ConfigError(
            f"{type(objective).__name__}.clip_groups() does not partition the trainable tensors (missing "
            f"{missing[:5]}, {len(ids) - len(set(ids))} listed twice, {len(set(ids) - {id(p) for p in params})} "
            "not trained); fix it, or set optim.clip_grad_mode=global."
        )
    return groups
