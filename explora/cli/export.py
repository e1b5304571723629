"""``explora params`` (trainable-parameter report for a preset) and ``explora export`` (merge LoRA, write files)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explora.cli.config_args import add_config_arguments, config_from_args
from explora.core.errors import ConfigError
from explora.models.adapt import ExploraSpec, apply_explora
from explora.models.backbone import build_backbone
from explora.models.export import export_backbone, load_adapted
from explora.models.model_card import write_model_card
from explora.models.params import memory_estimate, parameter_report
from explora.models.registry import get_backbone_spec
from explora.recipes.export_config import ExportConfig, ParamsConfig
from explora.recipes.memory import (
    auto_choice,
    available_memory,
    estimate_all,
    objective_report,
    summary_markdown,
)
from explora.recipes.pretrain import load_config


def _build(name: str, device: str | torch.device = "cpu", in_chans: int = 3) -> nn.Module:

    with torch.device(device):
        return build_backbone(name, in_chans=in_chans)


def _spec_options(spec: ExploraSpec | None) -> dict[str, Any] | None:
    return None if spec is None else spec.options() | {"preset": spec.preset}


def _memory_config(cfg: ParamsConfig, overrides: list[str]):
    """The PretrainConfig to estimate: ``config`` + overrides, or the defaults for ``model``/``adapt.preset``."""

    if cfg.config is None:
        overrides = [f"model.name={cfg.model}", f"adapt.preset={cfg.adapt.preset}", "model.weights=null", *overrides]
    return load_config(cfg.config, overrides)


def memory_command(cfg: ParamsConfig, overrides: list[str]) -> int:
    """Predicted peak training memory (explora.recipes.memory) of a config: the configured setting plus all four."""

    pretrain = _memory_config(cfg, overrides)
    precision = "bf16" if pretrain.train.precision == "auto" else pretrain.train.precision  # as estimate_all
    auto = _auto_choice(cfg, pretrain, precision)
    if auto is not None:  # the tables show the mode auto picks
        pretrain = replace(pretrain, dinov2={**pretrain.dinov2, "split_backward": auto["split_backward"]})
    reports = estimate_all(pretrain)
    ckpt = auto["grad_checkpointing"] if auto is not None else pretrain.model.grad_checkpointing
    chosen = next(r for r in reports if r.precision == precision and r.grad_checkpointing == ckpt)
    if cfg.json:
        print(json.dumps({"configured": chosen.to_dict(), "all": [r.to_dict() for r in reports], "auto_choice": auto},
                         indent=2))
    else:
        d = chosen.details
        print(f"## {d['model']}, preset {d['preset']}, batch {d['batch_size']}, crops {d['crops']}\n")
        print(chosen.to_markdown())
        print()
        print(summary_markdown(reports))
        if auto is not None:
            mode = auto["split_backward"] + (" + gradient checkpointing" if auto["grad_checkpointing"] else "")
            print(f"\ndinov2.split_backward: auto with {auto['available_mib'] / 1024:.1f} GiB "
                  f"({auto['available_source']}, {100 * auto['margin']:.0f}% margin) -> **{mode}** "
                  f"(predicted {auto['predicted_peak_mib'] / 1024:.1f} GiB{'' if auto['fits'] else ', does not fit'})")
    return 0


def _auto_choice(cfg: ParamsConfig, pretrain: Any, precision: str) -> dict[str, Any] | None:
    """What ``dinov2.split_backward: auto`` picks for ``--available-gib`` (or this machine); None if not auto."""
    if pretrain.objective != "dinov2" or pretrain.dinov2.get("split_backward", "auto") != "auto":
        return None
    if cfg.available_gib is not None:
        available, source = int(cfg.available_gib * 1024**3), "--available-gib"
    else:
        available, source = available_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return auto_choice(pretrain, available, precision=precision, source=source)


def objective_params_command(cfg: ParamsConfig, overrides: list[str]) -> int:

    pretrain = load_config(cfg.config, overrides)
    report = objective_report(pretrain)
    if cfg.json:
        print(json.dumps({"config": cfg.config, "objective": pretrain.objective, **report.to_dict()}, indent=2))
    else:
        print(f"## {pretrain.model.name}, {pretrain.objective} objective, preset {pretrain.adapt.preset}\n")
        print(report.to_markdown())
    return 0


def params_command(args: argparse.Namespace) -> int:
    """Print the trainable-parameter report of a backbone under a preset (built on the meta device: no memory)."""
    cfg: ParamsConfig = config_from_args(args)
    overrides = list(args.pretrain_overrides or [])
    if cfg.memory and (cfg.config or overrides):
        return memory_command(cfg, overrides)
    if cfg.config:
        return objective_params_command(cfg, overrides)
    if cfg.model is None:
        raise ConfigError("explora params: give --model NAME (with --preset) or --config CONFIG.yaml --memory")
    spec = cfg.explora_spec()
    model = _build(cfg.model, "meta", cfg.in_chans)
    apply_explora(model, spec)
    report = parameter_report(model)
    mem = memory_estimate(report) if cfg.memory else None
    if cfg.json:
        payload: dict[str, Any] = {"model": cfg.model, "preset": spec.preset, "in_chans": cfg.in_chans,
                                   **report.to_dict()}
        if mem is not None:
            payload["memory_bytes"] = mem.to_dict()
        print(json.dumps(payload, indent=2))
    else:
        print(f"## {cfg.model}, preset {spec.preset}\n")
        print(report.to_markdown())
        if mem is not None:
            print()
            print(mem.to_markdown())
    return 0


def _run_dir(weights: str, out: str) -> Path:
    """The run a checkpoint belongs to (``<run>/checkpoints/ckpt.pth`` or ``<run>/x.pth``: the folder with its
    ``summary.json``), whose facts the model card reads; else the export folder itself (no run facts)."""
    here = Path(weights).resolve().parent
    return next((d for d in (here, here.parent) if (d / "summary.json").is_file()), Path(out))


def export_command(args: argparse.Namespace) -> int:
    """Load adapted weights, merge LoRA and write the export formats."""

    cfg: ExportConfig = config_from_args(args)
    model = load_adapted(cfg.model, cfg.weights, _spec_options(cfg.explora_spec()))
    timm_name = cfg.timm_name or get_backbone_spec(cfg.model).timm_name
    paths = export_backbone(
        model, cfg.out, timm_name, formats=tuple(cfg.formats), metadata={"weights": str(cfg.weights)}
    )
    paths["model_card"] = write_model_card(cfg.out, run_dir=_run_dir(cfg.weights, cfg.out))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``params`` and ``export``; their flags are the fields of ParamsConfig / ExportConfig (adapt
    flattened: ``--preset``, ``--lora-rank`` ...)."""
    p = subparsers.add_parser("params", help="trainable parameters of a backbone under an ExPLoRA preset")
    add_config_arguments(p, ParamsConfig, flatten=("adapt",), config_file=False, overrides=False)
    p.add_argument("pretrain_overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of the pretrain config (with --config / --memory), e.g. model.name=dinov2_vitb14")
    p.set_defaults(func=params_command)

    e = subparsers.add_parser("export", help="merge LoRA and export timm safetensors / encoder-only / teacher files")
    add_config_arguments(e, ExportConfig, flatten=("adapt",))
    e.set_defaults(func=export_command)
