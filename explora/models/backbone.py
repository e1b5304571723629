"""Build timm ViT backbones by short name, with weights from any upstream checkpoint format.

Every backbone is a plain timm ``VisionTransformer`` (``num_classes=0``, ``dynamic_img_size=True`` so global and
local crops of different sizes go through one model). Weights come from a file, a URL, the registry's upstream URL
(through torch.hub's cache, so a file placed in ``$TORCH_HOME/hub/checkpoints`` works offline) or timm / the HF hub;
:mod:`explora.models.checkpoints` converts them to timm keys. Tensors timm does not keep live in
the model's :class:`~explora.models.record.ExploraRecord` (:func:`~explora.models.record.record_of`): ``mask_token``
(DinoV2, (1, D)), ``mae_decoder`` (MAE decoder state dict), ``mae_decoder_targets`` (what that decoder
reconstructs: ``"pixel"``, ``"norm_pix"`` or None when unknown), ``source`` (where the weights came from); the first
three are None when the checkpoint has none.

The position embedding is kept on the checkpoint's patch grid and interpolated per forward; the input size the
model is used at by default is recorded apart from it (:func:`input_size`).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from explora.core.errors import CheckpointError
from explora.models.checkpoints import (
    BackboneTarget,
    CheckpointParts,
    convert_checkpoint,
    is_url,
    load_checkpoint_file,
)
from explora.models.record import ExploraRecord, attach_record
from explora.models.registry import BACKBONES, BackboneSpec, base_license, get_backbone_spec

ONLINE_PREFIXES = ("hf-hub:", "timm:")
_WEIGHTS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # a weights name, as opposed to a path, URL or hub spec


def build_backbone(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int = 3,
    *,
    pos_embed_grid: int | tuple[int, int] | None = None,
    pos_embed_interpolation: str = "bicubic",
    pos_embed_antialias: bool = True,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm ViT for ``name`` (a registry short name or any timm ViT name) with ``weights`` loaded.

    ``weights``: None (random init), a weights name of the registry backbone (``"default"``; MAE also ``"visualize"``
    and ``"encoder"``, see :mod:`explora.models.registry`), an http(s) URL, a local ``.pth``/``.pt``/``.safetensors``
    path, or ``"hf-hub:<repo>"`` / ``"timm:<name.tag>"`` (timm ``pretrained=True``, online).

    The position embedding stays on the checkpoint's own patch grid (DinoV2 hub files 37x37, MAE 14x14, an export
    the grid its sidecar states; random init: the registry's ``native_img_size``, for other timm names ``img_size``)
    and timm interpolates it to each input's grid in the forward (``dynamic_img_size=True``), as DinoV2's
    ``interpolate_pos_encoding`` does, so building at a small size loses no positional resolution.
    ``pos_embed_grid`` asks for another stored grid instead: the checkpoint's is then resampled once at load time
    with ``pos_embed_interpolation`` / ``pos_embed_antialias`` (timm's bicubic with antialias by default).

    ``img_size`` is the input size the model is used at by default (the registry's ``default_img_size``: 224 for
    DinoV2/MAE, 32 for ``test_*``; timm's default for other names), recorded as ``pretrained_cfg["input_size"]``
    and read back with :func:`input_size`. ``in_chans != 3`` adapts RGB patch-embedding weights. ``timm_kwargs``
    override the architecture (e.g. ``drop_path_rate``). Raises :class:`~explora.core.errors.CheckpointError` when the
    weights do not fit.
    """
    spec = get_backbone_spec(name)
    kwargs = {**spec.timm_kwargs, **timm_kwargs}
    use_size = _pair(img_size) if img_size is not None else (
        _pair(spec.default_img_size) if spec.name in BACKBONES else None)
    native = spec.native_img_size or use_size
    with torch.device("meta"):  # architecture only: patch size, and which keys and shapes a file must provide
        probe = _create(spec, native, in_chans, kwargs)
    patch = tuple(probe.patch_embed.patch_size)
    if pos_embed_grid is None and not probe.dynamic_img_size and use_size is not None:
        pos_embed_grid = (use_size[0] // patch[0], use_size[1] // patch[1])  # fixed-size: stored grid = input grid
    target = BackboneTarget.from_model(probe, name=name)
    if pos_embed_grid is not None:
        target = target.with_grid(_pair(pos_embed_grid))
    if weights is None:
        model = _create(spec, _stored_img_size(target.grid_size, probe, native), in_chans, kwargs)
        attach_record(model, ExploraRecord(source="random init"))
        return _record_license(record_input_size(model, use_size), spec, None)

    raw, where, sidecar_grid = _read_weights(spec, weights)
    parts = convert_checkpoint(
        raw,
        target,
        source=where,
        grid_size=sidecar_grid,
        interpolation=pos_embed_interpolation,
        antialias=pos_embed_antialias,
        keep_grid=pos_embed_grid is None,
    )
    grid = parts.pos_embed_grid or target.grid_size
    model = _create(spec, _stored_img_size(grid, probe, native), in_chans, kwargs)
    model.load_state_dict(parts.encoder, strict=True)
    targets = decoder_targets(where) if parts.decoder is not None else None
    attach_record(model, ExploraRecord(_describe(where, parts), parts.mask_token, parts.decoder, targets))
    return _record_license(record_input_size(model, use_size), spec, where)


def _record_license(model: nn.Module, spec: BackboneSpec, source: Any) -> nn.Module:
    """Record the weights' licence as ``pretrained_cfg["license"]`` (:func:`~explora.models.registry.base_license`
    of the registry's family, so an MAE backbone on an untagged timm name is not given timm's default tag's), where
    exports and model cards read it."""
    found = base_license(spec.timm_name, spec.family, None if source is None else str(source))
    if found:
        model.pretrained_cfg = model.default_cfg = {**(model.pretrained_cfg or {}), "license": found}
    return model


def backbone_patch_size(name: str, **timm_kwargs: Any) -> int:
    """The patch size of backbone ``name`` (registry short name or timm name), read from its architecture built on
    the meta device (no weights, no memory)."""
    spec = get_backbone_spec(name)
    with torch.device("meta"):
        probe = _create(spec, None, 3, {**spec.timm_kwargs, **timm_kwargs})
    return int(probe.patch_embed.patch_size[0])


def _stored_img_size(grid: tuple[int, int], probe: nn.Module, native: Any) -> Any:
    """The timm ``img_size`` that lays the position embedding out on ``grid`` (``native`` when it already does)."""
    if tuple(grid) == tuple(probe.patch_embed.grid_size):
        return native
    ph, pw = probe.patch_embed.patch_size
    return grid[0] * ph, grid[1] * pw


def input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the model is used at by default: the ``img_size`` given to :func:`build_backbone`.

    Why a helper: the stored position-embedding grid (``patch_embed.img_size``/``grid_size``) is the checkpoint's,
    not the run's. Read from timm's own place, ``pretrained_cfg["input_size"]`` (so timm's ``resolve_data_config``
    agrees); group-channel / temporal wrappers give the size their encodings are laid out for (``img_size``); a
    fixed-size model (``dynamic_img_size=False``) its stored size.
    """
    wrapped = getattr(model, "img_size", None)
    if wrapped is not None:
        return _pair(wrapped)
    pe = model.patch_embed
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if getattr(model, "dynamic_img_size", False) and cfg.get("input_size"):
        return _pair(cfg["input_size"][-2:])
    return _pair(pe.img_size)


def record_input_size(model: nn.Module, size: int | tuple[int, int] | None) -> nn.Module:
    """Set ``pretrained_cfg["input_size"]`` to ``(in_chans, H, W)`` (timm's default size when ``size`` is None)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if size is not None or not cfg.get("input_size"):
        h, w = _pair(size) if size is not None else _pair(model.patch_embed.img_size)
        cfg["input_size"] = (int(model.patch_embed.proj.in_channels), h, w)
    model.pretrained_cfg = model.default_cfg = cfg  # timm keeps default_cfg as an alias of pretrained_cfg
    return model


def decoder_targets(source: str | os.PathLike[str]) -> str | None:
    """What an MAE decoder from ``source`` was trained to reconstruct, from the upstream file name: ``"pixel"``
    (``mae_visualize_vit_*``: raw pixels), ``"norm_pix"`` (``mae_pretrain_vit_*_full``: per-patch normalised pixels,
    MAE ``--norm_pix_loss``), None when the name does not say."""
    base = os.path.basename(urlparse(os.fspath(source)).path or os.fspath(source))
    if "visualize" in base:
        return "pixel"
    if "_full" in base:
        return "norm_pix"
    return None


def _read_weights(spec: BackboneSpec, weights: str | os.PathLike[str]) -> tuple[dict[str, Any], str, Any]:
    """(raw state, where it came from, the grid a sidecar states or None) for any ``weights`` source."""
    weights_str = resolve_weights_name(spec, os.fspath(weights))
    if weights_str.startswith(ONLINE_PREFIXES):
        return _timm_pretrained_state(weights_str), weights_str, None
    raw = load_checkpoint_file(weights_str)
    return raw, weights_str, None if is_url(weights_str) else _sidecar_grid(Path(weights_str))


def resolve_weights_name(spec: BackboneSpec, weights: str) -> str:
    """The URL of a weights name of ``spec`` (``"default"``, ``"visualize"``, ...); paths and URLs pass through.

    A bare word that is neither a weights name of the backbone nor an existing file is an error listing the names
    that exist (with a did-you-mean).
    """
    if weights in spec.weights:
        return spec.weights[weights]
    if (weights.startswith(ONLINE_PREFIXES) or is_url(weights) or not _WEIGHTS_NAME.fullmatch(weights)
            or Path(weights).exists()):
        return weights
    if not spec.weights:
        known = ", ".join(n for n, s in BACKBONES.items() if s.weights)
        raise CheckpointError(
            f"weights={weights!r}: backbone {spec.name!r} has no named weights (backbones with named weights: "
            f"{known}); give a checkpoint path or URL"
        )
    close = difflib.get_close_matches(weights, list(spec.weights), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise CheckpointError(
        f"weights={weights!r}: not a weights name of {spec.name!r}{hint}; its named weights are "
        f"{', '.join(sorted(spec.weights))}, or give a checkpoint path or URL"
    )


def _create(spec: BackboneSpec, stored_size: Any, in_chans: int, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate the timm architecture with random weights, its position embedding on ``stored_size``'s grid."""
    kwargs = dict(kwargs)
    if stored_size is not None:
        kwargs["img_size"] = stored_size
    kwargs.setdefault("dynamic_img_size", True)
    try:
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise CheckpointError(
            f"backbone {spec.name!r}: {err}; use a name from explora.models.registry or timm"
        ) from err
    overlay = {k: v for k, v in (("license", spec.license), ("mean", spec.mean), ("std", spec.std)) if v is not None}
    if overlay:  # the weights' licence and normalisation where timm's default tag would say otherwise
        model.pretrained_cfg = model.default_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **overlay}
    return model


def _timm_pretrained_state(weights: str) -> dict[str, Any]:
    """State dict of ``timm.create_model(<name>, pretrained=True)`` for ``timm:<name.tag>`` / ``hf-hub:<repo>``.

    The pretrained model is built at timm's own size, whose grid is kept; our conversion checks it like any file.
    timm's DinoV2 filter drops the mask token, so ``record_of(model).mask_token`` is None on this path.
    """
    model_name = weights.removeprefix("timm:")
    try:
        pretrained = timm.create_model(model_name, pretrained=True, num_classes=0)
    except Exception as err:  # noqa: BLE001 - network, hub and unknown-name errors all mean "cannot get weights"
        raise CheckpointError(
            f"{weights}: could not load timm pretrained weights ({type(err).__name__}: {err})"
        ) from err
    return pretrained.state_dict()


def _sidecar_grid(path: Path) -> tuple[int, int] | None:
    """Patch grid of the stored position embedding from a JSON sidecar: ``<file>.json``, ``<stem>.json``, or an
    export's ``model.json`` whose ``files`` list this file (``explora.models.export`` writes one sidecar for all its
    formats). Keys: ``pos_embed_grid`` (exports), ``grid_size``, or ``img_size`` + ``patch_size`` (exports written
    before ``pos_embed_grid`` existed stored the grid of their ``img_size``). Only needed for non-square grids."""
    own = (path.with_name(path.name + ".json"), path.with_suffix(".json"))
    for side in (*own, path.with_name("model.json")):
        if not side.is_file():
            continue
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{side}: unreadable JSON sidecar ({err})") from err
        if not isinstance(meta, dict):
            return None
        if side not in own and not _lists_file(meta, path.name):
            continue  # an export's shared sidecar that describes other files
        for key in ("pos_embed_grid", "grid_size"):
            if meta.get(key) is not None:
                return _pair(meta[key])
        if "img_size" in meta and "patch_size" in meta:
            (h, w), (ph, pw) = _pair(meta["img_size"]), _pair(meta["patch_size"])
            return h // ph, w // pw
        return None
    return None


def _lists_file(meta: dict[str, Any], name: str) -> bool:
    files = meta.get("files")
    return isinstance(files, dict) and any(isinstance(f, dict) and f.get("path") == name for f in files.values())


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _describe(where: str, parts: CheckpointParts) -> str:
    """One line for logs and reports: layout, location, what conversion did."""
    extras = [n for n, t in (("mask_token", parts.mask_token), ("mae_decoder", parts.decoder)) if t is not None]
    text = f"{parts.layout} checkpoint {where}"
    if extras:
        text += " (+" + ", ".join(extras) + ")"
    if parts.notes:
        text += ": " + "; ".join(parts.notes)
    return text
