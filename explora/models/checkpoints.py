"""Read any upstream ViT checkpoint layout safely and convert it to timm ``VisionTransformer`` keys.

Why this exists: ExPLoRA starts from weights released in several layouts (official DinoV2 hub files, DinoV2
training checkpoints, MAE ``{'model': ...}`` files with or without the decoder, the released ExPLoRA checkpoints with
split ``q_proj/k_proj/v_proj``, timm / our own safetensors exports). timm's ``checkpoint_filter_fn`` covers some of
them but discards tensors ExPLoRA needs (the DinoV2 ``mask_token`` for iBOT, the MAE decoder). This module reads a
file without unpickling arbitrary objects, recognises the layout, converts it to timm keys and splits off those
extra tensors, then checks the result against the target model so a wrong file fails here, with a message naming
the file, the expected architecture and the offending keys, instead of deep inside ``load_state_dict``.

Sources followed (no code copied): timm ``vision_transformer.checkpoint_filter_fn`` / ``_convert_dinov2``
(register tokens, SwiGLU renames, cls pos-embed folding), timm ``resample_abs_pos_embed`` and ``adapt_input_conv``;
DinoV2 ``dinov2/hub/backbones.py`` and ``dinov2/layers/block.py`` (hub and chunked-block layouts); MAE
``models_mae.py`` (decoder key names); DINOv3 ``dinov3/models/vision_transformer.py`` and ``dinov3/layers``
(``storage_tokens``, ``ls1.gamma``, ``qkv.bias`` with its ``bias_mask``, ``rope_embed.periods``) and timm
``eva.py`` ``checkpoint_filter_fn`` (their timm ``Eva`` names); the ExPLoRA README "ExPLoRA Checkpoints" note
(merged ``q_proj/k_proj/v_proj`` kept next to ``qkv`` in full checkpoints, ``qkv`` only in encoder-only ones) and
ExPLoRA ``util/misc.py`` ``load_pretrained_weights`` (``teacher``/``model`` keys, ``module.``/``backbone.`` prefixes).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from torch import Tensor, nn

from explora.core.errors import CheckpointError

# Keys under which upstream code nests the state dict, in the order we look for them. ``teacher`` comes first
# because DinoV2 / ExPLoRA evaluation reads the teacher (ExPLoRA ``linprobe`` default ``checkpoint_key: teacher``).
WRAPPER_KEYS = ("teacher", "student", "model", "state_dict")

# Pickled globals that are harmless plain-value containers and appear in real training checkpoints
# (MAE's ``misc.save_model`` stores ``args`` as an ``argparse.Namespace``). Everything else is refused.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]

_N_SHOWN = 5  # offending keys listed in an error message


@dataclass
class CheckpointParts:
    """A checkpoint converted to timm keys, split into what the encoder loads and what ExPLoRA keeps aside.

    ``encoder`` loads into the timm model with ``strict=True``; ``mask_token`` is DinoV2's (1, D) iBOT mask token
    (None when the file has none); ``decoder`` holds the MAE decoder tensors with their upstream names
    (``decoder_embed.*``, ``mask_token`` (1, 1, Dd), ``decoder_pos_embed``, ``decoder_blocks.*``, ``decoder_norm.*``,
    ``decoder_pred.*``), None when absent; ``layout`` names the recognised layout; ``notes`` says what conversion did;
    ``pos_embed_grid`` is the patch grid the converted position embedding is laid out on.
    """

    encoder: dict[str, Tensor]
    mask_token: Tensor | None
    decoder: dict[str, Tensor] | None
    layout: str
    notes: list[str] = field(default_factory=list)
    pos_embed_grid: tuple[int, int] | None = None  # patch grid of encoder["pos_embed"]; None without one


@dataclass(frozen=True)
class BackboneTarget:
    """What a checkpoint must fit: the timm model's key shapes and the geometry needed to resample into it."""

    name: str
    shapes: dict[str, tuple[int, ...]]
    embed_dim: int
    depth: int
    in_chans: int
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    pos_prefix_tokens: int  # prefix tokens that carry a position embedding (0 for no_embed_class models)

    @classmethod
    def from_model(cls, model: nn.Module, name: str | None = None) -> BackboneTarget:
        """Describe a timm ``VisionTransformer``; ``name`` defaults to its timm architecture name."""
        proj = model.patch_embed.proj  # type: ignore[union-attr]
        no_embed_class = bool(model.no_embed_class)
        return cls(
            name=name or model.default_cfg.get("architecture", "vit"),
            shapes={k: tuple(v.shape) for k, v in model.state_dict().items()},
            embed_dim=int(model.embed_dim),
            depth=len(model.blocks),  # type: ignore[arg-type]
            in_chans=int(proj.weight.shape[1]),
            patch_size=tuple(proj.weight.shape[2:]),  # type: ignore[arg-type]
            grid_size=tuple(model.patch_embed.grid_size),  # type: ignore[union-attr,arg-type]
            pos_prefix_tokens=0 if no_embed_class else int(model.num_prefix_tokens),
        )

    def with_grid(self, grid: tuple[int, int]) -> BackboneTarget:
        """The same architecture with its position embedding stored on another patch grid."""
        shapes = dict(self.shapes)
        if "pos_embed" in shapes:
            *lead, dim = shapes["pos_embed"]
            shapes["pos_embed"] = (lead[0], self.pos_prefix_tokens + grid[0] * grid[1], dim)
        return dataclasses.replace(self, shapes=shapes, grid_size=(int(grid[0]), int(grid[1])))

    def describe(self) -> str:
        """The architecture in words, for error messages."""
        return (
            f"{self.name} (embed_dim={self.embed_dim}, depth={self.depth}, in_chans={self.in_chans}, "
            f"patch_size={self.patch_size[0]}, grid={self.grid_size[0]}x{self.grid_size[1]})"
        )


# --------------------------------------------------------------------------------------------------- reading files


def is_url(path_or_url: str | os.PathLike[str]) -> bool:
    """True for http(s)/file URLs, which go through torch.hub's download cache."""
    return isinstance(path_or_url, str) and urlparse(path_or_url).scheme in ("http", "https", "file")


def hub_cache_path(url: str) -> Path:
    """Where torch.hub caches ``url``: ``$TORCH_HOME/hub/checkpoints/<basename>``; a file placed there works offline."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def load_checkpoint_file(path_or_url: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint into a dict without executing pickled code.

    ``.safetensors`` files go through safetensors; everything else through ``torch.load(weights_only=True,
    map_location='cpu')`` (only tensors, containers, primitives and :data:`SAFE_GLOBALS`). URLs are downloaded with
    ``torch.hub.load_state_dict_from_url`` into ``$TORCH_HOME/hub/checkpoints`` and read from there when present.
    """
    if is_url(path_or_url):
        url = str(path_or_url)
        cached = hub_cache_path(url)
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                raw = torch.hub.load_state_dict_from_url(
                    url, map_location="cpu", weights_only=True, check_hash=False, file_name=cached.name, progress=False
                )
        except pickle.UnpicklingError as err:
            raise CheckpointError(_unpickle_message(str(cached), err)) from err
        except (URLError, OSError, ValueError) as err:
            raise CheckpointError(
                f"{url}: could not download the checkpoint ({err}). Without internet, place the file at {cached} "
                f"(torch.hub's cache, set by $TORCH_HOME) and it is used instead."
            ) from err
        return _check_mapping(raw, url)

    path = Path(path_or_url)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found (expected a .pth/.pt/.safetensors file or a URL)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_unpickle_message(str(path), err)) from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from err
    return _check_mapping(raw, str(path))


def _unpickle_message(source: str, err: Exception) -> str:
    """Say which class the file wanted to rebuild, or that it is not a pickle checkpoint at all."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"unsupported GLOBAL (\S+)", text)
    if found is None:
        return f"{source}: not a readable PyTorch checkpoint (unpickling failed: {type(err).__name__})"
    return (
        f"{source}: the checkpoint contains a pickled {found.group(1)} object; explora loads with "
        f"torch.load(weights_only=True) (tensors and plain values only) and refuses to execute it. "
        f"Re-save only the state dict."
    )


def _check_mapping(raw: Any, source: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors (a state dict), got {type(raw).__name__}")
    return dict(raw)


# ------------------------------------------------------------------------------------------------------ conversion


def convert_checkpoint(
    raw: Mapping[str, Any],
    model_or_target: nn.Module | BackboneTarget,
    *,
    source: str = "<checkpoint>",
    grid_size: tuple[int, int] | None = None,
    interpolation: str = "bicubic",
    antialias: bool = True,
    keep_grid: bool = False,
) -> CheckpointParts:
    """Convert any supported layout to timm keys that load ``strict=True`` into ``model_or_target``.

    ``source`` names the file in error messages; ``grid_size`` is the checkpoint's patch grid when its position
    embedding is not square (otherwise inferred). ``keep_grid=True`` keeps the checkpoint's position embedding on its
    own grid (``parts.pos_embed_grid``; the model to load it into must be built at that grid, see
    :meth:`BackboneTarget.with_grid`); otherwise it is resampled to the target's grid with ``interpolation`` /
    ``antialias`` (timm's defaults, bicubic with antialias; upstream DinoV2 uses bicubic without antialias and a
    +0.1 offset). Raises :class:`CheckpointError` when the result does not fit the target.
    """
    target = (
        model_or_target if isinstance(model_or_target, BackboneTarget) else BackboneTarget.from_model(model_or_target)
    )
    notes: list[str] = []
    state, wrappers = _unwrap(raw, source)
    state = _strip_prefixes(state, notes)
    state = _unchunk_blocks(state, notes)
    layout = _detect_layout(state, wrappers)
    if wrappers:
        notes.append("unwrapped " + " > ".join(repr(w) for w in wrappers))

    decoder, mask_token = _split_extras(state)
    state = _convert_dinov3_keys(state, target, source, notes)
    state = _convert_dinov2_keys(state, notes)
    state = _merge_qkv(state, source, notes)
    state = _drop_heads(state, target, notes)
    _check_architecture(state, target, source)
    state = _adapt_patch_embed(state, target, source, notes)
    stored = _pos_embed_grid(state, target, source, grid_size)
    if keep_grid and stored is not None:
        target = target.with_grid(stored)
    state = _resample_pos_embed(state, target, stored, interpolation, antialias, notes)
    _check_keys(state, target, source, layout)
    grid = target.grid_size if "pos_embed" in state else None
    return CheckpointParts(encoder=state, mask_token=mask_token, decoder=decoder, layout=layout, notes=notes,
                           pos_embed_grid=grid)


def _unwrap(raw: Mapping[str, Any], source: str) -> tuple[dict[str, Tensor], list[str]]:
    """Descend into ``teacher``/``student``/``model``/``state_dict`` until the tensors; drop non-tensor entries."""
    wrappers: list[str] = []
    current: Mapping[str, Any] = raw
    while True:
        key = next((k for k in WRAPPER_KEYS if isinstance(current.get(k), Mapping)), None)
        if key is None:
            break
        wrappers.append(key)
        current = current[key]
    tensors = {k: v for k, v in current.items() if isinstance(v, Tensor)}
    if not tensors:
        keys = ", ".join(list(map(str, current))[:_N_SHOWN])
        raise CheckpointError(
            f"{source}: no tensors found (top-level keys: {keys}); expected a state dict, optionally under one of "
            f"{', '.join(WRAPPER_KEYS)}"
        )
    return tensors, wrappers


def _strip_prefixes(state: dict[str, Tensor], notes: list[str]) -> dict[str, Tensor]:
    """Remove DDP ``module.``, pick the teacher of a full SSL meta-arch, keep only ``backbone.`` (drops heads)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for branch in ("teacher.", "student."):  # DinoV2 SSLMetaArch state: teacher.backbone.*, student.dino_head.*
        if any(k.startswith(branch + "backbone.") for k in state):
            state = {k[len(branch) :]: v for k, v in state.items() if k.startswith(branch)}
            notes.append(f"took the {branch[:-1]} branch")
            break
    if any(k.startswith("backbone.") for k in state):
        dropped = sorted({k.split(".")[0] for k in state if not k.startswith("backbone.")})
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        if dropped:
            notes.append("dropped " + ", ".join(dropped))
    return state


_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def _unchunk_blocks(state: dict[str, Tensor], notes: list[str]) -> dict[str, Tensor]:
    """DinoV2 ``block_chunks>0`` stores ``blocks.<chunk>.<i>.*`` with global ``i``; timm wants ``blocks.<i>.*``."""
    if not any(_CHUNKED.match(k) for k in state):
        return state
    notes.append("un-chunked DinoV2 block_chunks keys")
    return {_CHUNKED.sub(r"blocks.\2.", k): v for k, v in state.items()}


def _detect_layout(state: Mapping[str, Tensor], wrappers: list[str]) -> str:
    """Name the layout: dinov2-hub, dinov2-train, explora-full, mae+decoder, encoder-only, timm."""
    if any(".attn.q_proj." in k for k in state):
        return "explora-full"
    if "storage_tokens" in state:
        return "dinov3-official"
    if wrappers and wrappers[0] in ("teacher", "student"):
        return "dinov2-train"
    if any(k.startswith("decoder_") for k in state):
        return "mae+decoder"
    dinov2_marks = ("register_tokens" in state) or any(".mlp.w12." in k for k in state)
    if dinov2_marks or (state.get("mask_token") is not None and state["mask_token"].ndim == 2):
        return "dinov2-hub" if not wrappers else "encoder-only"
    return "encoder-only" if "model" in wrappers else "timm"


def _split_extras(state: dict[str, Tensor]) -> tuple[dict[str, Tensor] | None, Tensor | None]:
    """Pop the MAE decoder (upstream names kept) and DinoV2's (1, D) mask token out of ``state`` (in place)."""
    decoder = {k: state.pop(k) for k in [k for k in state if k.startswith("decoder_")]}
    mask_token = state.pop("mask_token", None)
    if mask_token is not None and mask_token.ndim == 3:  # MAE decoder token (1, 1, Dd), not DinoV2's (1, D)
        decoder["mask_token"] = mask_token
        mask_token = None
    decoder_out = {k: _as_float32(v) for k, v in decoder.items()} if decoder else None
    return decoder_out, None if mask_token is None else _as_float32(mask_token.reshape(1, -1))


def _as_float32(t: Tensor) -> Tensor:
    return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t


_W12 = re.compile(r"^(blocks\.\d+\.mlp\.)w12\.")
_W3 = re.compile(r"^(blocks\.\d+\.mlp\.)w3\.")


def _convert_dinov2_keys(state: dict[str, Tensor], notes: list[str]) -> dict[str, Tensor]:
    """DinoV2 -> timm as timm's ``_convert_dinov2``: registers, cls pos-embed folding, SwiGLU w12/w3 -> fc1/fc2.

    timm's reg4 models are ``no_embed_class``: the DinoV2 cls position embedding ``pos_embed[:, 0]`` is added into
    ``cls_token`` and removed from ``pos_embed``; ``register_tokens`` (which never had one) become ``reg_token``.
    """
    out = dict(state)
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        pos = out.pop("pos_embed")  # (1, 1 + N, D)
        out["cls_token"] = out["cls_token"] + pos[:, :1]  # (1, 1, D)
        out["pos_embed"] = pos[:, 1:]  # (1, N, D)
        notes.append("register_tokens -> reg_token, cls pos-embed folded into cls_token")
    renamed = {_W3.sub(r"\1fc2.", _W12.sub(r"\1fc1.", k)): v for k, v in out.items()}
    if renamed.keys() != out.keys():
        notes.append("SwiGLU mlp.w12/w3 -> mlp.fc1/fc2")
    return renamed


_DINOV3_DROP = re.compile(r"(^rope_embed\.|\.bias_mask$|^local_cls_norm\.)")
_DINOV3_QKV_BIAS = re.compile(r"^(blocks\.\d+\.attn\.)qkv\.bias$")
_DINOV3_RENAMES = (  # official dinov3/layers -> timm Eva (eva.py checkpoint_filter_fn, read for the names)
    (re.compile(r"^storage_tokens$"), "reg_token"),
    (re.compile(r"^(blocks\.\d+\.)ls1\.gamma$"), r"\1gamma_1"),
    (re.compile(r"^(blocks\.\d+\.)ls2\.gamma$"), r"\1gamma_2"),
    (re.compile(r"^(blocks\.\d+\.mlp\.)w1\."), r"\1fc1_g."),  # SwiGLU (S+, H+, 7B): gate, value, out
    (re.compile(r"^(blocks\.\d+\.mlp\.)w2\."), r"\1fc1_x."),
    (re.compile(r"^(blocks\.\d+\.mlp\.)w3\."), r"\1fc2."),
)


def _convert_dinov3_keys(
    state: dict[str, Tensor], target: BackboneTarget, source: str, notes: list[str]
) -> dict[str, Tensor]:
    """Official DINOv3 (``dinov3/models/vision_transformer.py``) -> timm ``Eva`` keys; other layouts pass through.

    ``storage_tokens`` -> ``reg_token``, ``ls1/ls2.gamma`` -> ``gamma_1/gamma_2``, SwiGLU ``w1/w2/w3`` ->
    ``fc1_g/fc1_x/fc2``; ``rope_embed.periods`` (recomputed by timm), ``local_cls_norm`` (7B pre-training only) and
    the ``bias_mask`` buffers are dropped. ``qkv.bias`` is multiplied by its ``bias_mask`` (which zeroes the key
    bias, as the official forward does) and becomes ``q_bias``/``v_bias`` of a ``*_qkvb`` model; a model without a
    q/v bias takes it only when it is all zero (the released distilled weights), anything else is an error naming
    the ``_qkvb`` architecture to use. The mask token was split off before (``mask_token``, kept for iBOT).
    """
    if "storage_tokens" not in state:
        return state
    out: dict[str, Tensor] = {}
    dropped_bias = 0
    for k, v in state.items():
        if _DINOV3_DROP.search(k):
            continue
        m = _DINOV3_QKV_BIAS.match(k)
        if m:
            mask = state.get(k + "_mask")
            bias = v * mask.to(v.dtype) if mask is not None else v  # (3D,) with the k part zeroed
            q, _, val = bias.chunk(3, dim=-1)
            if f"{m.group(1)}q_bias" in target.shapes:
                out[f"{m.group(1)}q_bias"], out[f"{m.group(1)}v_bias"] = q, val
            elif bool(bias.any()):
                raise CheckpointError(
                    f"{source}: {k} is not zero, but {target.describe()} has no q/v bias; build the `_qkvb` timm "
                    "architecture instead (e.g. vit_large_patch16_dinov3_qkvb), which keeps it"
                )
            else:
                dropped_bias += 1
            continue
        for pattern, repl in _DINOV3_RENAMES:
            k = pattern.sub(repl, k)
        out[k] = v
    notes.append("DINOv3 storage_tokens -> reg_token, ls*.gamma -> gamma_*, qkv.bias (bias_mask applied) -> "
                 + ("dropped (all zero)" if dropped_bias else "q_bias/v_bias"))
    return out


_QKV_PART = re.compile(r"^(blocks\.\d+\.attn\.)([qkv])_proj\.(weight|bias)$")


def _merge_qkv(state: dict[str, Tensor], source: str, notes: list[str]) -> dict[str, Tensor]:
    """Released ExPLoRA full checkpoints keep merged ``q_proj/k_proj/v_proj`` next to ``qkv``: use ``qkv`` when present,
    else rebuild it as ``cat([q, k, v])`` along the output dim (timm's fused layout is [q | k | v])."""
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        m = _QKV_PART.match(k)
        if m:
            parts.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
        else:
            out[k] = v
    rebuilt = 0
    for (prefix, kind), qkv in sorted(parts.items()):
        fused = f"{prefix}qkv.{kind}"
        if fused in out:
            continue
        if set(qkv) != {"q", "k", "v"}:
            raise CheckpointError(
                f"{source}: {prefix}{{q,k,v}}_proj.{kind} incomplete (found {sorted(qkv)}) and no {fused} instead"
            )
        out[fused] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)  # (3D, D) or (3D,)
        rebuilt += 1
    if parts:
        notes.append(f"rebuilt {rebuilt} qkv tensors from q/k/v_proj" if rebuilt else "used qkv, ignored q/k/v_proj")
    return out


def _drop_heads(state: dict[str, Tensor], target: BackboneTarget, notes: list[str]) -> dict[str, Tensor]:
    """Classifier heads (``head.*``, ``pre_logits``) are not part of a backbone built with ``num_classes=0``."""
    drop = [k for k in state if (k.startswith("head.") or "pre_logits" in k) and k not in target.shapes]
    if drop:
        notes.append("dropped classifier " + ", ".join(drop))
    return {k: v for k, v in state.items() if k not in drop}


def _check_architecture(state: Mapping[str, Tensor], target: BackboneTarget, source: str) -> None:
    """Fail early, in words, when the file is another width or depth than the model."""
    proj = state.get("patch_embed.proj.weight")
    dim = int(proj.shape[0]) if proj is not None else None
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    if (dim is not None and dim != target.embed_dim) or (blocks and depth != target.depth):
        found = f"embed_dim={dim}, depth={depth}"
        if proj is not None and proj.ndim == 4:
            found += f", in_chans={proj.shape[1]}, patch_size={proj.shape[-1]}"
        raise CheckpointError(f"{source}: checkpoint is another architecture ({found}); expected {target.describe()}")


def _adapt_patch_embed(
    state: dict[str, Tensor], target: BackboneTarget, source: str, notes: list[str]
) -> dict[str, Tensor]:
    """RGB weights into an ``in_chans != 3`` model: timm's ``adapt_input_conv`` (cycle the RGB filters over the
    channels, scale by 3 / in_chans; sum them for 1 channel). Any other channel or patch mismatch is an error."""
    w = state.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        return state
    if tuple(w.shape[2:]) != target.patch_size:
        raise CheckpointError(
            f"{source}: checkpoint patch size {tuple(w.shape[2:])} differs from the model's {target.patch_size}; "
            f"expected {target.describe()}"
        )
    if w.shape[1] == target.in_chans:
        return state
    if w.shape[1] != 3:
        raise CheckpointError(
            f"{source}: checkpoint has in_chans={w.shape[1]} (patch_embed.proj.weight {tuple(w.shape)}); only RGB "
            f"(3-channel) weights can be adapted; expected {target.describe()}"
        )
    out = dict(state)
    out["patch_embed.proj.weight"] = adapt_input_conv(target.in_chans, w)  # (D, C, p, p)
    notes.append(f"patch embedding adapted from 3 to {target.in_chans} channels (timm adapt_input_conv)")
    return out


def _pos_embed_grid(
    state: Mapping[str, Tensor], target: BackboneTarget, source: str, grid_size: tuple[int, int] | None
) -> tuple[int, int] | None:
    """The patch grid of the checkpoint's ``pos_embed``: ``grid_size`` (from a sidecar), else the target's grid when
    the number of positions is the same (possibly non-square), else a square. None when there is nothing to resample
    (no position embedding, or one the target cannot take)."""
    pos = state.get("pos_embed")
    want = target.shapes.get("pos_embed")
    if pos is None or want is None or pos.ndim != 3 or pos.shape[-1] != want[-1]:
        return None
    prefix = target.pos_prefix_tokens
    n = pos.shape[1] - prefix
    if grid_size is None and pos.shape[1] == want[1]:
        grid_size = target.grid_size  # same number of positions: assume the model's own (possibly non-square) grid
    if grid_size is None:
        side = math.isqrt(max(n, 0))
        if side * side != n:
            raise CheckpointError(
                f"{source}: pos_embed {tuple(pos.shape)} has {n} patch positions after {prefix} prefix token(s), not a "
                f"square grid; expected {target.describe()} (give the grid in a JSON sidecar: pos_embed_grid)"
            )
        grid_size = (side, side)
    if grid_size[0] * grid_size[1] != n:
        raise CheckpointError(
            f"{source}: pos_embed {tuple(pos.shape)} has {n} patch positions, not the {grid_size[0]}x{grid_size[1]} "
            f"grid its metadata gives; expected {target.describe()}"
        )
    return int(grid_size[0]), int(grid_size[1])


def _resample_pos_embed(
    state: dict[str, Tensor],
    target: BackboneTarget,
    grid_size: tuple[int, int] | None,
    interpolation: str,
    antialias: bool,
    notes: list[str],
) -> dict[str, Tensor]:
    """Interpolate the patch part of ``pos_embed`` from ``grid_size`` to the target's grid with timm's
    ``resample_abs_pos_embed`` (a no-op when the grids agree)."""
    if grid_size is None or (tuple(grid_size) == target.grid_size
                             and state["pos_embed"].shape[1] == target.shapes["pos_embed"][1]):
        return state
    out = dict(state)
    out["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"],  # (1, prefix + Ho*Wo, D) -> (1, prefix + H*W, D)
        new_size=list(target.grid_size),
        old_size=list(grid_size),
        num_prefix_tokens=target.pos_prefix_tokens,
        interpolation=interpolation,
        antialias=antialias,
    )
    notes.append(
        f"pos_embed resampled {grid_size[0]}x{grid_size[1]} -> {target.grid_size[0]}x{target.grid_size[1]} "
        f"({interpolation}, antialias={antialias})"
    )
    return out


def _check_keys(state: Mapping[str, Tensor], target: BackboneTarget, source: str, layout: str) -> None:
    """Everything must match: no missing key, no unexpected key, no shape difference."""
    missing = [k for k in target.shapes if k not in state]
    unexpected = [k for k in state if k not in target.shapes]
    wrong = [k for k in state if k in target.shapes and tuple(state[k].shape) != target.shapes[k]]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        shown = ", ".join(f"{k} {target.shapes[k]}" for k in missing[:_N_SHOWN])
        problems.append(f"{len(missing)} missing key(s): {shown}")
    if unexpected:
        shown = ", ".join(f"{k} {tuple(state[k].shape)}" for k in unexpected[:_N_SHOWN])
        problems.append(f"{len(unexpected)} unexpected key(s): {shown}")
        if any("lora_" in k for k in unexpected):
            problems.append("the file holds unmerged LoRA weights; merge them into the base weights first")
    if wrong:
        shown = ", ".join(f"{k} {tuple(state[k].shape)} vs {target.shapes[k]}" for k in wrong[:_N_SHOWN])
        problems.append(f"{len(wrong)} shape mismatch(es) (checkpoint vs model): {shown}")
    raise CheckpointError(
        f"{source}: {layout} checkpoint does not fit {target.describe()} after conversion to timm keys: "
        + "; ".join(problems)
    )


_PATCH = "patch_embed.proj.weight"


def adapted_backbone_state(raw: Mapping[str, Any], source: str) -> dict[str, Tensor]:
    """The backbone tensors (with ``lora_`` keys) of an explora training checkpoint: unwrap containers, strip prefixes.

    Unlike :func:`convert_checkpoint` (upstream files, converted to timm keys) this keeps the adapted model's own
    keys, wherever the objective nests them (``objective.teacher.backbone.*``, ``student.backbone.*``, ...): every
    nested mapping is flattened, and the shortest path to a ``patch_embed.proj.weight`` wins, the EMA teacher first.
    """
    flat: dict[str, Tensor] = {}

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, Tensor):
            flat[prefix[:-1]] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}{k}.")

    walk(raw, "")
    prefixes = [k[: -len(_PATCH)] for k in flat if k.endswith(_PATCH)]
    prefixes.sort(key=lambda p: ("teacher" not in p, len(p)))  # prefer the EMA teacher, then the shortest path
    if not prefixes:
        raise CheckpointError(f"{source}: no '{_PATCH}' tensor found; is this a ViT checkpoint?")
    p = prefixes[0]
    state = {k[len(p) :]: v for k, v in flat.items() if k.startswith(p)}
    return {k: v for k, v in state.items() if not re.match(r"^(head|dino_head|ibot_head)\.", k)}
