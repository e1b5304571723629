"""``explora params`` (trainable-parameter report for a preset) and ``explora export`` (merge LoRA, write files)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explora.core.errors import ConfigError
from explora.models.adapt import PRESETS, ExploraSpec, apply_explora, preset_options
from explora.models.export import FORMATS, export_backbone, load_adapted
from explora.models.params import memory_estimate, parameter_report
from explora.recipes.memory import objective_report


def _int_list(text: str) -> tuple[int, ...]:
    """``"0,-1"`` -> (0, -1); ``""`` -> ()."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices like '0,-1', got {text!r}") from err


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.unfrozen_blocks is not None:
        out["unfrozen_blocks"] = args.unfrozen_blocks
    if args.lora_rank is not None:
        out["lora_rank"] = args.lora_rank
    if args.lora_targets is not None:
        out["lora_targets"] = tuple(t for t in args.lora_targets.split(",") if t)
    return out


def _build(name: str, device: str | torch.device = "cpu") -> nn.Module:
    from explora.models.backbone import build_backbone

    with torch.device(device):
        return build_backbone(name)


def _spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "spec", None):
        if not Path(args.spec).is_file():
            raise ConfigError(f"--spec {args.spec}: file not found; expected an ExploraSpec YAML file")
        return ExploraSpec.from_yaml(Path(args.spec).read_text()).options()
    return preset_options(args.preset, **_overrides(args)) | {"preset": args.preset}


def _memory_config(args: argparse.Namespace):
    """The PretrainConfig to estimate: ``--config`` + overrides, or the defaults for ``--model``/``--preset``."""
    from explora.recipes.pretrain import load_config

    overrides = list(args.overrides or [])
    if args.config is None:
        overrides = [f"model.name={args.model}", f"adapt.preset={args.preset}", "model.weights=null", *overrides]
    return load_config(args.config, overrides)


def memory_command(args: argparse.Namespace) -> int:
    """Predicted peak training memory (explora.recipes.memory) of a config: the configured setting plus all four."""
    from explora.recipes.memory import estimate_all, summary_markdown

    cfg = _memory_config(args)
    reports = estimate_all(cfg)
    chosen = next(r for r in reports if r.precision == cfg.train.precision
                  and r.grad_checkpointing == cfg.model.grad_checkpointing)
    if args.json:
        print(json.dumps({"configured": chosen.to_dict(), "all": [r.to_dict() for r in reports]}, indent=2))
    else:
        d = chosen.details
        print(f"## {d['model']}, preset {d['preset']}, batch {d['batch_size']}, crops {d['crops']}\n")
        print(chosen.to_markdown())
        print()
        print(summary_markdown(reports))
    return 0


def objective_params_command(args: argparse.Namespace) -> int:
    from explora.recipes.pretrain import load_config

    cfg = load_config(args.config, list(args.overrides or []))
    report = objective_report(cfg)
    if args.json:
        print(json.dumps({"config": args.config, "objective": cfg.objective, **report.to_dict()}, indent=2))
    else:
        print(f"## {cfg.model.name}, {cfg.objective} objective, preset {cfg.adapt.preset}\n")
        print(report.to_markdown())
    return 0


def params_command(args: argparse.Namespace) -> int:
    """Print the trainable-parameter report of a backbone under a preset (built on the meta device: no memory)."""
    if args.memory and (args.config or args.overrides):
        return memory_command(args)
    if args.config:
        return objective_params_command(args)
    if args.model is None:
        raise ConfigError("explora params: give --model NAME (with --preset) or --config CONFIG.yaml --memory")
    model = _build(args.model, "meta")
    apply_explora(model, **_spec_from_args(args))
    report = parameter_report(model)
    mem = memory_estimate(report) if args.memory else None
    if args.json:
        payload: dict[str, Any] = {"model": args.model, "preset": args.preset, **report.to_dict()}
        if mem is not None:
            payload["memory_bytes"] = mem.to_dict()
        print(json.dumps(payload, indent=2))
    else:
        print(f"## {args.model}, preset {args.preset}\n")
        print(report.to_markdown())
        if mem is not None:
            print()
            print(mem.to_markdown())
    return 0


def export_command(args: argparse.Namespace) -> int:
    """Load adapted weights, merge LoRA and write the export formats."""
    from explora.models.registry import get_backbone_spec

    options = _spec_from_args(args) if (args.spec or args.preset) else None
    model = load_adapted(args.model, args.weights, options)
    timm_name = args.timm_name or get_backbone_spec(args.model).timm_name
    paths = export_backbone(
        model, args.out, timm_name, formats=tuple(args.formats.split(",")), metadata={"weights": str(args.weights)}
    )
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _add_spec_args(p: argparse.ArgumentParser, preset_default: str | None) -> None:
    p.add_argument("--preset", default=preset_default, help=f"one of {sorted(PRESETS)}")
    p.add_argument("--spec", help="an ExploraSpec YAML (overrides --preset)")
    p.add_argument("--unfrozen-blocks", type=_int_list, help="override, e.g. '0,-1' ('' for none)")
    p.add_argument("--lora-rank", type=int, help="override the LoRA rank (0 = no LoRA)")
    p.add_argument("--lora-targets", help="override, e.g. 'q,v' or 'q,k,v,proj'")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``params`` and ``export``."""
    p = subparsers.add_parser("params", help="trainable parameters of a backbone under an ExPLoRA preset")
    p.add_argument("--model", help="backbone short name (e.g. dinov2_vitl14) or timm name")
    _add_spec_args(p, "D-[L]-r64")
    p.add_argument("--config", help="a pretrain config YAML: with --memory, predict its peak training memory")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (with --config/--memory)")
    p.add_argument("--memory", action="store_true",
                   help="with --config: predicted peak training memory (weights, optimiser, activations); "
                        "with --model only: weights/gradients/AdamW")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.set_defaults(func=params_command)

    e = subparsers.add_parser("export", help="merge LoRA and export timm safetensors / encoder-only / teacher files")
    e.add_argument("--model", required=True, help="backbone short name or timm name the weights belong to")
    e.add_argument("--weights", required=True, help="adapted checkpoint (with LoRA tensors) or any upstream file")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {list(FORMATS)}")
    e.add_argument("--timm-name", help="timm architecture to record (default: the registry's for --model)")
    _add_spec_args(e, None)
    e.set_defaults(func=export_command)
