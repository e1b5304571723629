"""Export an adapted backbone with LoRA merged, in the layouts people load: timm, and the released ExPLoRA files.

The paper's output is ``W_T* = W_S + Delta_T`` with LoRA folded in, so the architecture is unchanged (ExPLoRA README:
"All checkpoints have LoRA adapters already merged into the weights"). We write:

- ``safetensors``: ``model.safetensors``, a plain timm state dict, with ``config.json`` in timm's Hugging Face layout
  (:func:`write_timm_config`), so ``timm.create_model("local-dir:<export>", pretrained=True)`` rebuilds and loads it
  with no other argument (checked with timm 1.0.31), plus ``model.json`` (timm name, ``model_args``, input size,
  stored position-embedding grid, channels, the weights' ``license``, provenance, sha256 of each file). It also
  loads with
  ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), **model_args)``; the position
  embedding is stored on the backbone's own grid (the checkpoint's, e.g. DinoV2's 37x37) and ``dynamic_img_size``
  makes timm interpolate it per forward exactly as the adapted model did, at any input size. No extra keys are
  written: timm's DinoV2 ``checkpoint_filter_fn`` treats a ``mask_token`` key as an original DinoV2 file and would
  convert it (ecosystem-notes §1.6).
- ``encoder``: ``encoder_only.pth`` = ``{'model': state}`` in the upstream layout, like the released
  ``explora_dinov2_vit_*_fmow_rgb_encoder_only.pth`` (DinoV2 keys incl. ``mask_token``, ``register_tokens`` and
  ``mlp.w12/w3`` for SwiGLU; MAE/timm keys otherwise).
- ``teacher``: ``teacher.pth`` = ``{'teacher': {'backbone.<key>': ..., '<head>.<key>': ...}}`` like the released full
  DinoV2 ExPLoRA checkpoints, which keep merged ``qkv`` *and* split ``q_proj/k_proj/v_proj`` (paper-notes §6.4).

Every file is written atomically (temp file in the same directory, fsync, ``os.replace``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import Tensor, nn

from explora.core.errors import CheckpointError, ConfigError
from explora.core.io import atomic_write, sha256_file
from explora.models.adapt import ExploraSpec, apply_explora
from explora.models.backbone import build_backbone, input_size
from explora.models.checkpoints import adapted_backbone_state, load_checkpoint_file
from explora.models.encoder import as_encoder, rebuild_encoder
from explora.models.record import ExploraRecord, attach_record, record_of
from explora.models.registry import SATMAE_LICENSE, base_license
from explora.vit.lora import merged_state_dict

FORMATS = ("safetensors", "encoder", "teacher")
TIMM_CONFIG = "config.json"
# Classifier pools with a timm equivalent: the ``model_args`` that make timm's ViT head pool the same way.
# ``cls``: final-norm CLS token (timm ``global_pool='token'``); ``avg``: mean of the final-norm patch tokens
# (``global_pool='avg', fc_norm=False``); ``avg_fc_norm``: mean of the last block's patch tokens, then ``fc_norm``
# (``global_pool='avg'``, timm's final ``norm`` an Identity). ``cls+avg`` has none.
TIMM_POOLS: dict[str, dict[str, Any]] = {
    "cls": {"global_pool": "token"},
    "avg": {"global_pool": "avg", "fc_norm": False},
    "avg_fc_norm": {"global_pool": "avg", "fc_norm": True},
}
FILE_NAMES = {"safetensors": "model.safetensors", "encoder": "encoder_only.pth", "teacher": "teacher.pth"}
SIDECAR = "model.json"
_QKV = re.compile(r"^(blocks\.\d+\.attn\.)qkv\.(weight|bias)$")


def _plain(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous fp tensors that own their storage (safetensors refuses shared or strided storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def _family(model: nn.Module, timm_name: str, metadata: Mapping[str, Any] | None) -> str:
    if metadata and metadata.get("family"):
        return str(metadata["family"])
    if "dinov2" in timm_name:
        return "dinov2"
    if "dinov3" in timm_name:
        return "dinov3"
    return "mae" if ".mae" in timm_name else "timm"


def infer_model_args(model: nn.Module, timm_name: str) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs that rebuild ``model``'s architecture from ``timm_name``.

    Always ``num_classes``, ``img_size``, ``in_chans``, ``dynamic_img_size``; plus width/depth/heads/patch when they
    differ from the registered factory (e.g. the tiny ``test_*`` backbones). Verified by building on the meta device.
    """
    pe = model.patch_embed
    args: dict[str, Any] = {
        "num_classes": 0,
        "img_size": list(pe.img_size),
        "in_chans": int(pe.proj.in_channels),
        "dynamic_img_size": bool(model.dynamic_img_size),
    }
    try:
        with torch.device("meta"):
            ref = timm.create_model(timm_name, pretrained=False, num_classes=0)
    except RuntimeError as err:
        raise ConfigError(f"timm_name {timm_name!r} is not a timm model ({err})") from err
    candidates = {
        "embed_dim": (int(model.embed_dim), int(ref.embed_dim)),
        "depth": (len(model.blocks), len(ref.blocks)),
        "num_heads": (int(model.blocks[0].attn.num_heads), int(ref.blocks[0].attn.num_heads)),
        "patch_size": (list(pe.patch_size), list(ref.patch_embed.patch_size)),
    }
    args.update({k: ours for k, (ours, theirs) in candidates.items() if ours != theirs})
    with torch.device("meta"):
        rebuilt = timm.create_model(timm_name, pretrained=False, **args)
    want = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in merged_state_dict(model).items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:5]
        raise ConfigError(
            f"cannot describe this model as timm {timm_name!r} with {args}: state-dict shapes differ ({diff}); "
            "pass metadata={'model_args': {...}} with the right timm kwargs"
        )
    return args


def to_upstream_layout(sd: Mapping[str, Tensor], family: str, mask_token: Tensor | None = None) -> dict[str, Tensor]:
    """timm keys -> the upstream encoder layout (inverse of timm's ``_convert_dinov2`` for DinoV2; identity otherwise).

    DinoV2 with registers: ``reg_token`` -> ``register_tokens`` and a zero cls slot prepended to ``pos_embed`` (the cls
    position embedding is already folded into ``cls_token``, so converting back adds zero: exact). SwiGLU
    ``mlp.fc1/fc2`` -> ``mlp.w12/w3``. ``mask_token`` (1, D) is added (zeros if unknown, as in the S/B/L originals).
    """
    out = dict(sd)
    if family != "dinov2":
        return out
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")  # (1, R, D)
        pos = out["pos_embed"]  # (1, N, D) patches only
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)  # (1, 1 + N, D)
    swiglu = {
        m.group(1)
        for k in out
        if (m := re.match(r"^(blocks\.\d+\.mlp\.)fc1\.weight$", k))
        and out[k].shape[0] == 2 * out[f"{m.group(1)}fc2.weight"].shape[1]
    }
    renamed = {}
    for k, v in out.items():
        prefix = next((p for p in swiglu if k.startswith(p)), None)
        if prefix is not None:
            k = prefix + k[len(prefix) :].replace("fc1.", "w12.", 1).replace("fc2.", "w3.", 1)
        renamed[k] = v
    dim = renamed["cls_token"].shape[-1]
    renamed["mask_token"] = (
        mask_token.detach().reshape(1, dim).to(renamed["cls_token"]) if mask_token is not None
        else renamed["cls_token"].new_zeros(1, dim)
    )
    return renamed


def split_qkv(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Add ``q_proj/k_proj/v_proj`` (rows 0:D, D:2D, 2D:3D of the fused ``qkv``) next to each ``qkv`` tensor."""
    out = dict(sd)
    for k, v in sd.items():
        m = _QKV.match(k)
        if m:
            for part, chunk in zip(("q", "k", "v"), v.chunk(3, dim=0)):  # (3D, D) -> 3 x (D, D)
                out[f"{m.group(1)}{part}_proj.{m.group(2)}"] = chunk.clone()
    return out


def _provenance(record: ExploraRecord, spec: Any, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The sidecar's ``provenance``: the source weights, the ExPLoRA spec applied, explora's version and the time."""
    return {
        "source": record.source,
        "explora_spec": spec.to_dict() if spec is not None else None,
        "lora_merged": True,
        "explora_version": _version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metadata": metadata,
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("explora")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def weights_license(model: nn.Module, timm_name: str | None = None, family: str | None = None) -> str | None:
    """The licence of a backbone's weights, which its exports carry (a DINOv3 derivative: ``dinov3-license``): the
    one :func:`~explora.models.backbone.build_backbone` (or timm) recorded in ``pretrained_cfg["license"]``, else
    :func:`~explora.models.registry.base_license` of ``timm_name`` when given; None when neither knows."""
    recorded = (getattr(model, "pretrained_cfg", None) or {}).get("license")
    if recorded:
        return str(recorded)
    return base_license(timm_name, family, record_of(model).source) if timm_name else None


def write_timm_config(
    export_dir: str | os.PathLike[str],
    model: nn.Module,
    timm_name: str,
    model_args: Mapping[str, Any],
    *,
    num_classes: int = 0,
    global_pool: str | None = None,
    label_names: list[str] | None = None,
    mean: Iterable[float] | None = None,
    std: Iterable[float] | None = None,
    crop_pct: float = 224 / 256,
    interpolation: str = "bicubic",
    license: str | None = None,
) -> Path:
    """Write ``config.json`` in timm's Hugging Face layout next to an export's ``model.safetensors``; every export
    calls this one writer. Returns its path.

    Fields as timm's ``save_config_for_hf`` writes and ``load_model_config_from_path`` reads them (timm 1.0.31
    ``_hub.py``): ``architecture``, ``num_classes``, ``num_features``, ``global_pool``, ``model_args`` (the
    ``create_model`` kwargs; timm applies them when it builds from a ``local-dir:``/``hf-hub:`` name) and
    ``pretrained_cfg`` (``input_size`` the model is used at, ``mean``/``std`` the training normalisation, one per
    band, ``interpolation``, ``crop_pct``, ``license``, ``first_conv``/``classifier`` and ``fixed_input_size=False``
    for a ``dynamic_img_size`` model). ``label_names`` (a classifier's class names, index order) go to the top level
    as timm writes them. ``mean``/``std`` default to no normalisation (0 / 1 per band).
    """
    args = dict(model_args)
    if int(args.get("num_classes", num_classes)) != num_classes:
        raise ConfigError(f"config.json: model_args num_classes {args['num_classes']} != num_classes {num_classes}")
    args["num_classes"] = num_classes
    chans = int(args.get("in_chans", model.patch_embed.proj.in_channels))
    mean_t = tuple(float(v) for v in mean) if mean is not None else (0.0,) * chans
    std_t = tuple(float(v) for v in std) if std is not None else (1.0,) * chans
    if len(mean_t) != chans or len(std_t) != chans:
        raise ConfigError(f"config.json: mean/std have {len(mean_t)}/{len(std_t)} values; the model has {chans} bands")
    if label_names is not None and len(label_names) != num_classes:
        raise ConfigError(f"config.json: {len(label_names)} label_names for a {num_classes}-class head")
    pretrained_cfg: dict[str, Any] = {
        "input_size": [chans, *input_size(model)],
        "fixed_input_size": not bool(args.get("dynamic_img_size", False)),
        "interpolation": interpolation,
        "crop_pct": float(crop_pct),
        "crop_mode": "center",
        "mean": list(mean_t),
        "std": list(std_t),
        "num_classes": num_classes,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "custom_load": False,
    }
    if license:
        pretrained_cfg["license"] = license
    config: dict[str, Any] = {
        "architecture": timm_name,
        "num_classes": num_classes,
        "num_features": int(model.num_features),
        "global_pool": global_pool or args.get("global_pool") or str(getattr(model, "global_pool", "token")),
        "model_args": args,
        "pretrained_cfg": pretrained_cfg,
    }
    if label_names is not None:
        config["label_names"] = [str(n) for n in label_names]
    path = Path(export_dir) / TIMM_CONFIG
    text = json.dumps(config, indent=2)
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def _normalisation(data_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``write_timm_config`` keywords of an export's ``data_config`` (mean, std, crop_pct, interpolation)."""
    allowed = ("mean", "std", "crop_pct", "interpolation")
    unknown = sorted(set(data_config or {}) - set(allowed))
    if unknown:
        raise ConfigError(f"export data_config: unknown key(s) {unknown}; expected some of {list(allowed)}")
    return {k: v for k, v in (data_config or {}).items() if v is not None}


def export_backbone(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    timm_name: str,
    formats: Iterable[str] = FORMATS,
    metadata: Mapping[str, Any] | None = None,
    heads: Mapping[str, nn.Module] | None = None,
    data_config: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Merge LoRA (into a copy; ``model`` is untouched) and write the requested formats; returns name -> path.

    ``metadata`` (JSON-serialisable; ``model_args``/``family`` override the inferred ones) goes into the sidecar's
    provenance. ``heads`` (e.g. ``{'dino_head': ..., 'ibot_head': ...}``) are added to the ``teacher`` file.
    With ``safetensors``, ``config.json`` (:func:`write_timm_config`) is written next to it; ``data_config``
    (``mean``, ``std``, ``crop_pct``, ``interpolation``) is the input normalisation it records (the training one).
    """
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"export formats {list(formats)}: expected a non-empty subset of {list(FORMATS)}")
    out = Path(out_dir)
    meta = dict(metadata or {})
    family = _family(model, timm_name, meta)
    sd = _plain(merged_state_dict(model))
    model_args = dict(meta.pop("model_args", None) or infer_model_args(model, timm_name))
    input_channels = meta.pop("input_channels", None)  # how grayscale data met the channels (medical data)
    record = record_of(model)
    paths: dict[str, Path] = {}

    if "safetensors" in formats:
        blob = st_save(sd, metadata={"format": "pt", "timm_name": timm_name})
        paths["safetensors"] = out / FILE_NAMES["safetensors"]
        atomic_write(paths["safetensors"], lambda f: f.write(blob))
        paths["timm_config"] = write_timm_config(
            out, model, timm_name, model_args,
            license=weights_license(model, timm_name, family), **_normalisation(data_config),
        )
    upstream = to_upstream_layout(sd, family, record.mask_token)
    if "encoder" in formats:
        paths["encoder"] = out / FILE_NAMES["encoder"]
        atomic_write(paths["encoder"], lambda f: torch.save({"model": upstream}, f))
    if "teacher" in formats:
        teacher = {f"backbone.{k}": v for k, v in split_qkv(upstream).items()}
        for name, head in (heads or {}).items():
            teacher.update({f"{name}.{k}": v for k, v in _plain(head.state_dict()).items()})
        paths["teacher"] = out / FILE_NAMES["teacher"]
        atomic_write(paths["teacher"], lambda f: torch.save({"teacher": teacher}, f))

    spec = record.spec
    size = input_size(model)
    stored = list(model.patch_embed.grid_size) if model.pos_embed is not None else None
    sidecar = {
        "architecture": timm_name,
        "family": family,
        "model_args": model_args,
        "img_size": list(size),
        "patch_size": list(model.patch_embed.patch_size),
        "pos_embed_grid": stored,
        "pos_embed_trained_grid": _trained_grid(model, size) if stored is not None else None,
        "in_chans": int(model.patch_embed.proj.in_channels),
        **({"input_channels": input_channels} if input_channels else {}),
        "num_features": int(model.num_features),
        "license": weights_license(model, timm_name, family),
        "files": {k: {"path": p.name, "sha256": sha256_file(p)} for k, p in paths.items()},
        "provenance": _provenance(record, spec, meta),
        "load_with": (
            "timm.create_model('local-dir:<this directory>', pretrained=True), or "
            f"timm.create_model({timm_name!r}, pretrained=True, pretrained_cfg_overlay=dict("
            f"file='{FILE_NAMES['safetensors']}', input_size=(in_chans, *img_size)), **model_args)"
        ),
    }
    text = json.dumps(sidecar, indent=2, default=str)
    paths["sidecar"] = out / SIDECAR
    atomic_write(paths["sidecar"], lambda f: f.write(text.encode()))
    return paths


def _trained_grid(model: nn.Module, size: tuple[int, int]) -> list[int] | None:
    """The patch grid a trained position embedding saw (the model's input size), None when the ExPLoRA
    parameterisation kept it frozen (or the model carries none, so nothing says it trained)."""
    spec = record_of(model).spec
    if spec is None or not spec.train_pos_embed:
        return None
    ph, pw = model.patch_embed.patch_size
    return [size[0] // ph, size[1] // pw]


def load_exported(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild the timm model from an exported ``model.safetensors`` (or its directory) and its sidecar.

    The sidecar's ``img_size`` (the input size; in exports written before ``pos_embed_grid`` existed also the
    stored grid's size) becomes ``pretrained_cfg["input_size"]``.
    """
    p = Path(path)
    weights = p / FILE_NAMES["safetensors"] if p.is_dir() else p
    side = weights.with_name(SIDECAR)
    if not weights.is_file() or not side.is_file():
        raise CheckpointError(f"{p}: expected {FILE_NAMES['safetensors']} and {SIDECAR} written by export_backbone")
    info = json.loads(side.read_text())
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in info["model_args"].items()}
    overlay: dict[str, Any] = {"file": str(weights)}
    if info.get("img_size"):
        overlay["input_size"] = (int(info.get("in_chans", args.get("in_chans", 3))), *map(int, info["img_size"]))
    if info.get("license"):  # the base weights' licence travels on to later exports of this model
        overlay["license"] = info["license"]
    return timm.create_model(info["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **args)


# --- Multispectral / temporal encoders (SatMAE-style wrappers around a timm ViT) --------------------------------
# They are not plain timm models, so timm cannot rebuild them from a state dict alone. We write the wrapper's merged
# state dict as ``model.safetensors`` and a sidecar whose ``wrapper`` entry holds the wrapper's constructor arguments
# next to the base timm architecture; :func:`load_encoder` is the one loader for both kinds of export.


def is_wrapped(model: nn.Module) -> bool:
    """True for an encoder timm cannot rebuild alone (its :meth:`~explora.models.encoder.Encoder.export_config` is a
    ``wrapper`` entry): the group-channel / temporal encoders. Unregistered modules raise ConfigError."""
    return as_encoder(model).export_config() is not None


def export_wrapped_encoder(
    encoder: nn.Module,
    out_dir: str | os.PathLike[str],
    timm_name: str,
    model_args: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write a group-channel / temporal encoder: merged ``model.safetensors`` + ``model.json`` with a ``wrapper``
    entry (kind, groups, drop_bands, pos mode, num_frames, time_dim, time_offset, ...) and the base timm
    ``architecture`` + ``model_args`` the wrapper is built around. Rebuild it with :func:`load_encoder`.

    Only the safetensors format applies: the upstream ``encoder``/``teacher`` layouts describe plain ViTs.
    """

    if not is_wrapped(encoder):
        raise ConfigError(f"{type(encoder).__name__} is not a group-channel/temporal wrapper; use export_backbone")
    out = Path(out_dir)
    meta = dict(metadata or {})
    config = as_encoder(encoder).export_config()
    sd = _plain(merged_state_dict(encoder))
    blob = st_save(sd, metadata={"format": "pt", "timm_name": timm_name, "wrapper": config["kind"]})
    paths = {"safetensors": out / FILE_NAMES["safetensors"]}
    atomic_write(paths["safetensors"], lambda f: f.write(blob))
    spec = record_of(encoder).spec
    sidecar = {
        "architecture": timm_name,
        "family": str(meta.pop("family", "mae")),
        "model_args": dict(model_args),
        "wrapper": config,
        "img_size": list(input_size(encoder)),
        "pos_embed_grid": list(encoder.pos_embed_grid),
        "pos_embed_trained_grid": list(encoder.pos_embed_grid) if encoder.own_pos_embed.requires_grad else None,
        "num_features": int(encoder.embed_dim),
        "license": weights_license(encoder, timm_name, "mae") or SATMAE_LICENSE,
        "files": {k: {"path": p.name, "sha256": sha256_file(p)} for k, p in paths.items()},
        "provenance": {
            "explora_spec": spec.to_dict() if spec is not None else None,
            "lora_merged": True,
            "explora_version": _version(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "metadata": meta,
        },
        "load_with": "explora.models.export.load_encoder(<this directory>)",
    }
    paths["sidecar"] = out / SIDECAR
    text = json.dumps(sidecar, indent=2, default=str)
    atomic_write(paths["sidecar"], lambda f: f.write(text.encode()))
    return paths


def export_classifier(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    timm_name: str | None = None,
    label_names: list[str] | None = None,
    data_config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write a fine-tuned :class:`~explora.models.classifier.ClassifierModel` on a plain timm ViT as one timm
    classifier: ``model.safetensors`` (LoRA merged, the backbone's timm keys plus ``head.*`` and, for
    ``avg_fc_norm``, ``fc_norm.*``), ``config.json`` (:func:`write_timm_config` with the head's ``num_classes``,
    the pool's :data:`TIMM_POOLS` ``model_args`` and ``label_names``) and the ``model.json`` sidecar. timm's
    ``create_model("local-dir:<dir>", pretrained=True)`` then gives the same logits as ``model``.

    ``timm_name`` defaults to the backbone's ``pretrained_cfg["architecture"]``. Refused (ConfigError) for a
    group-channel / temporal backbone (timm cannot build it) and for the ``cls+avg`` pool (timm has no such head).
    """
    from explora.models.classifier import ClassifierModel

    if not isinstance(model, ClassifierModel) or not model.is_encoder:
        raise ConfigError(f"export_classifier: expected a ClassifierModel on an encoder, got {type(model).__name__}")
    backbone = model.backbone
    if is_wrapped(backbone):
        raise ConfigError(f"export_classifier: a {as_encoder(backbone).kind} backbone is not a timm model; "
                          "its fine-tuned weights stay in best/model.safetensors")
    if model.pool not in TIMM_POOLS:
        raise ConfigError(f"export_classifier: pool {model.pool!r} has no timm equivalent; expected one of "
                          f"{list(TIMM_POOLS)}")
    timm_name = timm_name or (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture")
    if not timm_name:
        raise ConfigError("export_classifier: the backbone has no pretrained_cfg['architecture']; pass timm_name")
    out = Path(out_dir)
    num_classes = int(model.head.out_features)
    merged = merged_state_dict(model)
    state = {k[len("backbone."):]: v for k, v in merged.items() if k.startswith("backbone.")}
    if model.pool == "avg_fc_norm":  # timm's final norm is an Identity there; fc_norm takes its place
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    state.update({k: v for k, v in merged.items() if k.startswith(("head.", "fc_norm."))})
    sd = _plain(state)
    args = dict(infer_model_args(backbone, timm_name)) | {"num_classes": num_classes} | TIMM_POOLS[model.pool]
    with torch.device("meta"):
        ref = timm.create_model(timm_name, pretrained=False, **args)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if want != {k: tuple(v.shape) for k, v in sd.items()}:
        diff = sorted(set(want.items()) ^ {(k, tuple(v.shape)) for k, v in sd.items()})[:5]
        raise ConfigError(f"export_classifier: the classifier does not fit timm {timm_name!r} with {args} ({diff})")
    if label_names is not None and len(label_names) != num_classes:
        raise ConfigError(f"export_classifier: {len(label_names)} label names for {num_classes} classes")
    paths = {"safetensors": out / FILE_NAMES["safetensors"]}
    blob = st_save(sd, metadata={"format": "pt", "timm_name": timm_name})
    atomic_write(paths["safetensors"], lambda f: f.write(blob))
    record = record_of(backbone)
    family = _family(backbone, timm_name, None)
    license_ = weights_license(backbone, timm_name, family)
    paths["timm_config"] = write_timm_config(
        out, backbone, timm_name, args, num_classes=num_classes, global_pool=args["global_pool"],
        label_names=label_names, license=license_, **_normalisation(data_config),
    )
    spec = record.spec
    sidecar = {
        "architecture": timm_name,
        "family": family,
        "model_args": args,
        "img_size": list(input_size(backbone)),
        "in_chans": int(backbone.patch_embed.proj.in_channels),
        "num_features": int(backbone.num_features),
        "head": {"pool": model.pool, "num_classes": num_classes},
        "label_names": list(label_names) if label_names is not None else None,
        "license": license_,
        "files": {k: {"path": p.name, "sha256": sha256_file(p)} for k, p in paths.items()},
        "provenance": _provenance(record, spec, dict(metadata or {})),
        "load_with": "timm.create_model('local-dir:<this directory>', pretrained=True)",
    }
    paths["sidecar"] = out / SIDECAR
    text = json.dumps(sidecar, indent=2, default=str)
    atomic_write(paths["sidecar"], lambda f: f.write(text.encode()))
    return paths


def _export_files(path: str | os.PathLike[str]) -> tuple[Path, Path] | None:
    """(weights, sidecar) of an explora export given its directory or ``model.safetensors``; None otherwise."""
    p = Path(path)
    weights = p / FILE_NAMES["safetensors"] if p.is_dir() else p
    side = weights.with_name(SIDECAR)
    if weights.name != FILE_NAMES["safetensors"] or not weights.is_file() or not side.is_file():
        return None
    return weights, side


def is_wrapped_export(path: str | os.PathLike[str] | None) -> bool:
    """True when ``path`` is an export written by :func:`export_wrapped_encoder` (its sidecar has ``wrapper``)."""
    files = _export_files(path) if path is not None else None
    if files is None:
        return False
    try:
        return "wrapper" in json.loads(files[1].read_text())
    except (OSError, ValueError):
        return False


def load_encoder(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild any explora export (directory or ``model.safetensors``) with its weights, in eval mode.

    A plain export gives the timm ViT (:func:`load_exported`); a group-channel / temporal export gives the
    ``GroupChannelViT`` / ``TemporalViT`` around a freshly built base ViT, with every tensor loaded strictly.
    """

    files = _export_files(path)
    if files is None:
        raise CheckpointError(f"{path}: expected an export directory with {FILE_NAMES['safetensors']} and {SIDECAR}")
    weights, side = files
    try:
        info = json.loads(side.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{side}: unreadable sidecar ({err})") from err
    if "wrapper" not in info:
        return load_exported(weights).eval()
    config = info["wrapper"]
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in info["model_args"].items()}
    base = timm.create_model(info["architecture"], pretrained=False, **args)
    encoder = rebuild_encoder(base, config, source=str(side))
    state = load_file(str(weights))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: does not fit the {config['kind']} encoder its sidecar describes "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    attach_record(encoder, ExploraRecord(source=f"explora export {weights}"))
    return encoder.eval()


def load_adapted(name: str, weights: str, spec_options: dict[str, Any] | None) -> nn.Module:
    """Backbone ``name`` with ``weights`` loaded; with LoRA keys (an explora training checkpoint) the ExPLoRA spec
    (the file's ``explora_spec``, else ``spec_options``) is applied first so the LoRA tensors have somewhere to go."""
    raw = load_checkpoint_file(weights)
    state = adapted_backbone_state(raw, weights)
    if not any("lora_" in k for k in state):
        return build_backbone(name, weights=weights)
    if isinstance(raw.get("explora_spec"), dict):
        spec_options = ExploraSpec.from_dict(raw["explora_spec"]).options()
    if spec_options is None:
        raise ConfigError(f"{weights} has LoRA tensors but no 'explora_spec'; pass --preset or --spec")
    model = build_backbone(name)
    apply_explora(model, **spec_options)
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{weights}: does not fit {name} with this ExPLoRA spec (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    model.load_state_dict(state, strict=True)
    return model
