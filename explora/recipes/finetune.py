"""Supervised fine-tuning of a (possibly ExPLoRA-adapted) ViT: LoRA-r8 (the paper's main setting), full, or head-only.

Two named recipes (:data:`FINETUNE_RECIPES`, ``explora finetune --recipe``) give every setting; explicit arguments
override their part:

- ``official``: the official ExPLoRA ``scripts/finetune.sh`` / ``finetune/finetune.py`` (paper-notes §9): LoRA r8 on
  Q,V of every block with loralib alpha 1 (preset ``LoRA-r8-official``) + the head, everything else frozen; global
  average pool of the last block's patch tokens + ``fc_norm`` (timm/MAE ``global_pool='avg'``); 120 epochs, blr 1e-3
  at batch 128, warm-up 5 epochs, weight decay 0, layer decay 1.0, drop path 0.2, label smoothing 0.1, RandAugment
  ``rand-m9-mstd0.5-inc1``, no mixup/cutmix, no random erasing, no clipping.
- ``explora`` (the default): explora's own, from the SatMAE/MAE fine-tuning recipe (MAE ``main_finetune.py``,
  SatMAE README), chosen before the official scripts were public: preset ``LoRA-r8`` (alpha = rank), final-norm CLS
  token, RandomResizedCrop (0.08, 1) + flip, mixup 0.8 / cutmix 1.0 (switch 0.5), label smoothing 0.1, AdamW blr
  1e-3 (linear /256), layer decay 0.75, weight decay 0.05, 1,000 steps.

Both: head weight trunc-normal std 2e-5 (MAE ``main_finetune.py``), evaluation every epoch, best epoch kept.

The training loop is the engine's (:func:`explora.engine.trainer.train`); this module provides the model, the
objective and the evaluation it calls.

Group-channel (multispectral) and temporal encoders (:mod:`explora.models.group_channel`,
:mod:`explora.models.temporal`) fine-tune exactly like RGB ViTs: LoRA goes into their shared timm blocks, the head
reads the mean over all their tokens (every group / frame and position, SatMAE's fine-tuning pooling, the same
feature as :func:`explora.objectives.mae.objective.build_feature_extractor`), and frame ``timestamps`` (B, T, 3)
travel from the dataset's third element through the batch transform, the model and the evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from explora.core.errors import ConfigError, DataError
from explora.data.multicrop import random_resized_crop_boxes
from explora.data.windowing import require_unit_range
from explora.eval.features import EvalTransform, eval_transform_for
from explora.eval.metrics import classification_metrics, save_metrics
from explora.objectives.base import BatchTransform, Objective, ObjectiveOutput

Pool = Literal["cls", "avg", "cls+avg", "avg_fc_norm", "auto"]
POOLS = ("cls", "avg", "cls+avg", "avg_fc_norm", "auto")
Mode = Literal["lora", "full", "head"]


def is_wrapped_encoder(backbone: nn.Module) -> bool:
    """True for the group-channel / temporal wrappers (they describe themselves with ``wrapper_config``)."""
    return callable(getattr(backbone, "wrapper_config", None))


def takes_timestamps(backbone: nn.Module) -> bool:
    """True when the backbone's ``forward_features`` has a ``timestamps`` argument (the temporal wrapper)."""
    fn = getattr(backbone, "forward_features", None)
    if fn is None:
        return False
    try:
        return "timestamps" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def resolve_pool(backbone: nn.Module, pool: Pool) -> str:
    """``auto``: the mean over all non-prefix tokens (``avg``) for group-channel / temporal wrappers, as SatMAE
    fine-tunes them and as their pre-training export pools; the final-norm CLS token for plain ViTs.
    ``avg_fc_norm`` needs a plain timm ViT (its un-normalised last-block tokens come from ``forward_intermediates``)."""
    if pool == "auto":
        return "avg" if is_wrapped_encoder(backbone) else "cls"
    if pool not in POOLS:
        raise ConfigError(f"pool: got {pool!r}, expected one of {list(POOLS)}")
    if pool == "avg_fc_norm" and (is_wrapped_encoder(backbone) or not hasattr(backbone, "forward_intermediates")):
        raise ConfigError(
            f"pool 'avg_fc_norm' pools the un-normalised tokens of a plain timm ViT; {type(backbone).__name__} is "
            "not one (group-channel / temporal encoders: use pool 'avg' or 'auto')"
        )
    return pool


class ClassifierModel(nn.Module):
    """A backbone and one linear head on the final-norm CLS token, the mean patch token, or both concatenated, or
    (``avg_fc_norm``) on a LayerNorm ``fc_norm`` of the mean of the last block's patch tokens *before* the final
    norm: timm's ``global_pool='avg'`` (``fc_norm`` after the pool, the final ``norm`` unused), which MAE fine-tuning
    and the official ExPLoRA fine-tuning use. ``fc_norm`` starts fresh (weight 1, bias 0, the backbone norm's eps),
    as the checkpoint has no such tensor (MAE ``main_finetune.py``: missing keys ``fc_norm.*``).

    ``backbone`` is a timm ViT or a group-channel / temporal wrapper (uses ``forward_features``; the wrappers
    return all G*L or T*L tokens after the prefix, so ``avg`` pools over every group/frame and position), or any
    module mapping images to pooled (B, D) features (then ``pool`` is ignored and ``in_dim`` must be given).
    ``pool='auto'``: ``avg`` for wrappers, ``cls`` otherwise (:func:`resolve_pool`). ``forward(images,
    timestamps=None)``: temporal backbones need the (B, T, 3) frame timestamps; others ignore them.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        pool: Pool = "auto",
        in_dim: int | None = None,
        head_init_std: float = 2e-5,
    ):
        super().__init__()
        pool = resolve_pool(backbone, pool)
        self.backbone = backbone
        self.pool = pool
        self.is_vit = hasattr(backbone, "forward_features") and hasattr(backbone, "num_prefix_tokens")
        self.needs_timestamps = takes_timestamps(backbone)
        dim = in_dim or getattr(backbone, "num_features", None) or getattr(backbone, "embed_dim", None)
        if dim is None:
            raise ConfigError(f"cannot infer the feature size of {type(backbone).__name__}; pass in_dim")
        if self.is_vit and pool == "cls+avg":
            dim = 2 * dim
        self.fc_norm = nn.LayerNorm(dim, eps=getattr(getattr(backbone, "norm", None), "eps", 1e-6)) if (
            pool == "avg_fc_norm"
        ) else None
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)  # MAE main_finetune.py
        nn.init.zeros_(self.head.bias)

    def features(self, images: torch.Tensor, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) [+ timestamps (B, T, 3)] -> pooled (B, D) (2D for ``cls+avg``)."""
        if not self.is_vit:  # a pooling callable; like extract_features, extra inputs go positionally
            return self.backbone(images) if timestamps is None else self.backbone(images, timestamps)  # (B, D)
        if self.fc_norm is not None:  # timm global_pool='avg': blocks -> mean of the patch tokens -> fc_norm
            (patch,) = self.backbone.forward_intermediates(
                images, indices=1, norm=False, output_fmt="NLC", intermediates_only=True
            )  # [(B, N, D)]: the last block's patch tokens (prefix tokens dropped), final norm not applied
            return self.fc_norm(patch.mean(dim=1))  # (B, D)
        if self.needs_timestamps:
            if timestamps is None:
                raise DataError(
                    f"{type(self.backbone).__name__} needs frame timestamps (B, T, 3) = (year, month, hour); the "
                    "dataset gave none (expected each sample as (image, label, timestamps), e.g. fmow_temporal)"
                )
            tokens = self.backbone.forward_features(images, timestamps)  # (B, prefix + T*L, D)
        else:
            tokens = self.backbone.forward_features(images)  # (B, prefix + N, D), through the final norm
        cls = tokens[:, 0]  # (B, D)
        patch = tokens[:, self.backbone.num_prefix_tokens :].mean(dim=1)  # (B, D): every group/frame + position
        return {"cls": cls, "avg": patch, "cls+avg": torch.cat([cls, patch], dim=1)}[self.pool]

    def forward(self, images: torch.Tensor, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(images, timestamps))  # (B, K)


def lora_target(backbone: nn.Module) -> nn.Module:
    """The module whose ``blocks`` get LoRA: the backbone itself when it exposes timm ``blocks`` (timm ViTs and
    the group-channel / temporal wrappers, whose ``blocks`` are the inner ViT's), else an inner ViT attribute."""
    if hasattr(backbone, "blocks"):
        return backbone
    for name in ("vit", "encoder", "backbone", "model"):
        inner = getattr(backbone, name, None)
        if isinstance(inner, nn.Module) and hasattr(inner, "blocks"):
            return inner
    raise ConfigError(
        f"LoRA fine-tuning needs timm ViT blocks: {type(backbone).__name__} has no `blocks` and no inner ViT "
        "(`vit`/`encoder`/`backbone`/`model` with `blocks`); use --mode full or head"
    )


def prepare_classifier(
    backbone: nn.Module,
    num_classes: int,
    mode: Mode = "lora",
    pool: Pool = "auto",
    lora_rank: int | None = None,
    lora_targets: tuple[str, ...] | None = None,
    preset: str = "LoRA-r8",
    **head_kwargs: Any,
) -> ClassifierModel:
    """Freeze/unfreeze ``backbone`` for ``mode`` and add the head (always trainable).

    ``lora``: the paper's LoRA-r8 through the ``explora.models.adapt`` ``preset`` (``LoRA-r8``: rank 8 on Q,V of every
    block, alpha = rank, norms frozen; ``LoRA-r8-official``: the same with loralib alpha 1); ``lora_rank`` /
    ``lora_targets`` override the preset's. On a group-channel / temporal wrapper everything else (group
    projections, position/time encodings) stays frozen too. ``full``: every backbone parameter trains; ``head``: the
    backbone is frozen (a linear probe trained end to end). An ``avg_fc_norm`` pool's ``fc_norm`` trains in ``full``
    mode only: the official LoRA script trains LoRA and the head alone.
    """
    if mode == "lora":
        from explora.models.adapt import apply_preset

        overrides: dict[str, Any] = {}
        if lora_rank is not None:
            overrides["lora_rank"] = lora_rank
        if lora_targets is not None:
            overrides["lora_targets"] = tuple(lora_targets)
        backbone.requires_grad_(False)  # a wrapper's own embeddings, outside the ViT apply_explora freezes
        apply_preset(lora_target(backbone), preset, **overrides)
    elif mode == "full":
        backbone.requires_grad_(True)
    elif mode == "head":
        backbone.requires_grad_(False)
    else:
        raise ConfigError(f"finetune mode: got {mode!r}, expected 'lora', 'full' or 'head'")
    model = ClassifierModel(backbone, num_classes, pool=pool, **head_kwargs)
    model.head.requires_grad_(True)
    if model.fc_norm is not None:
        model.fc_norm.requires_grad_(mode == "full")
    return model


def set_linear_drop_path(backbone: nn.Module, rate: float) -> None:
    """timm's stochastic-depth rule (``VisionTransformer(drop_path_rate=rate)``, which MAE fine-tuning uses): block
    ``i`` of ``n`` drops its residual branches with probability ``rate * i / (n - 1)``; rate 0 removes drop path."""
    from timm.layers import DropPath, calculate_drop_path_rates

    blocks = lora_target(backbone).blocks
    for block, p in zip(blocks, calculate_drop_path_rates(rate, len(blocks)), strict=True):
        if not (hasattr(block, "drop_path1") and hasattr(block, "drop_path2")):
            raise ConfigError(f"drop path: {type(block).__name__} blocks have no timm drop_path1/drop_path2")
        block.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        block.drop_path2 = DropPath(p) if p > 0 else nn.Identity()


def trainable_counts(model: ClassifierModel) -> dict[str, int]:
    """Trainable parameters of the backbone (LoRA / all) and of the head (with a trained ``fc_norm``), reported
    separately as in the paper."""
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad) if m is not None else 0  # noqa: E731
    return {"backbone": count(model.backbone), "head": count(model.head) + count(model.fc_norm)}


@dataclass
class AugConfig:
    """Train-time augmentation; defaults: the ``explora`` recipe (MAE/SatMAE fine-tuning). ``rand_augment``: a timm
    RandAugment string (e.g. ``rand-m9-mstd0.5-inc1``, the official recipe's), applied per image on the uint8 crop;
    ``None`` or ``""``: off."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    rand_augment: str | None = None


def build_rand_augment(config: str, image_size: int, mean: tuple[float, ...]) -> Callable:
    """timm's ``rand_augment_transform`` with the hyper-parameters timm ``create_transform`` gives it in MAE's
    fine-tuning transform (MAE ``util/datasets.py`` build_transform, ``interpolation='bicubic'``): translate
    0.45 x the crop size, fill with the dataset mean in uint8, bicubic resampling. RandAugment's ops are PIL image
    operations, so it is defined for 3-band RGB only."""
    from timm.data.auto_augment import posterize as timm_posterize
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    if len(mean) != 3:
        raise ConfigError(
            f"RandAugment {config!r} works on RGB images (PIL operations on 3 bands); this dataset has {len(mean)} "
            "band(s). Turn it off (rand_augment none, or the 'explora' recipe) for other band counts."
        )
    hparams = {
        "translate_const": int(image_size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in mean),
        "interpolation": str_to_pil_interp("bicubic"),
    }
    try:
        transform = rand_augment_transform(config, hparams)
    except (AssertionError, KeyError, ValueError, IndexError) as err:
        raise ConfigError(f"rand_augment {config!r} is not a timm RandAugment string like 'rand-m9-mstd0.5-inc1' "
                          f"({err})") from None
    for op in transform.ops:
        if op.aug_fn is timm_posterize:
            op.aug_fn = posterize_keeping_zero_bits
    return transform


def posterize_keeping_zero_bits(img, bits_to_keep: int, **_: Any):
    """timm's posterize op, with 0 bits allowed as Pillow < 10 allowed them (a black image: no bit is kept).
    timm's increasing-severity RandAugment (``inc1``) asks for 0 bits at magnitude 10, which ``mstd0.5`` reaches
    (~2% of draws at m9); Pillow >= 10 raises there instead, which would stop training."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every channel 0
    return ImageOps.posterize(img, bits_to_keep)


@contextlib.contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's and NumPy's global generators (timm's RandAugment draws from them) for one call, then restore
    them, so the draws are a function of ``seed`` and the caller's own random state is left as it was."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def rand_augment_images(images: torch.Tensor, op: Callable, seeds: list[int]) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> (B, 3, S, S) uint8: ``op`` (a PIL transform) on each image, image ``i`` with its
    global random generators seeded by ``seeds[i]``."""
    from PIL import Image

    out = []
    for img, seed in zip(images, seeds, strict=True):
        with _seeded_global_rngs(seed):
            pil = op(Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()))  # (S, S, 3)
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1))  # (3, S, S)
    return torch.stack(out)


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    attempts: int = 10,
) -> torch.Tensor:
    """(n, 4) boxes ``x1, y1, x2, y2`` in pixels (``roi_align``'s layout), drawn as torchvision
    ``RandomResizedCrop.get_params`` does by the data layer's batched sampler."""
    top, left, h, w = random_resized_crop_boxes(n, height, width, scale, ratio, generator, attempts).unbind(1)
    return torch.stack([left, top, left + w, top + h], dim=1)


class FinetuneTransform:
    """Picklable batch transform: batched RandomResizedCrop (``roi_align``: bilinear, averaged over each output
    bin) + horizontal flip + RandAugment (when ``aug.rand_augment`` is set: per image, on the crop rounded to uint8,
    as timm's transform sits between flip and ToTensor) + per-band normalisation + mixup/cutmix against the batch
    reversed (timm ``Mixup``, mode 'batch'). Labels are not visible here (the engine adds them), so it returns the
    per-sample mixing weight ``mix_lam`` (1 = unmixed) and the objective mixes the targets with ``labels.flip(0)``.

    Temporal batches are (B, T*C, H, W) with ``timestamps`` (B, T, 3): the crop box and flip are drawn per sample
    and applied to all its channels, so every frame of a sample gets the same crop/flip; the timestamps are
    returned unchanged. Mixup/cutmix act on the pixels only (timm ``Mixup`` knows no timestamps), so a mixed
    sample keeps its own frames' timestamps."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], aug: AugConfig):
        self.image_size, self.mean, self.std, self.aug = int(image_size), tuple(mean), tuple(std), aug
        self._rand_augment = build_rand_augment(aug.rand_augment, self.image_size, self.mean) if (
            aug.rand_augment
        ) else None

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator,
        timestamps: torch.Tensor | None = None,
        **extras: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        require_unit_range(images, "fine-tuning augmentation")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()  # (B, C, H, W) in [0, 1]
        b, c, h, w = x.shape
        if timestamps is not None and (timestamps.ndim != 3 or timestamps.shape[0] != b or timestamps.shape[2] != 3):
            raise DataError(f"timestamps must be (B, T, 3) = ({b}, T, 3), got {tuple(timestamps.shape)}")
        if c != len(self.mean):
            raise DataError(f"images have {c} bands but the dataset statistics have {len(self.mean)}")
        a = self.aug
        boxes = sample_crop_boxes(b, h, w, a.scale, a.ratio, generator)  # (B, 4)
        rois = torch.cat([torch.arange(b, dtype=x.dtype)[:, None], boxes.to(x.dtype)], dim=1)  # (B, 5)
        x = roi_align(x, rois, (self.image_size, self.image_size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
        flip = torch.rand(b, generator=generator) < a.hflip  # (B,)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self._rand_augment is not None:
            seeds = torch.randint(0, 2**31 - 1, (b,), generator=generator).tolist()
            crops = (x * 255).round().clamp(0, 255).to(torch.uint8)  # (B, 3, S, S)
            x = rand_augment_images(crops, self._rand_augment, seeds).float() / 255.0
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std  # (B, C, S, S)
        x, lam = self._mix(x, generator)
        out = {"images": x.contiguous(), "mix_lam": torch.full((b,), lam)}
        if timestamps is not None:
            out["timestamps"] = timestamps  # (B, T, 3), the same frames in the same order
        return out | {k: v for k, v in extras.items() if k not in out}

    def _mix(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, float]:
        a = self.aug
        u = torch.rand(4, generator=generator).tolist()
        if (a.mixup_alpha <= 0 and a.cutmix_alpha <= 0) or u[0] >= a.mix_prob or x.shape[0] < 2:
            return x, 1.0
        use_cutmix = a.cutmix_alpha > 0 and (a.mixup_alpha <= 0 or u[1] < a.switch_prob)
        # torch has no generator-driven Beta sampler: derive a numpy generator from the torch one (still (seed, step)).
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        lam = float(rng.beta(a.cutmix_alpha, a.cutmix_alpha) if use_cutmix else rng.beta(a.mixup_alpha, a.mixup_alpha))
        other = x.flip(0)
        if not use_cutmix:
            return lam * x + (1 - lam) * other, lam
        s = x.shape[-1]
        cut = int(s * math.sqrt(1 - lam))
        cy, cx = int(u[2] * s), int(u[3] * s)
        y0, y1 = max(cy - cut // 2, 0), min(cy + cut // 2, s)
        x0, x1 = max(cx - cut // 2, 0), min(cx + cut // 2, s)
        x = x.clone()
        x[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        return x, 1.0 - (y1 - y0) * (x1 - x0) / (s * s)  # lam corrected to the pasted area (timm correct_lam)


def mixed_targets(labels: torch.Tensor, lam: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B, K) soft targets: smoothed one-hot of ``labels`` mixed with ``labels.flip(0)`` (timm ``mixup_target``)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(1, labels[:, None], on)
    y2 = y1.flip(0)
    lam = lam.to(y1.dtype)[:, None]  # (B, 1)
    return lam * y1 + (1 - lam) * y2


class FinetuneObjective(Objective):
    """Cross-entropy (label-smoothed, on mixup/cutmix soft targets) of a :class:`ClassifierModel`."""

    name = "finetune"

    def __init__(
        self,
        model: ClassifierModel,
        num_classes: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        aug: AugConfig | None = None,
    ):
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.aug = aug or AugConfig()
        if self.aug.rand_augment:  # a bad string or a non-RGB dataset fails here, not in a data-loader worker
            build_rand_augment(self.aug.rand_augment, image_size, self.mean)

    def batch_transform(self) -> BatchTransform:
        return FinetuneTransform(self.image_size, self.mean, self.std, self.aug)

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> ObjectiveOutput:  # type: ignore[override]
        labels = batch["labels"]
        if (labels < 0).any():
            raise DataError("fine-tuning got unlabeled samples (label -1); use a labeled split")
        logits = self.model(batch["images"], timestamps=batch.get("timestamps"))  # (B, K)
        lam = batch.get("mix_lam", torch.ones(labels.shape[0], device=labels.device))
        targets = mixed_targets(labels, lam, self.num_classes, self.aug.label_smoothing)  # (B, K)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        top1 = (logits.argmax(1) == labels).float().mean() * 100
        return ObjectiveOutput(loss, {"ce": loss.detach(), "top1": top1.detach()})

    def export_backbone(self) -> nn.Module:
        return self.model.backbone


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset,
    transform: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) logits and (N,) labels of ``dataset`` under the eval transform, model in eval mode.

    A sample's third element (frame timestamps (T, 3), or a dict holding ``timestamps``) is passed to the model
    as ``timestamps=``."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    logits, labels = [], []
    try:
        for batch in loader:
            images, y = batch[0], batch[1]
            x = transform(images.to(device))  # (B, C, S, S)
            ts = _batch_timestamps(batch)
            out = model(x) if ts is None else model(x, timestamps=ts.to(device))  # (B, K)
            logits.append(out.float().cpu())
            labels.append(torch.as_tensor(y).long())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def _batch_timestamps(batch: list | tuple) -> torch.Tensor | None:
    """The (B, T, 3) timestamps of a default-collated batch: its third element, bare or under ``timestamps``."""
    if len(batch) < 3:
        return None
    extra = batch[2]
    return extra.get("timestamps") if isinstance(extra, dict) else extra


def evaluate(
    model: nn.Module,
    dataset,
    batch_size: int = 256,
    *,
    image_size: int | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Top-1/top-5, per-class accuracy and confusion matrix of a classifier on ``dataset`` (eval transform:
    resize + centre crop to ``image_size`` with the dataset's ``mean``/``std`` unless ``transform`` is given)."""
    if transform is None:
        if image_size is None:
            raise ConfigError("evaluate needs image_size or an explicit transform")
        transform = eval_transform_for(dataset, image_size)
    logits, labels = predict(model, dataset, transform, batch_size, device)
    return classification_metrics(
        logits, labels, num_classes or getattr(dataset, "num_classes", None) or logits.shape[1]
    )


@dataclass(frozen=True)
class FinetuneRecipe:
    """Every setting of one named fine-tuning recipe; :meth:`optim_config`, :meth:`train_config` and
    :meth:`aug_config` build the engine's configs with explicit overrides winning (``None`` = keep the recipe's).

    Exactly one of ``steps``/``epochs`` gives the length and one of ``optim["warmup_steps"]``/``["warmup_epochs"]``
    the warm-up; an explicit override of one replaces the recipe's other. ``effective_batch`` (``None``: batch x
    world size) sets gradient accumulation; the lr scales with it (``optim["lr_scaling"]``).
    """

    name: str
    preset: str  # explora.models.adapt preset for mode 'lora'
    pool: Pool
    drop_path: float | None  # timm's linear rule over the blocks (set_linear_drop_path); None: leave the backbone's
    batch_size: int  # per device
    effective_batch: int | None
    steps: int | None
    epochs: float | None
    optim: dict[str, Any]  # OptimConfig fields
    aug: AugConfig

    def optim_config(self, **overrides: Any):
        """The recipe's :class:`~explora.engine.trainer.OptimConfig` with the non-``None`` ``overrides``."""
        from explora.engine.trainer import OptimConfig

        return OptimConfig(**_override(self.optim, overrides, ("warmup_steps", "warmup_epochs")))

    def train_config(self, **overrides: Any):
        """The recipe's :class:`~explora.engine.trainer.TrainConfig` (length, batch, effective batch) with the
        non-``None`` ``overrides`` (any TrainConfig field)."""
        from explora.engine.trainer import TrainConfig

        own = {"batch_size": self.batch_size, "effective_batch": self.effective_batch, "steps": self.steps,
               "epochs": self.epochs}
        return TrainConfig(**_override({k: v for k, v in own.items() if v is not None}, overrides, ("steps", "epochs")))

    def aug_config(self, **overrides: Any) -> AugConfig:
        """The recipe's :class:`AugConfig` with the non-``None`` ``overrides``."""
        return dataclasses.replace(self.aug, **{k: v for k, v in overrides.items() if v is not None})


def _override(own: dict[str, Any], overrides: dict[str, Any], exclusive: tuple[str, str]) -> dict[str, Any]:
    """``own`` updated with the non-``None`` ``overrides``; an override of one ``exclusive`` key drops the other
    from ``own`` (an explicit ``steps`` replaces the recipe's ``epochs``), both given are left to the engine's check."""
    given = {k: v for k, v in overrides.items() if v is not None}
    out = dict(own)
    a, b = exclusive
    if (a in given) != (b in given):
        out.pop(b if a in given else a, None)
    return out | given


# One definition per recipe; docs/evaluation.md lays them side by side.
FINETUNE_RECIPES: dict[str, FinetuneRecipe] = {
    # explora's own (MAE main_finetune.py / SatMAE README values), chosen while the official recipe was not public.
    "explora": FinetuneRecipe(
        name="explora",
        preset="LoRA-r8",  # rank 8 on Q,V of every block, alpha = rank (scaling 1), norms frozen
        pool="auto",  # the final-norm CLS token (mean of all tokens for group-channel / temporal encoders)
        drop_path=None,  # the backbone as built (0 for every registry backbone)
        batch_size=256,
        effective_batch=None,
        steps=1000,
        epochs=None,
        optim=dict(
            base_lr=1e-3,  # MAE main_finetune.py blr, per 256 images
            lr_scaling="linear",
            reference_batch=256,
            min_lr=1e-6,  # MAE main_finetune.py
            warmup_steps=0,
            weight_decay=0.05,  # MAE main_finetune.py, constant
            weight_decay_end=0.05,
            betas=(0.9, 0.999),  # torch AdamW defaults, as MAE main_finetune.py
            layer_decay=0.75,  # MAE main_finetune.py layer_decay
            patch_embed_lr_mult=1.0,
            clip_grad=0.0,
            freeze_last_layer_steps=0,  # a classifier has no DINO last layer
        ),
        aug=AugConfig(),  # RandomResizedCrop (0.08, 1) + flip, mixup 0.8 / cutmix 1.0, label smoothing 0.1
    ),
    # The official ExPLoRA scripts/finetune.sh + finetune/finetune.py (paper-notes §9).
    "official": FinetuneRecipe(
        name="official",
        preset="LoRA-r8-official",  # LoRA r8 on Q,V of every block, loralib alpha 1 (scaling 1/8); + head only
        pool="avg_fc_norm",  # global average pool of the patch tokens + fc_norm (frozen, see ClassifierModel)
        drop_path=0.2,  # finetune.sh drop path 0.2, timm's linear rule
        batch_size=32,  # finetune.sh: 32 per GPU
        effective_batch=128,  # 32 per GPU x 2 GPUs x accumulation 2
        steps=None,
        epochs=120,  # finetune.sh: 120 epochs
        optim=dict(
            base_lr=1e-3,  # finetune.sh blr 1e-3: lr = blr x 128 / 256 = 5e-4
            lr_scaling="linear",
            reference_batch=256,
            min_lr=1e-6,  # finetune.sh min lr
            warmup_epochs=5,  # finetune.sh warm-up 5 epochs
            weight_decay=0.0,  # finetune.sh weight decay 0
            weight_decay_end=0.0,
            betas=(0.9, 0.999),  # torch AdamW defaults (finetune.py follows MAE main_finetune.py)
            layer_decay=1.0,  # finetune.sh layer decay 1.0: one lr for every block
            patch_embed_lr_mult=1.0,
            clip_grad=0.0,  # finetune.sh: no gradient clipping
            freeze_last_layer_steps=0,
        ),
        aug=AugConfig(
            scale=(0.08, 1.0),  # timm create_transform RandomResizedCrop defaults (MAE build_transform)
            ratio=(3 / 4, 4 / 3),
            hflip=0.5,
            mixup_alpha=0.0,  # finetune.sh: no mixup
            cutmix_alpha=0.0,  # finetune.sh: no cutmix
            label_smoothing=0.1,  # finetune.sh smoothing 0.1
            rand_augment="rand-m9-mstd0.5-inc1",  # finetune.sh aa; random erasing 0 (not implemented here)
        ),
    ),
}


def finetune_recipe(recipe: str | FinetuneRecipe) -> FinetuneRecipe:
    """A recipe by name (unknown names list the known ones), or the recipe itself."""
    if isinstance(recipe, FinetuneRecipe):
        return recipe
    if recipe not in FINETUNE_RECIPES:
        raise ConfigError(f"unknown fine-tuning recipe {recipe!r}; known recipes: {sorted(FINETUNE_RECIPES)}")
    return FINETUNE_RECIPES[recipe]


def finetune_optim_defaults():
    """Engine optimiser settings of the ``explora`` recipe (MAE ``main_finetune.py`` / SatMAE values)."""
    return FINETUNE_RECIPES["explora"].optim_config()


def _save_best(model: nn.Module, out_dir: Path, metrics: dict[str, Any], step: int) -> None:
    """The best classifier so far (LoRA merged, plain keys) as safetensors, written atomically, plus its metrics."""
    import io
    import json

    from safetensors.torch import save as save_safetensors

    from explora.core.io import atomic_write_bytes
    from explora.vit.lora import merged_state_dict

    state = {k: v.detach().cpu().contiguous() for k, v in merged_state_dict(model).items()}
    atomic_write_bytes(out_dir / "best" / "model.safetensors", save_safetensors(state))
    summary = {k: v for k, v in metrics.items() if k in ("top1", "top5")} | {"step": step}
    buf = io.StringIO()
    json.dump(summary, buf, indent=2)
    atomic_write_bytes(out_dir / "best" / "metrics.json", buf.getvalue().encode())


def _backbone_kind(backbone: nn.Module) -> str:
    """``vit`` for a plain ViT, else the wrapper's kind (``group_channel`` / ``temporal``) for metrics.json."""
    return str(backbone.wrapper_config().get("kind", "wrapped")) if is_wrapped_encoder(backbone) else "vit"


def run_finetune(
    backbone: nn.Module,
    train_set,
    val_set,
    out_dir: str | Path,
    *,
    image_size: int,
    recipe: str | FinetuneRecipe = "explora",
    mode: Mode = "lora",
    pool: Pool | None = None,
    lora_rank: int | None = None,
    drop_path: float | None = None,
    aug: AugConfig | None = None,
    optim=None,
    train_cfg=None,
    eval_batch_size: int = 256,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune with the engine's loop, evaluating on ``val_set`` every epoch.

    ``recipe`` (:data:`FINETUNE_RECIPES` name or a :class:`FinetuneRecipe`) supplies every argument left ``None``:
    the LoRA preset and rank, ``pool``, ``drop_path``, ``aug``, ``optim`` (OptimConfig) and ``train_cfg``
    (TrainConfig); a given argument replaces that part whole.

    ``backbone`` may be a timm ViT or a group-channel / temporal wrapper (e.g. ``explora.models.export.load_encoder`` of
    a wrapped MAE export); temporal datasets' timestamps reach the model in training and evaluation.
    ``train_cfg.eval_every`` defaults to one pass over ``train_set``. The best model by validation top-1 is kept in
    ``<out>/best/``; ``metrics.json`` and the confusion matrix describe the final model, ``eval_history.json`` every
    evaluation. ``resume`` continues a killed run from its newest intact checkpoint.
    """
    import json
    from dataclasses import replace

    from explora.engine import parallel as D
    from explora.engine.lengths import resolve_lengths, run_length
    from explora.engine.trainer import train

    out_dir = Path(out_dir)
    num_classes = int(getattr(train_set, "num_classes", 0) or 0)
    if num_classes < 2:
        raise DataError(f"train dataset {type(train_set).__name__} has num_classes={num_classes}; expected >= 2")
    chosen = finetune_recipe(recipe)
    rate = chosen.drop_path if drop_path is None else drop_path
    if rate is not None:
        set_linear_drop_path(backbone, rate)
    model = prepare_classifier(
        backbone, num_classes, mode=mode, pool=pool or chosen.pool, lora_rank=lora_rank, preset=chosen.preset
    )
    model.train()  # exports load in eval mode; the engine trains what it is given
    objective = FinetuneObjective(
        model, num_classes, image_size, train_set.mean, train_set.std, aug or chosen.aug_config()
    )
    transform = EvalTransform(image_size, tuple(val_set.mean), tuple(val_set.std))
    device = next(model.parameters()).device
    cfg = train_cfg or chosen.train_config()
    D.init_distributed()  # the world size below is torchrun's (a no-op in one process or when already set up)
    optim, cfg = resolve_lengths(optim or chosen.optim_config(), cfg, len(train_set), D.world_size())
    if not cfg.eval_every:  # one epoch of optimiser steps, at the effective batch (accumulation included)
        epoch = run_length(cfg, optim, len(train_set), D.world_size()).epoch_steps
        cfg = replace(cfg, eval_every=max(1, int(epoch)))
    history_path = out_dir / "eval_history.json"
    history: list[dict[str, Any]] = []
    if resume and history_path.is_file():
        history = json.loads(history_path.read_text())

    def eval_fn(obj: Objective, step: int) -> dict[str, Any]:
        m = evaluate(
            obj.model,
            val_set,
            eval_batch_size,
            transform=transform,
            num_classes=num_classes,
            device=next(obj.parameters()).device,
        )
        if D.is_main():
            history[:] = [h for h in history if h["step"] < step]
            best = max((h["top1"] for h in history), default=-1.0)
            history.append({"step": step, "top1": m["top1"], "top5": m["top5"]})
            out_dir.mkdir(parents=True, exist_ok=True)
            history_path.write_text(json.dumps(history, indent=2))
            if m["top1"] > best:
                _save_best(obj.model, out_dir, m, step)
        return m

    result = train(objective, train_set, optim, cfg, out_dir, eval_fn=eval_fn, resume=resume)
    metrics = dict(result.eval_metrics or eval_fn(objective, result.steps_done))
    best = max(history, key=lambda h: h["top1"]) if history else None
    metrics.update(
        protocol=f"finetune-{mode}",
        recipe=chosen.name,
        mode=mode,
        pool=model.pool,
        backbone_kind=_backbone_kind(backbone),
        steps=result.steps_done,
        trainable=trainable_counts(model),
        device=str(device),
        best_top1=best["top1"] if best else metrics["top1"],
        best_step=best["step"] if best else result.steps_done,
    )
    save_metrics(metrics, out_dir)
    return metrics
