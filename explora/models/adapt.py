"""The ExPLoRA parameterisation: which parameters of a pre-trained ViT are trained during extended pre-training.

Paper (Khanna et al., ICML 2025, §3 and project page "Method"): freeze everything, fully unfreeze a small set U of
blocks ("usually just 1 or 2"), train all normalisation layers (arXiv v1 abstract), and put LoRA of rank r on the
Q and V projections of every remaining block. Patch/position embeddings and tokens are not named by the paper; they
stay frozen by default and can be switched on. :class:`ExploraSpec` records the choice so a resumed run rebuilds the
same model, and :data:`PRESETS` gives the named settings: explora's own (LoRA alpha = rank, cls token frozen) and the
``*-official`` ones read from the official ExPLoRA scripts (paper-notes §9: loralib alpha 1, so scaling 1/r, and a
trainable cls token).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import yaml
from torch import nn

from explora.core import config as _config
from explora.core.errors import ConfigError
from explora.models.record import ensure_record
from explora.vit.lora import inject_lora, lora_modules

_TOKEN_NAMES = ("cls_token", "reg_token", "dist_token")


def is_norm(module: nn.Module) -> bool:
    """True for normalisation layers with their own parameters (LayerNorm, RMSNorm, GroupNorm, BatchNorm, ...)."""
    if isinstance(module, nn.Identity):
        return False
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)):
        return True
    return type(module).__name__.lower().endswith(("norm", "norm2d", "normfp32"))


@dataclass
class ExploraSpec:
    """Everything :func:`apply_explora` needs to rebuild the same trainable set; plain types, YAML-friendly.

    The one definition of the ExPLoRA parameterisation: the Python API (``apply_explora(model, spec)``), the
    pre-training config's ``adapt:`` section, the ``export``/``params`` flags and the presets (:data:`PRESETS`) are all
    this dataclass. ``unfrozen_blocks``/``lora_blocks`` are as req (negative indices allowed); ``depth`` and
    ``resolved_*`` are filled in by :func:`apply_explora` for the model it was applied to.
    """

    unfrozen_blocks: tuple[int, ...] = (-1,)  # blocks trained in full; negative counts from the end (-1 = last, [L])
    lora_rank: int = 64  # LoRA rank r on lora_targets of lora_blocks (0 = no LoRA)
    lora_alpha: float | None = None  # LoRA scaling alpha/r; null = r (scaling 1), 1.0 = loralib's (official)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: tuple[str, ...] = ("q", "v")  # projections given LoRA: q, k, v, proj, fc1, fc2
    train_norms: bool = True  # train every normalisation layer (paper: all norms)
    train_patch_embed: bool = False  # train the patch embedding
    train_pos_embed: bool = False  # train the position embedding
    train_tokens: bool = False  # train cls/register tokens and the objective's mask token
    train_cls_token: bool = False  # train the cls token only (the official scripts do)
    lora_blocks: tuple[int, ...] | None = None  # blocks given LoRA; null = every block not unfrozen
    preset: str | None = None  # the named preset these settings start from (see PRESETS); recorded for the report
    depth: int | None = field(default=None, metadata={"derived": True})
    resolved_unfrozen_blocks: tuple[int, ...] = field(default_factory=tuple, metadata={"derived": True})
    resolved_lora_blocks: tuple[int, ...] = field(default_factory=tuple, metadata={"derived": True})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ExploraSpec:
        """The named preset with ``overrides`` (field names) applied; unknown names suggest a match."""
        return replace(preset_spec(name), **overrides)

    @classmethod
    def from_config(cls, data: Mapping[str, Any], default: ExploraSpec | None, where: str = "adapt") -> ExploraSpec:
        """A config section -> spec: start from its ``preset`` (else ``default``'s), the keys given override it.

        A section saved by earlier versions (every unset field saved as ``null``) reads the same way:
        there a null meant "the preset's value", so nulls are dropped when any non-nullable field holds one.
        """
        data = dict(data)
        default = default if default is not None else cls()
        name = data.pop("preset", default.preset)
        if any(data.get(k, 0) is None for k in _NOT_NULLABLE):
            data = {k: v for k, v in data.items() if v is not None}
        start = cls() if name is None else preset_spec(name)
        return _config.from_dict(cls, {**_config.to_dict(start), **data, "preset": name}, where)

    def options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`apply_explora` this spec stands for."""
        skip = {"preset", "depth", "resolved_unfrozen_blocks", "resolved_lora_blocks"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists) for YAML/JSON and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExploraSpec:
        """Inverse of :meth:`to_dict`; unknown keys raise ConfigError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ExploraSpec key(s) {unknown}; expected a subset of {sorted(known)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> ExploraSpec:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ConfigError(f"an ExploraSpec YAML must be a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    def apply(self, model: nn.Module, mask_token: nn.Parameter | None = None) -> ExploraSpec:
        """Re-apply this spec to a freshly built model (resume); checks the depth matches."""
        if self.depth is not None and hasattr(model, "blocks") and len(model.blocks) != self.depth:
            raise ConfigError(f"ExploraSpec was made for a {self.depth}-block model, got {len(model.blocks)} blocks")
        return apply_explora(model, self, mask_token=mask_token)


_NOT_NULLABLE = ("unfrozen_blocks", "lora_rank", "lora_dropout", "lora_targets", "train_norms", "train_patch_embed",
                 "train_pos_embed", "train_tokens", "train_cls_token")
_OPTIONS = frozenset(f.name for f in fields(ExploraSpec) if not f.metadata.get("derived"))


def _resolve(indices: Iterable[int], depth: int, what: str) -> tuple[int, ...]:
    """Block indices (negative from the end) -> sorted non-negative ones; out of range is a ConfigError, never
    silently nothing (a ViT-B/12 given the ViT-L index 23 would otherwise unfreeze no block at all)."""
    out = set()
    for i in indices:
        if not -depth <= int(i) < depth:
            raise ConfigError(
                f"{what}: block index {i} is out of range for a model with {depth} blocks (valid: {-depth}..{depth - 1}"
                "; -1 is the last block)"
            )
        out.add(int(i) % depth)
    return tuple(sorted(out))


def apply_explora(
    model: nn.Module, spec: ExploraSpec | None = None, *, mask_token: nn.Parameter | None = None, **options: Any
) -> ExploraSpec:
    """Freeze ``model`` (a timm ViT), then make the ExPLoRA parameters trainable; returns the spec it applied.

    ``spec`` (default: ``ExploraSpec()``) says what is trained; keyword ``options`` (its field names, the call form
    from before the spec existed) override its fields: ``apply_explora(vit, lora_rank=8)``.

    - ``unfrozen_blocks``: blocks trained in full (negative indices count from the end; ``-1`` = last block [L]).
    - LoRA (``lora_rank`` > 0) on ``lora_targets`` of ``lora_blocks`` (default: every block not unfrozen).
    - ``train_norms``: every norm layer with parameters (``norm1``/``norm2`` of each block, ``norm``, ``fc_norm``).
    - ``train_patch_embed``, ``train_pos_embed``, ``train_tokens`` (cls, register tokens and ``mask_token`` if given).
    - ``train_cls_token``: the cls token only (the official ExPLoRA scripts train it; paper-notes §9).
    - ``lora_alpha``: LoRA scaling ``alpha / rank``; ``None`` = rank (scaling 1, explora's choice), ``1.0`` = loralib's
      default that the official scripts never change (scaling ``1 / rank``).
    The spec is also recorded as ``record_of(model).spec`` (:mod:`explora.models.record`).
    """
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise TypeError(f"apply_explora() got unexpected keyword argument(s) {unknown}; expected {sorted(_OPTIONS)}")
    req = replace(spec if spec is not None else ExploraSpec(), **options)
    unfrozen_blocks, lora_blocks, lora_targets = req.unfrozen_blocks, req.lora_blocks, req.lora_targets
    lora_rank, lora_alpha, train_norms = req.lora_rank, req.lora_alpha, req.train_norms
    train_patch_embed, train_pos_embed = req.train_patch_embed, req.train_pos_embed
    train_tokens, train_cls_token = req.train_tokens, req.train_cls_token
    if not hasattr(model, "blocks"):
        raise ConfigError(f"apply_explora expects a timm VisionTransformer with `blocks`, got {type(model).__name__}")
    if lora_modules(model):
        raise ConfigError("apply_explora was given a model that already has LoRA layers; build a fresh backbone")
    depth = len(model.blocks)
    unfrozen = _resolve(unfrozen_blocks, depth, "unfrozen_blocks")
    if lora_blocks is None:
        lora_idx = tuple(i for i in range(depth) if i not in unfrozen)
    else:
        lora_idx = _resolve(lora_blocks, depth, "lora_blocks")
    use_lora = bool(lora_rank) and bool(lora_idx) and bool(tuple(lora_targets))
    spec = ExploraSpec(
        unfrozen_blocks=tuple(int(i) for i in unfrozen_blocks),
        lora_rank=int(lora_rank or 0),
        lora_alpha=lora_alpha,
        lora_dropout=float(req.lora_dropout),
        lora_targets=tuple(lora_targets),
        train_norms=train_norms,
        train_patch_embed=train_patch_embed,
        train_pos_embed=train_pos_embed,
        train_tokens=train_tokens,
        train_cls_token=train_cls_token,
        lora_blocks=None if lora_blocks is None else tuple(int(i) for i in lora_blocks),
        preset=req.preset,
        depth=depth,
        resolved_unfrozen_blocks=unfrozen,
        resolved_lora_blocks=lora_idx if use_lora else (),
    )

    model.requires_grad_(False)
    if mask_token is not None:
        mask_token.requires_grad_(False)
    for i in unfrozen:
        model.blocks[i].requires_grad_(True)
    if train_norms:
        for m in model.modules():
            if is_norm(m):
                m.requires_grad_(True)
    if train_patch_embed:
        model.patch_embed.requires_grad_(True)
    if train_pos_embed and getattr(model, "pos_embed", None) is not None:
        model.pos_embed.requires_grad_(True)
    if train_tokens:
        for name in _TOKEN_NAMES:
            p = getattr(model, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(True)
        if mask_token is not None:
            mask_token.requires_grad_(True)
    if train_cls_token:
        if not isinstance(getattr(model, "cls_token", None), nn.Parameter):
            raise ConfigError(f"train_cls_token: {type(model).__name__} has no cls_token parameter to train")
        model.cls_token.requires_grad_(True)
    if use_lora:
        inject_lora(model, lora_idx, spec.lora_targets, spec.lora_rank, lora_alpha, spec.lora_dropout)
    ensure_record(model).spec = spec
    return spec


# The paper's named settings (paper-notes §1.1-1.2, §2.1) plus the two ablations of §5. The plain names are explora's
# own choices where the paper is silent (LoRA alpha = rank, i.e. scaling 1; cls token frozen); the ``-official``
# names are what the official ExPLoRA scripts run (paper-notes §9).
PRESETS: dict[str, ExploraSpec] = {
    # DinoV2 init, last block [L] unfrozen, LoRA r64 on Q,V of the other blocks, all norms.
    "D-[L]-r64": ExploraSpec(unfrozen_blocks=(-1,), lora_rank=64, lora_targets=("q", "v"), train_norms=True),
    # MAE init, first and last block unfrozen, LoRA r32 on Q,V of the other blocks, all norms.
    "M-[1,L]-r32": ExploraSpec(unfrozen_blocks=(0, -1), lora_rank=32, lora_targets=("q", "v"), train_norms=True),
    # Supervised LoRA fine-tuning of the paper: r8 on Q,V of every block, nothing unfrozen, norms frozen.
    "LoRA-r8": ExploraSpec(unfrozen_blocks=(), lora_rank=8, lora_targets=("q", "v"), train_norms=False),
    # scripts/pretrain_dino.sh: unfreeze block 23 (the last of ViT-L; -1 keeps it the last on every depth), LoRA r64
    # on Q,V with loralib's lora_alpha 1 (scaling 1/64), all norms, the cls token.
    "D-[L]-r64-official": ExploraSpec(
        unfrozen_blocks=(-1,), lora_rank=64, lora_alpha=1.0, lora_targets=("q", "v"), train_norms=True,
        train_cls_token=True,
    ),
    # scripts/pretrain_mae.sh, encoder side: block 23 only (not [1, L]), LoRA r64 on Q,V with alpha 1, every norm,
    # the cls token. Its decoder LoRA (r8 on Q,V, alpha 1) is an objective setting: mae.decoder_lora_rank/_alpha.
    "M-[L]-r64-official": ExploraSpec(
        unfrozen_blocks=(-1,), lora_rank=64, lora_alpha=1.0, lora_targets=("q", "v"), train_norms=True,
        train_cls_token=True,
    ),
    # scripts/finetune.sh: LoRA r8 on Q,V of every block with alpha 1 (scaling 1/8), norms frozen.
    "LoRA-r8-official": ExploraSpec(
        unfrozen_blocks=(), lora_rank=8, lora_alpha=1.0, lora_targets=("q", "v"), train_norms=False
    ),
    # DINOv3 (timm Eva: cls + 4 registers, RoPE, LayerScale): the D-[L]-r64 recipe on a DINOv3 backbone. The
    # unfrozen block trains its LayerScale gammas with it; LoRA on Q,V of the fused qkv (the *_qkvb models' q/v
    # biases stay frozen, as the qkv bias of a DinoV2 block does); no position embedding to train (RoPE).
    "D3-[L]-r64": ExploraSpec(unfrozen_blocks=(-1,), lora_rank=64, lora_targets=("q", "v"), train_norms=True),
    # ... plus the cls and the 4 register tokens (and the iBOT mask token): DINOv3's registers absorb
    # image-global "sink" attention, which a new domain may need to move.
    "D3-[L]-r64-reg": ExploraSpec(
        unfrozen_blocks=(-1,), lora_rank=64, lora_targets=("q", "v"), train_norms=True, train_tokens=True
    ),
    # The last two blocks unfrozen, LoRA r32 on Q,V of the others: the trainable budget moved from LoRA to full
    # blocks (ViT-L/16: 28.2M trainable vs 18.7M for D3-[L]-r64, docs/dinov3.md).
    "D3-[L-1,L]-r32": ExploraSpec(unfrozen_blocks=(-2, -1), lora_rank=32, lora_targets=("q", "v"), train_norms=True),
    # Ablation: LoRA r64 on every block + norms, no unfrozen block.
    "lora-only-r64": ExploraSpec(unfrozen_blocks=(), lora_rank=64, lora_targets=("q", "v"), train_norms=True),
    # Ablation: last block + norms, no LoRA.
    "unfreeze-only-[L]": ExploraSpec(unfrozen_blocks=(-1,), lora_rank=0, train_norms=True),
}
PRESETS = {name: replace(spec, preset=name) for name, spec in PRESETS.items()}  # each records its own name


def preset_spec(name: str) -> ExploraSpec:
    """The preset called ``name``; an unknown name is a ConfigError suggesting the closest."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.3)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown ExPLoRA preset {name!r}{hint}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


def preset_options(name: str, **overrides: Any) -> dict[str, Any]:
    """The :func:`apply_explora` keyword arguments of a preset, with overrides; unknown names suggest a match."""
    return preset_spec(name).options() | overrides


def apply_preset(model: nn.Module, name: str, **overrides: Any) -> ExploraSpec:
    """:func:`apply_explora` with a named preset's settings (``overrides`` win)."""
    return apply_explora(model, preset_spec(name), **overrides)


__all__ = ["ExploraSpec", "PRESETS", "apply_explora", "apply_preset", "is_norm", "preset_options", "preset_spec"]
