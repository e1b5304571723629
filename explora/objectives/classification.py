"""Supervised classification as an engine objective: label-smoothed cross-entropy on mixup/cutmix soft targets,
and the worker-side batch transform that draws the crops, flips, RandAugment and mixing.

The settings follow MAE ``main_finetune.py`` / timm (``Mixup``, ``rand_augment_transform``); the two named
fine-tuning recipes that choose them are in :mod:`explora.recipes.finetune`.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data.auto_augment import posterize as timm_posterize
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import str_to_pil_interp
from torch import nn

from explora.core.errors import ConfigError, DataError
from explora.data.multicrop import crop_resize, random_resized_crop_boxes
from explora.data.windowing import require_unit_range
from explora.models.classifier import ClassifierModel
from explora.objectives.base import BatchTransform, Objective, ObjectiveOutput


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
    out = []
    for img, seed in zip(images, seeds, strict=True):
        with _seeded_global_rngs(seed):
            pil = op(Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()))  # (S, S, 3)
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1))  # (3, S, S)
    return torch.stack(out)


class FinetuneTransform:
    """Picklable batch transform: batched RandomResizedCrop (the data layer's antialiased bicubic ``crop_resize``, as
    MAE's fine-tuning transform resizes) + horizontal flip + RandAugment (when ``aug.rand_augment`` is set: per
    image, on the crop rounded to uint8, as timm's transform sits between flip and ToTensor) + per-band
    normalisation + mixup/cutmix against the batch reversed (timm ``Mixup``, mode 'batch'). Labels are not visible
    here (the engine adds them), so it returns the per-sample mixing weight ``mix_lam`` (1 = unmixed) and the
    objective mixes the targets with ``labels.flip(0)``.

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
        boxes = random_resized_crop_boxes(b, h, w, a.scale, a.ratio, generator)  # (B, 4) top, left, h, w
        flip = torch.rand(b, generator=generator) < a.hflip  # (B,)
        x = crop_resize(x, boxes, flip, self.image_size, "bicubic")  # (B, C, S, S), MAE's bicubic RandomResizedCrop
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


__all__ = ["AugConfig", "FinetuneObjective", "FinetuneTransform", "build_rand_augment", "mixed_targets",
           "posterize_keeping_zero_bits", "rand_augment_images"]
