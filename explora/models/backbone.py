"""Build timm ViT backbones by short name, with weights from any upstream checkpoint format.

Every backbone is a plain timm ``VisionTransformer`` (``num_classes=0``, ``dynamic_img_size=True`` so global and
local crops of different sizes go through one model). Weights come from a file, a URL, the registry's upstream URL
(through torch.hub's cache, so a file placed in ``$TORCH_HOME/hub/checkpoints`` works offline) or timm / the HF hub;
:mod:`explora.models.checkpoints` converts them to timm keys. Tensors timm does not keep live in
``model.explora_extras``: ``"mask_token"`` (DinoV2, (1, D)), ``"mae_decoder"`` (MAE decoder state dict),
``"source"`` (where the weights came from); the first two are None when the checkpoint has none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
from torch import nn

from explora.errors import CheckpointError
from explora.models.checkpoints import (
    BackboneTarget,
    CheckpointParts,
    convert_checkpoint,
    is_url,
    load_checkpoint_file,
)
from explora.models.registry import BACKBONES, BackboneSpec, get_backbone_spec

ONLINE_PREFIXES = ("hf-hub:", "timm:")


def build_backbone(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int = 3,
    *,
    pos_embed_interpolation: str = "bicubic",
    pos_embed_antialias: bool = True,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm ViT for ``name`` (a registry short name or any timm ViT name) with ``weights`` loaded.

    ``weights``: None (random init), ``"default"`` (the registry URL for ``name``), an http(s) URL, a local
    ``.pth``/``.pt``/``.safetensors`` path, or ``"hf-hub:<repo>"`` / ``"timm:<name.tag>"`` (timm ``pretrained=True``,
    online). ``img_size`` defaults to the registry's ``default_img_size`` (224 for DinoV2/MAE, 32 for ``test_*``) and
    to timm's default for other names; checkpoint position embeddings are resampled to it. ``in_chans != 3`` adapts
    RGB patch-embedding weights. ``timm_kwargs`` override the architecture (e.g. ``drop_path_rate``).
    Raises :class:`~explora.errors.CheckpointError` when the weights do not fit.
    """
    spec = get_backbone_spec(name)
    model = _create(spec, img_size, in_chans, timm_kwargs)
    model.explora_extras = {"mask_token": None, "mae_decoder": None, "source": "random init"}
    if weights is None:
        return model

    target = BackboneTarget.from_model(model, name=name)
    weights_str = os.fspath(weights)
    grid_size = None
    if weights_str.startswith(ONLINE_PREFIXES):
        raw, where = _timm_pretrained_state(weights_str), weights_str
    else:
        if weights_str == "default":
            if not spec.url:
                known = ", ".join(n for n, s in BACKBONES.items() if s.url)
                raise CheckpointError(
                    f"weights='default': backbone {name!r} has no upstream URL (those with one: {known})"
                )
            weights_str = spec.url
        raw, where = load_checkpoint_file(weights_str), weights_str
        if not is_url(weights_str):
            grid_size = _sidecar_grid(Path(weights_str))
    parts = convert_checkpoint(
        raw,
        target,
        source=where,
        grid_size=grid_size,
        interpolation=pos_embed_interpolation,
        antialias=pos_embed_antialias,
    )
    model.load_state_dict(parts.encoder, strict=True)
    model.explora_extras = {
        "mask_token": parts.mask_token,
        "mae_decoder": parts.decoder,
        "source": _describe(where, parts),
    }
    return model


def _create(spec: BackboneSpec, img_size: Any, in_chans: int, timm_kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate the timm architecture with random weights (registry overrides, then the caller's)."""
    kwargs = dict(spec.timm_kwargs)
    kwargs.update(timm_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    elif spec.name in BACKBONES:
        kwargs.setdefault("img_size", spec.default_img_size)
    kwargs.setdefault("dynamic_img_size", True)
    try:
        return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise CheckpointError(
            f"backbone {spec.name!r}: {err}; use a name from explora.models.registry or timm"
        ) from err


def _timm_pretrained_state(weights: str) -> dict[str, Any]:
    """State dict of ``timm.create_model(<name>, pretrained=True)`` for ``timm:<name.tag>`` / ``hf-hub:<repo>``.

    The pretrained model is built at timm's own size; our conversion then resamples and checks it like any file.
    timm's DinoV2 filter drops the mask token, so ``explora_extras["mask_token"]`` is None on this path.
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
    """Patch grid from a JSON sidecar with ``grid_size`` or ``img_size`` + ``patch_size``: ``<file>.json``,
    ``<stem>.json``, or an export's ``model.json`` whose ``files`` list this file (``explora.export`` writes one
    sidecar for all its formats). Only needed for non-square position embeddings."""
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
        if "grid_size" in meta:
            return _pair(meta["grid_size"])
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
