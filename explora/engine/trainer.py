"""The one training loop: pre-training (DinoV2, MAE) and supervised fine-tuning are objectives it trains.

Short and readable in the manner of MAE's ``engine_pretrain.py``: schedules -> for each micro-batch, forward under
autocast and backward (``step.py``; gradient accumulation as MAE's ``accum_iter``) -> guard against non-finite
values -> clip per module -> step -> EMA -> log -> checkpoint. What makes it safe to kill at any moment: the data
order and augmentation are functions of (seed, step, micro-batch) (``loader.py``), checkpoints are atomic with
manifests (``checkpoint.py``) and written between optimiser steps, and everything the step changes (trainable
tensors, teacher copies, buffers, optimiser, torch RNG) is in the checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from explora.core.errors import CheckpointError, ConfigError, DivergenceError
from explora.core.schedules import scaled_lr, warmup_cosine
from explora.engine import parallel as D
from explora.engine.checkpoint import CheckpointManager
from explora.engine.lengths import DEFAULT_STEPS, resolve_lengths
from explora.engine.loader import make_loader, resilient_batches
from explora.engine.logs import MetricLogger
from explora.engine.optim import apply_schedules, build_optimizer, build_param_groups, clip_gradients
from explora.engine.step import accumulate_step
from explora.objectives.base import Objective


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
    tensorboard: bool = True
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


@dataclass
class TrainResult:
    out_dir: Path
    steps_done: int
    skipped_steps: int
    last_terms: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    skipped_samples: int = 0  # unreadable samples replaced under data.on_error=skip (incl. before a resume)
    loader_restarts: int = 0  # data-loader rebuilds after a worker crash (this process)


def _num_layers(objective: nn.Module) -> int:
    depths = [
        len(m.blocks)
        for m in objective.modules()
        if isinstance(getattr(m, "blocks", None), nn.Sequential | nn.ModuleList)
    ]
    return max(depths) if depths else 0


def mark_frozen(module: nn.Module) -> None:
    """Tag the parameters frozen now as pre-trained weights: they are rebuilt from the source on resume.

    Call it after ``apply_explora`` and before the objective builds its teacher (which shares these tensors).
    """
    for p in module.parameters():
        if not p.requires_grad:
            p._explora_frozen = True  # type: ignore[attr-defined]


def _frozen_ptrs(objective: nn.Module) -> set[int]:
    return {p.data_ptr() for p in objective.parameters() if getattr(p, "_explora_frozen", False)}


def frozen_names(objective: nn.Module) -> set[str]:
    """State-dict names of the tagged frozen tensors (both the student's and the teacher's shared copies).

    Take them before wrapping: FSDP2 replaces every parameter by a DTensor (losing the tag) and gives the teacher
    its own copies, so storage identity no longer finds them afterwards; names do.
    """
    frozen = _frozen_ptrs(objective)
    return {k for k, v in objective.state_dict().items() if v.numel() and v.data_ptr() in frozen}


def training_state(objective: nn.Module, frozen: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The objective's state dict without the frozen pre-trained tensors, as full plain tensors.

    ``frozen``: their names (:func:`frozen_names`, taken before wrapping); None finds them by storage now. Under
    FSDP2 every rank must call it (each sharded tensor is all-gathered); frozen tensors are never gathered.
    """
    names = frozen_names(objective) if frozen is None else frozen
    return D.full_state_dict(objective, exclude=names)


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
    rank, world = D.rank(), D.world_size()
    optim, cfg = resolve_lengths(optim, cfg, len(dataset), world)  # type: ignore[arg-type]
    accum = cfg.accum_steps
    if D.is_main():
        print(f"[explora] {cfg.steps} optimiser steps of {cfg.batch_size * world * accum} images (batch_size "
              f"{cfg.batch_size} x {world} processes x {accum} micro-batches); warm-up {optim.warmup_steps} steps, "
              f"last layer frozen {optim.freeze_last_layer_steps} steps.")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed + rank)
    objective.to(device)

    if not any(p.requires_grad for p in objective.parameters()):
        raise ConfigError("nothing to train: every parameter is frozen. Check the explora/adapt settings.")
    # Names, not tensors: FSDP2 replaces every parameter (and unties the teacher's shared frozen copies).
    frozen = frozen_names(objective)
    sharded = D.is_dist() and cfg.strategy == "fsdp2"
    effective_batch = cfg.batch_size * world * accum  # MAE main_pretrain.py: eff_batch_size
    peak_lr = scaled_lr(optim.base_lr, effective_batch, optim.reference_batch, optim.lr_scaling)

    ckpts = CheckpointManager(out_dir / "checkpoints", keep_last=cfg.keep_last)
    start_step, skipped, skipped_before, state = 0, 0, 0, None
    if resume:
        state = ckpts.load_latest()
        if state is None and any(ckpts.directory.glob("ckpt-*.pt")):
            # Starting over would prune and overwrite them: refuse, and say why each one was unusable (warnings).
            raise CheckpointError(
                f"--resume: none of the checkpoints in {ckpts.directory} is intact and loadable (see the warnings "
                "above). Nothing was changed; move them away to start from step 0."
            )
        if state is None:
            if D.is_main():
                print(f"[explora] no intact checkpoint in {ckpts.directory}; starting from step 0.")
        else:
            # Full tensors into the still unsharded model: wrapping below shards (or replicates) what was loaded.
            _restore_objective(objective, state, frozen)
            start_step, skipped = int(state["step"]), int(state.get("skipped_steps", 0))
            skipped_before = int(state.get("skipped_samples", 0))
            if D.is_main():
                print(f"[explora] resumed from {ckpts.path_for(start_step)} (step {start_step}).")
    if start_step >= cfg.steps:
        return TrainResult(out_dir, start_step, skipped, skipped_samples=skipped_before)

    transform = objective.batch_transform()

    def build_loader(step: int, micro: int = 0):
        return make_loader(
            dataset,
            transform,
            batch_size=cfg.batch_size,
            total_steps=cfg.steps,
            seed=cfg.seed,
            start_step=step,
            rank=rank,
            world_size=world,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            accum_steps=accum,
            start_micro=micro,
        )[0]

    first = [build_loader(start_step)]  # built now, so a too-small dataset fails before the model is wrapped
    restarts = [0]

    def loader_at(step: int, micro: int):
        return first.pop() if first else build_loader(step, micro)

    def on_restart(step: int, n: int, err: BaseException) -> None:
        restarts[0] = n
        if D.is_main():
            print(
                f"[explora] step {step}: data-loader worker crashed ({err}); rebuilt the loader at step {step} "
                f"(restart {n}/{cfg.max_loader_restarts})."
            )

    def skipped_samples() -> int | None:
        count = getattr(dataset, "skipped", None)
        return skipped_before + count if isinstance(count, int) else None

    model = D.wrap_model(objective, "ddp" if cfg.strategy == "auto" else cfg.strategy, device, cfg.precision)
    # The optimiser sees the parameters as wrapped: FSDP2 has replaced each one by a sharded DTensor.
    groups = build_param_groups(
        objective.named_parameters(),
        num_layers=_num_layers(objective),
        layer_decay=optim.layer_decay,
        patch_embed_lr_mult=optim.patch_embed_lr_mult,
        decay_tokens=optim.decay_tokens,
    )
    optimizer = build_optimizer(groups, optim.betas, fused=optim.fused and device.type in ("cpu", "cuda"))
    if state is not None:
        _restore_optimizer(objective, optimizer, state, sharded)
        _restore_rng(state)
    logger = MetricLogger(out_dir, start_step, cfg.steps, enabled=D.is_main(), tensorboard=cfg.tensorboard)
    params = [p for g in groups for p in g["params"]]
    clip = clip_partition(objective, params, optim.clip_grad_mode)
    nonfinite_run, last_terms, eval_metrics = 0, {}, {}
    reported_skips = skipped_before
    t_last, n_images = time.perf_counter(), 0
    try:
        batches = resilient_batches(
            loader_at, start_step, cfg.steps, max_restarts=cfg.max_loader_restarts, on_restart=on_restart,
            accum_steps=accum,
        )
        for step, micro, batch in batches:
            if micro:  # the rest of a step dropped at a non-finite micro-batch: consumed, not computed
                continue
            lr = warmup_cosine(step, cfg.steps, peak_lr, optim.min_lr, optim.warmup_steps)
            wd = warmup_cosine(step, cfg.steps, optim.weight_decay, optim.weight_decay_end)
            apply_schedules(optimizer, lr, wd, last_layer_lr=0.0 if step < optim.freeze_last_layer_steps else lr)
            images = [0]
            micro_batches = _step_micro_batches(batch, batches, step, accum, device, images)
            out = accumulate_step(model, objective, micro_batches, accum, step, cfg.precision, device)
            if not out.finite:
                nonfinite_run, skipped = _skip(optimizer, nonfinite_run, skipped, step, out.terms, cfg)
                continue
            grad_norm = clip_gradients(clip, optim.clip_grad)  # the total norm before clipping
            if not torch.isfinite(grad_norm):
                nonfinite_run, skipped = _skip(
                    optimizer, nonfinite_run, skipped, step, out.terms, cfg, what="gradients"
                )
                continue
            nonfinite_run = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            objective.on_optimizer_step(step)
            n_images += images[0]
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                elapsed = time.perf_counter() - t_last
                last_terms = {k: float(v) for k, v in out.terms.items()}
                n_skipped = skipped_samples()
                extra = {} if n_skipped is None else {"skipped_samples": n_skipped}
                if n_skipped is not None and n_skipped > reported_skips and D.is_main():
                    print(f"[explora] step {step}: {n_skipped} samples skipped so far (data.on_error=skip)")
                    reported_skips = n_skipped
                logger.log(
                    step,
                    {
                        "loss": float(out.loss),
                        **last_terms,
                        "lr": lr,
                        "wd": wd,
                        "grad_norm": float(grad_norm),
                        "images_per_s": n_images * world / max(elapsed, 1e-9),
                        **extra,
                    },
                )
                t_last, n_images = time.perf_counter(), 0
            logger.advance()
            if eval_fn is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                eval_metrics = eval_fn(objective, done)
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                state = _state(objective, optimizer, done, skipped, frozen, sharded)  # collective under FSDP2
                if D.is_main():
                    state["skipped_samples"] = skipped_samples() or 0
                    ckpts.save(state, done)
                    if on_checkpoint is not None:
                        on_checkpoint(objective, done)
                state = None
                D.barrier()
        if sharded:
            D.gather_full_(objective)  # every rank: from here on rank 0 may evaluate/export as in one process
        if eval_fn is not None:
            eval_metrics = eval_fn(objective, cfg.steps)
    finally:
        logger.close()
    return TrainResult(
        out_dir,
        cfg.steps,
        skipped,
        last_terms,
        eval_metrics,
        skipped_samples=skipped_samples() or 0,
        loader_restarts=restarts[0],
    )


def _step_micro_batches(first: dict[str, torch.Tensor], batches, step: int, accum: int, device: torch.device,
                        images: list[int]):
    """The micro-batches of ``step`` on ``device``: ``first``, then the next ``accum - 1`` from ``batches``, drawn
    only when the previous one has run (one micro-batch on the device at a time). ``images[0]`` counts the images."""
    batch = first
    for micro in range(accum):
        if micro:
            got_step, got_micro, batch = next(batches)
            assert (got_step, got_micro) == (step, micro), (got_step, got_micro, step, micro)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        images[0] += _batch_images(batch)
        yield batch


def _batch_images(batch: dict[str, torch.Tensor]) -> int:
    return batch["labels"].shape[0] if "labels" in batch else next(iter(batch.values())).shape[0]


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


def _skip(
    optimizer, run: int, skipped: int, step: int, terms: dict, cfg: TrainConfig, what: str = "loss"
) -> tuple[int, int]:
    """Drop this step's update; stop the run after ``max_nonfinite_steps`` in a row."""
    optimizer.zero_grad(set_to_none=True)
    run, skipped = run + 1, skipped + 1
    desc = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
    print(f"[explora] step {step}: non-finite {what} ({desc}); update skipped ({run} in a row).")
    if run >= cfg.max_nonfinite_steps:
        raise DivergenceError(
            f"training diverged: {run} steps in a row up to step {step} had non-finite {what} (terms: {desc}). "
            "The last good checkpoint is kept; lower optim.base_lr or raise optim.warmup_steps, then --resume."
        )
    return run, skipped


def _rng_states() -> list[torch.Tensor]:
    """Every rank's CPU RNG state (dropout/drop-path draw from it with a per-rank seed); a collective."""
    mine = torch.get_rng_state()
    if not D.is_dist():
        return [mine]
    import torch.distributed as dist

    states: list[Any] = [None] * D.world_size()
    dist.all_gather_object(states, mine)
    return states


def _state(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    skipped: int,
    frozen: set[str] | None = None,
    sharded: bool = False,
) -> dict[str, Any]:
    """Everything a step changes. Under FSDP2 a collective (every rank gathers; rank 0 saves): the objective and
    the optimiser state are stored as full tensors, the optimiser keyed by parameter name (torch DCP layout)."""
    rng = _rng_states()
    state: dict[str, Any] = {
        "step": step,
        "skipped_steps": skipped,
        "objective": training_state(objective, frozen),
        "torch_rng": rng[0],
        "torch_rng_per_rank": rng,
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        state["optimizer"] = get_optimizer_state_dict(objective, optimizer, options=opts)
        state["optimizer_layout"] = "full_by_name"
    else:
        state["optimizer"] = optimizer.state_dict()
    return state


def _restore_objective(objective: nn.Module, state: dict[str, Any], frozen: set[str]) -> None:
    """Load a checkpoint's tensors into the unwrapped objective (full tensors; frozen ones stay as built)."""
    missing, unexpected = objective.load_state_dict(state["objective"], strict=False)
    really_missing = [k for k in missing if k not in frozen]
    if really_missing or unexpected:
        raise CheckpointError(
            "the checkpoint does not match this run's model: "
            f"missing {really_missing[:5]}, unexpected {list(unexpected)[:5]}. Resume with the same config it was "
            "written with (saved as config.yaml in the run directory)."
        )


def _restore_optimizer(
    objective: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], sharded: bool
) -> None:
    """Optimiser state into the optimiser built after wrapping; under FSDP2 each rank keeps its shard."""
    by_name = state.get("optimizer_layout") == "full_by_name"
    if by_name != sharded:
        raise CheckpointError(
            f"the checkpoint's optimiser state was written {'with' if by_name else 'without'} "
            f"train.strategy=fsdp2 and this run uses {'fsdp2' if sharded else 'another strategy'}; resume with the "
            "strategy it was written with (saved as config.yaml in the run directory)."
        )
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            objective, optimizer, optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
    else:
        optimizer.load_state_dict(state["optimizer"])


def _restore_rng(state: dict[str, Any]) -> None:
    per_rank = state.get("torch_rng_per_rank")
    if per_rank and len(per_rank) == D.world_size():
        torch.set_rng_state(per_rank[D.rank()])
    else:  # older checkpoints, or a different world size: rank 0's state
        torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
