"""``explora pretrain``: backbone -> ExPLoRA parameterisation -> objective -> data; train; export the merged model.

The config mirrors the paper's recipe (the shipped presets in ``explora/presets/``, loaded by name); every section is a
dataclass, so a misspelled key is an error with a suggestion, and the effective config is saved atomically as
``config.yaml`` in the run directory (``--resume`` re-reads it from there). The ``adapt:`` section is the
:class:`~explora.models.adapt.ExploraSpec` itself: its ``preset`` supplies the values of the keys not given.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from timm.layers import DropPath

from explora.core.config import compose, from_dict, save_yaml, section, to_dict
from explora.core.errors import ConfigError, DataError
from explora.core.io import atomic_write_bytes
from explora.core.precision import hardware_name, resolve_precision
from explora.data.specs import build_dataset
from explora.engine import parallel as D
from explora.engine.lengths import accumulation_steps, resolve_lengths
from explora.engine.trainer import OptimConfig, TrainConfig, TrainResult, train
from explora.models.adapt import ExploraSpec, apply_explora, preset_spec
from explora.models.backbone import build_backbone
from explora.models.export import infer_model_args
from explora.models.model_card import write_model_card
from explora.objectives.mae.config import MAEConfig
from explora.presets import config_path

_log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    name: str = "dinov2_vits14"
    weights: str | None = "default"  # "default" = the upstream file for `name` (torch hub cache honoured)
    img_size: int | None = None  # input size the model is used at (position embeddings stay on the checkpoint grid)
    in_chans: int = 3
    drop_path_rate: float = 0.0  # DinoV2 fMoW configs: 0.0; default config: 0.3
    drop_path_uniform: bool = True  # DinoV2 train.drop_path_uniform: same rate in every block (timm: linear in depth)
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile every transformer block in place (GPU speed-up; minutes of compiling)


@dataclass
class DataConfig:
    spec: str = ""  # dataset selection, e.g. "folder:/data/chips" or "fmow:/data/train_62classes.csv"
    image_size: int = 256  # every image is resized (shorter side) and centre-cropped to this before batching
    on_error: Literal["raise", "skip"] = "raise"


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapt: ExploraSpec = section(lambda: preset_spec("D-[L]-r64"), read=ExploraSpec.from_config)
    data: DataConfig = field(default_factory=DataConfig)
    objective: Literal["dinov2", "mae"] = "dinov2"
    dinov2: dict[str, Any] = field(default_factory=dict)  # explora.objectives.dinov2 config (validated at build)
    mae: dict[str, Any] = field(default_factory=dict)  # explora.objectives.mae config (validated at build)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/pretrain"
    export_formats: list[str] = field(default_factory=lambda: ["safetensors", "encoder", "teacher"])


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    """YAML file or shipped preset name (optional) + ``key=value`` overrides -> validated :class:`PretrainConfig`."""
    cfg = compose(PretrainConfig, config_path(path) if path else None, overrides)
    objective_config(cfg)  # validate the objective section now, not after minutes of set-up
    return cfg


def objective_config(cfg: PretrainConfig) -> Any:
    if cfg.objective == "dinov2":
        from explora.objectives.dinov2.config import DinoV2Config

        return from_dict(DinoV2Config, cfg.dinov2, "dinov2")

    return from_dict(MAEConfig, cfg.mae, "mae")


def set_uniform_drop_path(backbone: torch.nn.Module, rate: float) -> None:
    """DinoV2's ``drop_path_uniform``: every block drops its residual branches with the same probability."""

    for block in backbone.blocks:
        block.drop_path1 = DropPath(rate)
        block.drop_path2 = DropPath(rate)


def build_objective(cfg: PretrainConfig, dataset_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None):
    """Backbone with the ExPLoRA parameterisation, wrapped in the configured objective.

    ``dataset_stats`` (per-band mean, std) fill the objective's normalisation when the config does not set it.
    """

    torch.manual_seed(cfg.train.seed)  # random parts of the model (heads, decoder) are reproducible on resume
    backbone = build_backbone(
        cfg.model.name,
        weights=cfg.model.weights,
        img_size=cfg.model.img_size,
        in_chans=cfg.model.in_chans,
        drop_path_rate=0.0 if cfg.model.drop_path_uniform else cfg.model.drop_path_rate,
    )
    if cfg.model.drop_path_uniform and cfg.model.drop_path_rate > 0:
        set_uniform_drop_path(backbone, cfg.model.drop_path_rate)
    if cfg.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    apply_explora(backbone, cfg.adapt)
    section = dict(cfg.dinov2 if cfg.objective == "dinov2" else cfg.mae)
    if dataset_stats is not None and "mean" not in section and "std" not in section:
        section["mean"], section["std"] = (list(v) for v in dataset_stats)
    if cfg.objective == "dinov2":
        from explora.objectives.dinov2.config import DinoV2Config
        from explora.objectives.dinov2.objective import DinoV2Objective

        objective = DinoV2Objective(backbone, from_dict(DinoV2Config, section, "dinov2"), total_steps=cfg.train.steps)
    else:
        from explora.objectives.mae.config import MAEConfig
        from explora.objectives.mae.variants import build_mae_objective

        objective = build_mae_objective(backbone, from_dict(MAEConfig, section, "mae"))
    if cfg.model.compile:
        if cfg.train.strategy == "fsdp2":
            raise ConfigError("model.compile with train.strategy=fsdp2 is not tested; use ddp or model.compile=false.")
        compile_blocks(objective)
    return objective


def compile_blocks(module: torch.nn.Module) -> int:
    """``torch.compile`` every transformer block inside ``module`` (student, teacher, MAE decoder) in place.

    ``Module.compile`` keeps parameter names and the state dict unchanged, which checkpoints, exports and the EMA
    teacher (paired by name) rely on; compiling per block keeps graphs small and shared by same-shaped blocks.
    Compilation happens on the first call. Returns the number of blocks.
    """
    blocks = D.vit_blocks(module)
    for block in blocks:
        block.compile()
    return len(blocks)


def run_pretrain(cfg: PretrainConfig, *, resume: bool = False) -> TrainResult:
    """Train, then export the merged backbone (teacher for DinoV2, encoder for MAE) to ``<output_dir>/export``."""

    out = Path(cfg.output_dir)
    device = D.init_distributed()  # before anything reads the rank or the world size (torchrun: every process)
    if resume:
        check_resume_config(cfg, out / "config.yaml")
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")
    dataset = build_dataset(cfg.data.spec, split="train", image_size=cfg.data.image_size, on_error=cfg.data.on_error)
    bands = getattr(dataset, "in_chans", None)
    if bands is not None and cfg.objective == "dinov2" and bands != cfg.model.in_chans:
        raise DataError(
            f"dataset {cfg.data.spec!r} has {bands} band(s) but the model takes model.in_chans={cfg.model.in_chans}. "
            "Set model.in_chans to the band count (RGB weights are adapted to it), or for grayscale data add "
            "':rgb=true' to the dataset spec to replicate the band."
        )
    stats = (tuple(dataset.mean), tuple(dataset.std)) if hasattr(dataset, "mean") else None
    cfg = resolve_run_lengths(cfg, len(dataset))  # epochs and default warm-up/freeze -> steps (config.yaml keeps them)
    cfg = resolve_memory_settings(cfg, device, out)  # dinov2.split_backward: auto (config.yaml keeps "auto")
    objective = build_objective(cfg, stats)
    started = time.perf_counter()
    result = train(objective, dataset, cfg.optim, cfg.train, out, resume=resume)
    wall = time.perf_counter() - started
    D.gather_full_(objective)  # every rank (a collective under FSDP2; train() already did it, then a no-op)
    if D.is_main():
        from explora.models.export import export_backbone, export_wrapped_encoder, is_wrapped
        from explora.models.registry import get_backbone_spec

        spec = get_backbone_spec(cfg.model.name)
        encoder = objective.export_backbone()
        from explora.data.medical import input_channels_record

        metadata = {"config": to_dict(cfg), "steps": result.steps_done, **input_channels_record(dataset)}
        if is_wrapped(encoder):  # group-channel / temporal MAE: safetensors + sidecar describing the wrapper
            paths = export_wrapped_encoder(
                encoder, out / "export", spec.timm_name, base_model_args(cfg, spec.timm_name), metadata
            )
        else:
            norm = objective.config  # the normalisation the run trained with (dataset statistics unless configured)
            paths = export_backbone(
                encoder,
                out / "export",
                timm_name=spec.timm_name,
                formats=tuple(cfg.export_formats),
                metadata=metadata,
                data_config={"mean": getattr(norm, "mean", None), "std": getattr(norm, "std", None)},
            )
        summary = {
            "steps": result.steps_done,
            "skipped_steps": result.skipped_steps,
            "skipped_samples": result.skipped_samples,
            "loader_restarts": result.loader_restarts,
            "last_terms": result.last_terms,
            "exports": {k: str(v) for k, v in paths.items()},
            **run_facts(cfg, objective, len(dataset), wall),
        }
        atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
        if "timm_config" in paths or "sidecar" in paths:
            write_model_card(out / "export", out)
    return result


def resolve_memory_settings(cfg: PretrainConfig, device: torch.device, out: Path) -> PretrainConfig:
    """``cfg`` with ``dinov2.split_backward: auto`` resolved for ``device`` from the memory estimate; the choice
    and every estimate are logged and saved as ``run_metadata.json`` (key ``memory_choice``) in ``out``."""
    from explora.recipes.memory import resolve_auto_memory  # memory.py builds objectives with build_objective

    cfg, choice = resolve_auto_memory(cfg, device)
    if choice is None:
        return cfg
    mode = choice["split_backward"] + (" + gradient checkpointing" if choice["grad_checkpointing"] else "")
    _log.info("dinov2.split_backward: auto -> %s (predicted peak %.0f MiB of %.0f MiB available, %s, margin %.0f%%"
              "%s); estimates MiB: %s", mode, choice["predicted_peak_mib"], choice["available_mib"],
              choice["available_source"], 100 * choice["margin"], "" if choice["fits"] else "; NONE FITS",
              choice["estimates_mib"])
    if D.is_main():
        atomic_write_bytes(out / "run_metadata.json", json.dumps({"memory_choice": choice}, indent=2).encode())
    return cfg


def run_facts(cfg: PretrainConfig, objective: torch.nn.Module, images: int, wall_s: float) -> dict[str, Any]:
    """What produced a run, for ``summary.json`` and the model card: model, preset, data spec and image count,
    effective batch, resolved precision, processes, hardware, wall time of the training loop (this process;
    a resumed run counts its last part), and the trainable parameters per ExPLoRA group."""
    device = next(objective.parameters()).device
    world = D.world_size()
    accum = accumulation_steps(cfg.train.batch_size, world, cfg.train.accum_steps, cfg.train.effective_batch)
    return {
        "model": cfg.model.name,
        "objective": cfg.objective,
        "preset": cfg.adapt.preset,
        "data": cfg.data.spec,
        "images": int(images),
        "image_size": cfg.data.image_size,
        "batch_size": cfg.train.batch_size,
        "effective_batch": cfg.train.batch_size * world * accum,
        "precision": resolve_precision(cfg.train.precision, device),
        "processes": world,
        "hardware": hardware_name(device),
        "wall_time_s": round(float(wall_s), 1),
        "parameters": objective.parameter_report().to_dict(),
    }


def resolve_run_lengths(cfg: PretrainConfig, dataset_len: int) -> PretrainConfig:
    """``cfg`` with ``train``/``optim`` lengths in optimiser steps for this dataset and world size, so that what
    reads ``cfg.train.steps`` (the DinoV2 teacher schedules) sees the run's real length."""
    optim, train = resolve_lengths(cfg.optim, cfg.train, dataset_len, D.world_size())
    return replace(cfg, optim=optim, train=train)


def base_model_args(cfg: PretrainConfig, timm_name: str) -> dict[str, Any]:
    """timm kwargs of the run's base ViT, from an architecture-only rebuild on the meta device (no memory, no I/O)."""

    with torch.device("meta"):
        vit = build_backbone(cfg.model.name, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans)
    return infer_model_args(vit, timm_name)


# Keys that change how a run is fed, logged or checkpointed, not what it computes: they may differ on --resume.
RESUME_FREE_KEYS = frozenset({
    "output_dir", "export_formats", "train.num_workers", "train.log_every", "train.ckpt_every", "train.keep_last",
    "train.tensorboard", "train.loggers", "train.max_loader_restarts", "train.max_nonfinite_steps", "train.eval_every",
})


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix[:-1]: data}
    return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def check_resume_config(cfg: PretrainConfig, saved_path: Path) -> None:
    """Refuse ``--resume`` with a config that computes something else than the saved run (before anything is
    written): its checkpoints would be continued under different settings, or not fit the model at all."""
    if not saved_path.is_file():
        return
    saved, now = _flat(to_dict(load_config(saved_path))), _flat(to_dict(cfg))
    diffs = [k for k in sorted(saved.keys() | now.keys()) if k not in RESUME_FREE_KEYS and saved.get(k) != now.get(k)]
    if diffs:
        listed = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in diffs[:5])
        raise ConfigError(
            f"--resume with a different config than the run in {saved_path.parent} ({listed}"
            f"{'; ...' if len(diffs) > 5 else ''}). Nothing was changed. Resume with the saved {saved_path} "
            "(only logging, checkpoint and worker settings may differ), or choose a new output_dir."
        )


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it the output_dir of an explora run?")
    return load_config(path, overrides)
