"""Export an adapted backbone with LoRA merged, in the layouts people load: timm, and the released ExPLoRA files.

The paper's output is ``W_T* = W_S + Delta_T`` with LoRA folded in, so the architecture is unchanged (ExPLoRA README:
"All checkpoints have LoRA adapters already merged into the weights"). We write:

- ``safetensors``: ``model.safetensors``, a plain timm state dict, plus ``model.json`` (timm name, ``model_args``,
  input size, stored position-embedding grid, channels, the weights' ``license``, provenance, sha256 of each
  file). It loads with
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
from explora.models.registry import weights_license
from explora.vit.lora import merged_state_dict

FORMATS = ("safetensors", "encoder", "teacher")
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


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("explora")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def export_backbone(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    timm_name: str,
    formats: Iterable[str] = FORMATS,
    metadata: Mapping[str, Any] | None = None,
    heads: Mapping[str, nn.Module] | None = None,
) -> dict[str, Path]:
    """Merge LoRA (into a copy; ``model`` is untouched) and write the requested formats; returns name -> path.

    ``metadata`` (JSON-serialisable; ``model_args``/``family`` override the inferred ones) goes into the sidecar's
    provenance. ``heads`` (e.g. ``{'dino_head': ..., 'ibot_head': ...}``) are added to the ``teacher`` file.
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
        from safetensors.torch import save as st_save

        blob = st_save(sd, metadata={"format": "pt", "timm_name": timm_name})
        paths["safetensors"] = out / FILE_NAMES["safetensors"]
        atomic_write(paths["safetensors"], lambda f: f.write(blob))
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
        "license": weights_license(model),  # a DINOv3 derivative carries the DINOv3 License (dinov3-license)
        "files": {k: {"path": p.name, "sha256": sha256_file(p)} for k, p in paths.items()},
        "provenance": {
            "source": record.source,
            "explora_spec": spec.to_dict() if spec is not None else None,
            "lora_merged": True,
            "explora_version": _version(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "metadata": meta,
        },
        "load_with": (
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
