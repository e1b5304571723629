"""LoRA layers for timm ViTs, including LoRA on the q/k/v *slices* of timm's fused ``attn.qkv``.

ExPLoRA puts LoRA on the Q and V projections of every frozen block (paper §3, project page "Method"). timm fuses
Q, K and V into one ``nn.Linear(dim, 3 * dim)`` whose output is laid out ``[q | k | v]``; peft can only adapt that
module as a whole (peft PR#1705), so we implement the layer ourselves, following the standard LoRA recipe of
Hu et al. (2021) and the fused-layer idea of microsoft/LoRA ``MergedLinear`` (``enable_lora=[True, False, True]``):

    W' = W + (alpha / r) * B @ A,   A ~ Kaiming-uniform(a=sqrt(5)),  B = 0

Both layers subclass ``nn.Linear`` and keep ``weight``/``bias``, so timm parameter names are unchanged and a merged
model is a plain timm model; every LoRA parameter has ``lora_`` in its name (architecture contract).

A LoRA layer only acts if the attention's forward *calls* the module in ``attn.qkv``. timm's ``Attention`` does;
timm's ``EvaAttention`` (DINOv3, EVA) does too, except with separate ``q_bias``/``v_bias`` parameters and
``qkv_bias_separate=False`` (the DINOv3 ``*_qkvb`` models), where it calls ``F.linear(x, qkv.weight, bias)`` on the
weight directly and a swapped-in module is silently bypassed. :func:`route_qkv_through_module` makes such an
attention call ``self.qkv(x)`` and add the bias after it (timm's own ``qkv_bias_separate`` path: the same sum), and
refuses, with a :class:`ConfigError`, every attention layout it does not know LoRA reaches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from timm.models.eva import EvaAttention
from timm.models.vision_transformer import Attention
from torch import nn

from explora.core.errors import ConfigError

QKV_TARGETS = ("q", "k", "v")
# Plain Linear targets inside a timm Block, by short name -> attribute path.
LINEAR_TARGETS = {"proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_TARGET_ALIASES = {"attn.proj": "proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2", "qkv": "qkv", "attn.qkv": "qkv"}


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in autocast's matmul dtype when autocast is on for its device (what ``F.linear`` would cast it to)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(dev)
        if x.dtype != dtype and x.dtype == torch.float32:
            return x.to(dtype)
    return x


class LoRALayer(nn.Linear):
    """Common base: rank/alpha/dropout bookkeeping and exact merge/unmerge of ``delta_weight()``."""

    def _init_lora(self, rank: int, alpha: float | None, dropout: float) -> None:
        if not isinstance(rank, int) or rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update ``scaling * B @ A`` laid out like ``weight`` (out, in)."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """``weight`` with the LoRA update folded in (a new tensor; the module is not modified)."""
        w = self.weight.detach()
        return w.clone() if self.merged else w + self.delta_weight().detach().to(w.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight``; forward then costs one matmul and the LoRA path is skipped."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact up to one fp rounding of ``W + d - d``)."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def _fold_on_the_fly(self) -> bool:
        """Without autograd (the EMA teacher, feature extraction) fold the update into a temporary weight.

        One (out, in) add per call replaces the low-rank path over every token (two extra matmuls, a batched
        matmul and an ``index_add``), so an inference forward costs one matmul; same result up to fp rounding.
        Not with active LoRA dropout (train mode), which the folded weight cannot express.
        """
        if self.merged or torch.is_grad_enabled():
            return False
        return not self.training or isinstance(self.lora_dropout, nn.Identity)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight (shares ``bias``; used by :func:`remove_lora`)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.merged_weight(), requires_grad=self.weight.requires_grad)
        lin.bias = self.bias
        return lin

    def _adopt(self, base: nn.Linear) -> None:
        """Share the base layer's parameters (same tensors, same ``requires_grad``) instead of copying them."""
        self.weight = base.weight
        self.bias = base.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """LoRA on a whole Linear (``attn.proj``, ``mlp.fc1``, ``mlp.fc2``): ``y = x W^T + b + s * (x A^T) B^T``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(rank, alpha, dropout)
        self._make_lora_parameters(device, dtype)

    def _make_lora_parameters(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.rank, device=device, dtype=dtype))  # (out, r)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0) -> LoRALinear:
        """Wrap an existing Linear, sharing its ``weight``/``bias`` parameters."""
        layer = cls(
            base.in_features, base.out_features, bias=base.bias is not None, rank=rank, alpha=alpha,
            dropout=dropout, device="meta", dtype=base.weight.dtype,
        )
        layer._adopt(base)
        layer._make_lora_parameters(base.weight.device, base.weight.dtype)
        return layer

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (a=sqrt(5), as ``nn.Linear`` and peft), B zeros, so the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fold_on_the_fly():
            return F.linear(x, self.weight + self.delta_weight().to(self.weight.dtype), self.bias)  # (..., out)
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        x = _autocast_input(x)  # cast once for both matmuls (autocast would cast x for each)
        out = F.linear(x, self.weight, self.bias)  # (..., out)
        low = F.linear(self.lora_dropout(x), self.lora_A)  # (..., r)
        return out + F.linear(low, self.lora_B) * self.scaling  # (..., out)


class LoRAQKV(LoRALayer):
    """timm's fused ``qkv`` Linear with independent LoRA pairs on a subset of its q/k/v output slices.

    The A and B matrices of the ``T`` targets are stacked (``lora_A``: (T, r, in), ``lora_B``: (T, dim, r)), so the
    low-rank path is one matmul down and one ``addmm_`` up: the scaled B blocks are laid out in a (T*r, 3*dim)
    matrix at their targets' output slices (zeros elsewhere, :meth:`up_weight`), and ``low @ up`` is added in place
    to the base matmul's fresh (N, 3*dim) output. No loop over targets or heads, no in-place update of a slice view
    (whose backward copies the whole (N, 3*dim) gradient twice and zero-fills a third) and no batched matmul of
    tiny blocks.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        targets: Sequence[str] = ("q", "v"),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if out_features % 3:
            raise ConfigError(f"a fused qkv layer needs out_features divisible by 3, got {out_features}")
        targets = tuple(targets)
        if not targets or any(t not in QKV_TARGETS for t in targets) or len(set(targets)) != len(targets):
            raise ConfigError(f"LoRA qkv targets must be distinct entries of {QKV_TARGETS}, got {targets!r}")
        self._init_lora(rank, alpha, dropout)
        self.targets = tuple(sorted(targets, key=QKV_TARGETS.index))
        self.dim = out_features // 3
        self._make_lora_parameters(device, dtype)

    def _make_lora_parameters(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        ids = [QKV_TARGETS.index(t) for t in self.targets]
        index = torch.tensor(ids)
        self.register_buffer("lora_index", index.to(device or "cpu"), persistent=False)  # (T,) slice ids
        select = F.one_hot(index, len(QKV_TARGETS)).to(dtype or torch.get_default_dtype())  # (T, 3)
        self.register_buffer("lora_select", select.to(device or "cpu"), persistent=False)  # target t -> slice ids[t]
        n, r = len(self.targets), self.rank
        self.lora_A = nn.Parameter(torch.empty(n, r, self.in_features, device=device, dtype=dtype))  # (T, r, in)
        self.lora_B = nn.Parameter(torch.empty(n, self.dim, r, device=device, dtype=dtype))  # (T, dim, r)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        targets: Sequence[str] = ("q", "v"),
    ) -> LoRAQKV:
        """Wrap timm's ``attn.qkv``, sharing its ``weight``/``bias`` parameters."""
        layer = cls(
            base.in_features, base.out_features, bias=base.bias is not None, rank=rank, alpha=alpha,
            dropout=dropout, targets=targets, device="meta", dtype=base.weight.dtype,
        )
        layer._adopt(base)
        layer._make_lora_parameters(base.weight.device, base.weight.dtype)
        return layer

    def reset_lora_parameters(self) -> None:
        """Per target: A Kaiming-uniform with fan_in = in_features (as a separate ``nn.Linear``), B zeros."""
        for a in self.lora_A:  # init only; fan_in of each (r, in) slice is in_features
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        per_target = torch.bmm(self.lora_B, self.lora_A) * self.scaling  # (T, dim, r) @ (T, r, in) -> (T, dim, in)
        delta = per_target.new_zeros(3, self.dim, self.in_features)  # (3, dim, in)
        delta = delta.index_add(0, self.lora_index, per_target)
        return delta.reshape(self.out_features, self.in_features)  # (3*dim, in), rows laid out [q | k | v]

    def up_weight(self) -> torch.Tensor:
        """(T*r, 3*dim): ``scaling * B_t^T`` in the output columns of target ``t``'s slice, zeros elsewhere, so
        ``low @ up_weight()`` is the low-rank update of every output (k's columns stay 0 with the q/v default)."""
        n, dim, r = self.lora_B.shape
        up = self.lora_B.transpose(1, 2) * self.scaling  # (T, r, dim), scaling on the small tensor
        placed = up.unsqueeze(2) * self.lora_select.to(up.dtype)[:, None, :, None]  # (T, r, 3, dim)
        return placed.reshape(n * r, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fold_on_the_fly():
            return F.linear(x, self.weight + self.delta_weight().to(self.weight.dtype), self.bias)  # (..., 3*dim)
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        x = _autocast_input(x)  # cast once for both matmuls (autocast would cast x for each)
        flat = x.reshape(-1, x.shape[-1])  # (N, in)
        out = F.linear(flat, self.weight, self.bias)  # (N, 3*dim), a fresh tensor that no backward needs
        n, r = self.lora_A.shape[:2]
        low = F.linear(self.lora_dropout(flat), self.lora_A.reshape(n * r, -1))  # (N, T*r)
        # out += low @ up in place (not a view, so no slice bookkeeping in backward; no (N, 3*dim) copy either)
        out.addmm_(low, self.up_weight().to(low.dtype))  # (N, 3*dim)
        return out.view(*x.shape[:-1], out.shape[-1])  # (..., 3*dim)


def lora_modules(model: nn.Module) -> dict[str, LoRALayer]:
    """All LoRA layers of ``model`` by qualified module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def _resolve_blocks(model: nn.Module, blocks: Iterable[int] | None, blocks_attr: str = "blocks") -> list[int]:
    """Block indices (negative allowed) -> sorted non-negative indices into ``model.<blocks_attr>``."""
    if not isinstance(getattr(model, blocks_attr, None), nn.Sequential | nn.ModuleList):
        raise ConfigError(
            f"{type(model).__name__} has no `{blocks_attr}` block list; LoRA injection expects a timm "
            "VisionTransformer (`blocks`) or a module holding timm Blocks (e.g. the MAE decoder's `decoder_blocks`)"
        )
    depth = len(getattr(model, blocks_attr))
    if blocks is None:
        return list(range(depth))
    out = set()
    for i in blocks:
        if not -depth <= int(i) < depth:
            raise ConfigError(f"block index {i} is out of range for a model with {depth} blocks")
        out.add(int(i) % depth)
    return sorted(out)


def split_lora_targets(targets: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Target names -> (qkv slices, plain Linear short names); raises ConfigError naming unknown entries."""
    qkv, linear = [], []
    for t in targets:
        t = _TARGET_ALIASES.get(t, t)
        if t == "qkv":
            qkv.extend(QKV_TARGETS)
        elif t in QKV_TARGETS:
            qkv.append(t)
        elif t in LINEAR_TARGETS:
            linear.append(t)
        else:
            allowed = list(QKV_TARGETS) + ["qkv"] + list(LINEAR_TARGETS) + list(LINEAR_TARGETS.values())
            raise ConfigError(f"unknown LoRA target {t!r}; expected one of {allowed}")
    return tuple(dict.fromkeys(qkv)), tuple(dict.fromkeys(linear))


def route_qkv_through_module(attn: nn.Module, where: str = "attn") -> None:
    """Make ``attn``'s forward compute q/k/v by calling the module in ``attn.qkv``, or raise ConfigError.

    Known layouts (the forward of the exact class, not of a subclass that overrides it):
    - timm ``Attention`` (ViT, DinoV2, MAE): calls ``self.qkv(x)``; nothing to do.
    - timm ``EvaAttention`` with a fused ``qkv``: calls ``self.qkv(x)`` unless it has ``q_bias``/``v_bias`` and
      ``qkv_bias_separate=False`` (``F.linear`` on ``qkv.weight``); that one is switched to
      ``qkv_bias_separate=True`` (``qkv(x) + cat(q_bias, 0, v_bias)``, the same value up to fp rounding).
    Anything else (separate ``q_proj``/``k_proj``/``v_proj``, other attention classes, overridden forwards) is
    refused instead of leaving a LoRA layer that the forward never calls.
    """
    kind = type(attn)
    if kind.forward is Attention.forward and isinstance(attn, Attention):
        return
    if kind.forward is EvaAttention.forward and isinstance(attn, EvaAttention):
        if not isinstance(getattr(attn, "qkv", None), nn.Linear):
            raise ConfigError(
                f"{where}: {kind.__name__} has no fused qkv Linear (separate q_proj/k_proj/v_proj); LoRA on q/k/v "
                "slices supports fused-qkv attention only"
            )
        if attn.q_bias is not None and not attn.qkv_bias_separate:
            attn.qkv_bias_separate = True  # forward now calls self.qkv(x), then adds the bias
        return
    raise ConfigError(
        f"{where}: LoRA cannot reach the q/k/v projections of {kind.__module__}.{kind.__qualname__} (known layouts: "
        "timm Attention, timm EvaAttention with a fused qkv); refusing instead of injecting a LoRA layer its forward "
        "would never call"
    )


def inject_lora(
    model: nn.Module,
    blocks: Iterable[int] | None = None,
    targets: Iterable[str] = ("q", "v"),
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    *,
    blocks_attr: str = "blocks",
) -> list[str]:
    """Replace the target Linears of the given blocks (all if None) by LoRA layers; returns the replaced names.

    Targets: ``q``/``k``/``v`` (slices of ``attn.qkv``; ``qkv`` = all three), ``proj``, ``fc1``, ``fc2`` (or their
    paths ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``). Base parameters are shared, so their ``requires_grad`` is kept;
    new LoRA parameters are trainable. ``blocks_attr`` names the list of timm Blocks: ``blocks`` for a ViT,
    ``decoder_blocks`` for the MAE decoder (the official ExPLoRA MAE recipe LoRA-tunes the decoder too).
    """
    qkv_targets, linear_targets = split_lora_targets(targets)
    replaced: list[str] = []
    for i in _resolve_blocks(model, blocks, blocks_attr):
        block = getattr(model, blocks_attr)[i]
        where = f"{blocks_attr}.{i}"
        if qkv_targets:
            attn = block.attn
            if isinstance(getattr(attn, "qkv", None), LoRALayer):
                raise ConfigError(f"{where}.attn.qkv already carries LoRA; inject once per model")
            route_qkv_through_module(attn, f"{where}.attn")
            attn.qkv = LoRAQKV.from_linear(attn.qkv, rank, alpha, dropout, qkv_targets)
            replaced.append(f"{where}.attn.qkv")
        for t in linear_targets:
            parent_name, attr = LINEAR_TARGETS[t].split(".")
            parent = getattr(block, parent_name)
            base = getattr(parent, attr, None)
            if base is None:
                raise ConfigError(
                    f"{where}.{LINEAR_TARGETS[t]}: {type(parent).__name__} has no `{attr}` Linear (a SwiGLU MLP has "
                    f"fc1_g/fc1_x); LoRA target {t!r} does not exist in this model"
                )
            if isinstance(base, LoRALayer):
                raise ConfigError(f"{where}.{LINEAR_TARGETS[t]} already carries LoRA; inject once per model")
            if type(base) is not nn.Linear:
                raise ConfigError(f"{where}.{LINEAR_TARGETS[t]} is {type(base).__name__}, expected nn.Linear")
            setattr(parent, attr, LoRALinear.from_linear(base, rank, alpha, dropout))
            replaced.append(f"{where}.{LINEAR_TARGETS[t]}")
    return replaced


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (in place, reversible with :func:`unmerge_lora`)."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora`."""
    for m in lora_modules(model).values():
        m.unmerge()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain timm state dict with LoRA folded in and no ``lora_`` keys; ``model`` is left untouched."""
    sd = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    for name, m in lora_modules(model).items():
        sd[f"{name}.weight" if name else "weight"] = m.merged_weight()
    return sd


def remove_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by a plain ``nn.Linear`` holding the merged weight; returns ``model``."""
    for name, m in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, m.to_linear())
    return model
