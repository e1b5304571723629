"""A Hugging Face model card (``README.md``) for an export, every number read from the run's own files.

The card sits next to ``model.safetensors``/``config.json`` so that a pushed export documents itself. Its front
matter is the Hub's model-card metadata (``library_name: timm``, ``license``, ``tags``, ``base_model``,
``datasets``, ``metrics``); the body states the base model and its licence, the method with the paper citation,
the ExPLoRA preset and trainable-parameter counts, the data and image count, steps, effective batch, precision,
wall time and hardware, and the evaluation numbers the run has. Sources, and nothing else:

- the export's ``config.json`` (timm layout) and ``model.json`` sidecar: architecture, licence, input size,
  normalisation, class names, ExPLoRA spec;
- the run directory's ``summary.json`` (``explora pretrain``: steps and run facts) or ``metrics.json``
  (``explora finetune``: accuracy, steps, trainable parameters and run facts), and its ``metrics.csv`` (the loss at
  the last logged step);
- ``metrics.json`` of each evaluation directory given (``explora linprobe``, ``knn``, ``finetune``, segmentation):
  its ``protocol``, ``top1``/``top5`` or ``miou``.

A fact no file holds is left out of the card, never filled in.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from explora.core.errors import CheckpointError
from explora.core.io import atomic_write_bytes

CARD = "README.md"
PAPER = (
    "Khanna, Irgau, Lobell, Ermon, *ExPLoRA: Parameter-Efficient Extended Pre-Training to Adapt Vision Transformers "
    "under Domain Shifts*, ICML 2025, [arXiv 2406.10973](https://arxiv.org/abs/2406.10973)"
)
BIBTEX = """@inproceedings{khanna2025explora,
  title     = {ExPLoRA: Parameter-Efficient Extended Pre-Training to Adapt Vision Transformers under Domain Shifts},
  author    = {Khanna, Samar and Irgau, Medhanie and Lobell, David B. and Ermon, Stefano},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2025}
}"""
# Licence ids the Hub knows; any other (e.g. timm's ``dinov3-license``) is written as ``license: other`` with
# ``license_name``, as the Hub's model-card metadata asks.
HUB_LICENSES = frozenset({"apache-2.0", "mit", "cc-by-4.0", "cc-by-nc-4.0", "cc-by-sa-4.0", "cc-by-nc-sa-4.0",
                          "bsd-3-clause", "openrail", "llama2", "llama3"})


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def _last_loss(csv_path: Path) -> tuple[int, float] | None:
    """(step, loss) of the last row of a run's ``metrics.csv`` that has a loss."""
    if not csv_path.is_file():
        return None
    last = None
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("loss") not in (None, ""):
                last = (int(float(row["step"])), float(row["loss"]))
    return last


def _dataset_name(spec: str) -> str:
    """The dataset's short name for the front matter: the spec's scheme (``fmow:/d/x.csv`` -> ``fmow``), else the
    folder's name."""
    head, sep, rest = spec.partition(":")
    if sep and head and "/" not in head:
        return head
    return Path(spec.rstrip("/")).name or spec


def _hub_base_model(architecture: str, family: str | None) -> str | None:
    """The Hub id of the base weights (timm's ``hf_hub_id``; MAE names looked up with their ``.mae`` tag)."""
    from timm.models import get_pretrained_cfg

    name = architecture if "." in architecture or family != "mae" else f"{architecture}.mae"
    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - unknown names raise different errors across timm versions
        return None
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return str(hub) if hub else None


def _yaml_list(values: Iterable[str]) -> str:
    return "".join(f"\n- {json.dumps(str(v))}" for v in values)


def _evaluations(eval_dirs: Iterable[str | os.PathLike[str]], own: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    sources = [(Path(d) / "metrics.json", _read_json(Path(d) / "metrics.json")) for d in eval_dirs]
    if own is not None:
        sources.insert(0, (None, own))
    for path, m in sources:
        if m is None:
            raise CheckpointError(f"{path}: no metrics.json; give evaluation directories written by explora")
        rows.append({
            "protocol": str(m.get("protocol", "?")),
            "top1": m.get("top1"),
            "top5": m.get("top5"),
            "miou": m.get("miou", m.get("mIoU")),
            "samples": m.get("num_samples"),
        })
    return rows


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else (f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}")


def model_card(
    export_dir: str | os.PathLike[str],
    run_dir: str | os.PathLike[str] | None = None,
    eval_dirs: Iterable[str | os.PathLike[str]] = (),
) -> str:
    """The model card's text for ``export_dir`` (which holds ``model.json``, and ``config.json`` for a timm
    export), from ``run_dir`` (default: the export's parent) and the evaluation directories."""
    export = Path(export_dir)
    side = _read_json(export / "model.json")
    if side is None:
        raise CheckpointError(f"{export}: no model.json; a model card describes an explora export")
    timm_cfg = _read_json(export / "config.json")
    run = Path(run_dir) if run_dir is not None else export.parent
    summary = _read_json(run / "summary.json") or {}
    own_metrics = _read_json(run / "metrics.json")  # a fine-tuning or segmentation run's evaluation
    facts = {**summary, **(own_metrics or {})}
    loss = _last_loss(run / "metrics.csv")
    own_eval = own_metrics if own_metrics and ("top1" in own_metrics or "miou" in own_metrics) else None
    evals = _evaluations(eval_dirs, own_eval)

    arch = str(side.get("architecture", "?"))
    family = side.get("family")
    license_id = side.get("license") or (timm_cfg or {}).get("pretrained_cfg", {}).get("license")
    base = _hub_base_model(arch, family)
    spec = (side.get("provenance") or {}).get("explora_spec") or {}
    classifier = bool(timm_cfg and timm_cfg.get("num_classes"))
    data = facts.get("data") or ((side.get("provenance") or {}).get("metadata") or {}).get("data")
    tags = ["timm", "explora", "vision-transformer", "lora", "self-supervised", *(["image-classification"]
            if classifier else ["image-feature-extraction"]), *([family] if family else [])]

    front = ["---", "library_name: timm"]
    if license_id and str(license_id).lower() in HUB_LICENSES:
        front.append(f"license: {str(license_id).lower()}")
    elif license_id:
        front += ["license: other", f"license_name: {license_id}"]
    front.append("tags:" + _yaml_list(tags))
    if base:
        front.append(f"base_model: {base}")
    if data:
        front.append("datasets:" + _yaml_list([_dataset_name(str(data))]))
    if evals:
        front.append("metrics:" + _yaml_list(["accuracy"] if any(e["top1"] is not None for e in evals) else ["miou"]))
    front.append("---")

    kind = "image classifier" if classifier else "backbone"
    lines = [*front, "", f"# ExPLoRA {kind}: {arch}" + (f" on {_dataset_name(str(data))}" if data else ""), ""]
    lines += ["## Use", ""]
    if timm_cfg is not None:
        lines += ["```python", "import timm", "", "model = timm.create_model(\"hf-hub:<user>/<repo>\", pretrained=True)"
                  "  # or \"local-dir:<this folder>\"", "cfg = timm.data.resolve_data_config(model=model)",
                  "transform = timm.data.create_transform(**cfg)", "```", ""]
        pcfg = timm_cfg.get("pretrained_cfg", {})
        lines.append(f"Input {pcfg.get('input_size')}, mean {pcfg.get('mean')}, std {pcfg.get('std')} (the "
                     "normalisation it was trained with), interpolation "
                     f"{pcfg.get('interpolation')}, crop_pct {pcfg.get('crop_pct')}.")
        if timm_cfg.get("label_names"):
            lines.append(f"Classes (head index order): {', '.join(map(str, timm_cfg['label_names']))}.")
    else:
        lines += ["```python", "from explora.models.export import load_encoder", "",
                  "model = load_encoder(\"<this folder>\")  # a group-channel / temporal encoder timm cannot build",
                  "```"]
    lines += ["", "## Base model and licence", ""]
    lines.append(f"Base: `{arch}`" + (f" ([{base}](https://huggingface.co/{base}))" if base else "")
                 + (f", weights from `{side['provenance']['source']}`" if (side.get("provenance") or {}).get("source")
                    else "") + ".")
    if license_id:
        lines.append(f"Licence: `{license_id}`, the base weights' licence, which these derived weights keep.")
    lines += ["", "## Method", "",
              f"ExPLoRA ({PAPER}): continued self-supervised pre-training ({facts.get('objective', family or '?')} "
              "objective) on the new domain with a few unfrozen blocks, the norms and LoRA on the attention's Q/V; "
              "LoRA is merged into the weights, so the architecture is the base model's.", ""]
    if spec:
        lines.append(f"Preset `{spec.get('preset')}`: LoRA rank {spec.get('lora_rank')} on "
                     f"{', '.join(spec.get('lora_targets') or [])}, unfrozen blocks {spec.get('unfrozen_blocks')}.")
    params = facts.get("parameters") or {}
    if params:
        lines += ["", "| trainable parameters | count |", "|---|---:|"]
        lines += [f"| {group} | {_fmt(n)} |" for group, n in (params.get("groups") or {}).items()]
        lines.append(f"| backbone total (paper count) | {_fmt(params.get('trainable_backbone'))} |")
        if params.get("percentage") is not None:
            lines.append(f"| share of the backbone | {params['percentage']:.2f} % |")
    trainable = facts.get("trainable")
    if isinstance(trainable, dict):
        lines += ["", f"Fine-tuning: {facts.get('mode', '?')} mode, recipe {facts.get('recipe', '?')}, trainable "
                  f"{_fmt(trainable.get('backbone'))} backbone + {_fmt(trainable.get('head'))} head parameters."]
    lines += ["", "## Training run", "", "| fact | value |", "|---|---|"]
    rows = [
        ("data", f"`{data}`" if data else None),
        ("images", _fmt(facts.get("images")) if facts.get("images") is not None else None),
        ("image size", facts.get("image_size")),
        ("optimiser steps", _fmt(facts.get("steps")) if facts.get("steps") is not None else None),
        ("effective batch", facts.get("effective_batch")),
        ("precision", facts.get("precision")),
        ("processes", facts.get("processes")),
        ("hardware", facts.get("hardware") or facts.get("device")),
        ("wall time", f"{facts['wall_time_s'] / 60:.1f} min" if facts.get("wall_time_s") is not None else None),
        ("loss at last logged step", f"{loss[1]:.4f} (step {loss[0]})" if loss else None),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    if evals:
        lines += ["", "## Evaluation", "", "| protocol | top-1 | top-5 | mIoU | samples |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {e['protocol']} | {_fmt(e['top1'])} | {_fmt(e['top5'])} | {_fmt(e['miou'])} | "
                  f"{_fmt(e['samples'])} |" for e in evals]
    lines += ["", "## Citation", "", "```bibtex", BIBTEX, "```", "",
              f"Written by explora {(side.get('provenance') or {}).get('explora_version', '')} from the run's files.",
              ""]
    return "\n".join(lines)


def write_model_card(
    export_dir: str | os.PathLike[str],
    run_dir: str | os.PathLike[str] | None = None,
    eval_dirs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Write :func:`model_card` as ``<export_dir>/README.md`` (atomically); returns its path."""
    path = Path(export_dir) / CARD
    atomic_write_bytes(path, model_card(export_dir, run_dir, eval_dirs).encode())
    return path


__all__ = ["CARD", "model_card", "write_model_card"]
