"""Semantic segmentation as an engine objective: per-pixel cross-entropy with an ignore index, optional class
weights and an optional soft Dice term, on paired-augmented image/mask batches.

The loss is mmsegmentation's ``CrossEntropyLoss`` (mean over non-ignored pixels; with class weights the weighted
mean, as ``torch.nn.functional.cross_entropy``) plus ``dice_weight`` x the soft Dice loss of Milletari et al.
(2016, V-Net) averaged over classes, with ignored pixels left out of both. The batch transform
(:class:`SegTransform`) runs in data-loader workers: :func:`explora.data.dense_augment.augment_pair` from the
step's generator, then per-band normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from explora.core.errors import ConfigError, DataError
from explora.data.dense import IGNORE_INDEX
from explora.data.dense_augment import DenseAugConfig, augment_pair
from explora.data.windowing import require_unit_range
from explora.models.seg_heads import SegmentationModel
from explora.objectives.base import BatchTransform, Objective, ObjectiveOutput


@dataclass
class SegLossConfig:
    """``class_weights``: one weight per class (None: equal); ``dice_weight``: weight of the Dice term (0: off)."""

    class_weights: tuple[float, ...] | None = None
    dice_weight: float = 0.0
    ignore_index: int = IGNORE_INDEX


@dataclass
class SegmentationSettings:
    """The objective's settings (``Objective.config``)."""

    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    aug: DenseAugConfig = field(default_factory=DenseAugConfig)
    loss: SegLossConfig = field(default_factory=SegLossConfig)


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(B, C, H, W) uint8 or [0, 1] float -> float32 normalised per band."""
    require_unit_range(images, "segmentation input")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] != len(mean):
        raise DataError(f"images have {x.shape[1]} bands but the dataset statistics have {len(mean)}")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class SegTransform:
    """Picklable batch transform: paired random resized crop / flips / rot90 to ``image_size``, then normalisation."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], aug: DenseAugConfig):
        self.image_size, self.mean, self.std, self.aug = int(image_size), tuple(mean), tuple(std), aug

    def __call__(self, images: torch.Tensor, generator: torch.Generator, masks: torch.Tensor | None = None,
                 **extras: torch.Tensor) -> dict[str, torch.Tensor]:
        if masks is None:
            raise DataError("segmentation needs (image, mask) samples; the dataset yields image labels (use a dense "
                            "spec: seg_folder:, seg_csv:, spacenet:)")
        require_unit_range(images, "segmentation augmentation")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x, m = augment_pair(x, masks.long(), self.image_size, self.aug, generator)
        return {"images": normalise(x, self.mean, self.std), "masks": m} | {
            k: v for k, v in extras.items() if k not in ("images", "masks")}


def dice_loss(logits: torch.Tensor, masks: torch.Tensor, ignore_index: int = IGNORE_INDEX,
              smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss, mean over classes: ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` on non-ignored pixels."""
    k = logits.shape[1]
    valid = (masks != ignore_index)[:, None]  # (B, 1, H, W)
    probs = logits.float().softmax(1) * valid
    target = F.one_hot(masks.clamp(0, k - 1) * valid[:, 0], k).permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    inter = (probs * target).sum(dims)
    return (1 - (2 * inter + smooth) / (probs.sum(dims) + target.sum(dims) + smooth)).mean()


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, loss: SegLossConfig) -> dict[str, torch.Tensor]:
    """``{"loss", "ce", ("dice")}`` of logits (B, K, H, W) against masks (B, H, W)."""
    weight = None
    if loss.class_weights is not None:
        if len(loss.class_weights) != logits.shape[1]:
            raise ConfigError(f"class_weights has {len(loss.class_weights)} values; expected one per class "
                              f"({logits.shape[1]})")
        weight = torch.tensor(loss.class_weights, dtype=torch.float32, device=logits.device)
    if not (masks != loss.ignore_index).any():
        ce = logits.sum() * 0.0  # a batch of ignored pixels only: no signal, but a graph for the engine
    else:
        ce = F.cross_entropy(logits.float(), masks, weight=weight, ignore_index=loss.ignore_index)
    out = {"ce": ce}
    total = ce
    if loss.dice_weight > 0:
        out["dice"] = dice_loss(logits, masks, loss.ignore_index)
        total = total + loss.dice_weight * out["dice"]
    return {"loss": total, **out}


class SegmentationObjective(Objective):
    """Per-pixel loss of a :class:`~explora.models.seg_heads.SegmentationModel`."""

    name = "segment"

    def __init__(self, model: SegmentationModel, settings: SegmentationSettings) -> None:
        super().__init__()
        self.model = model
        self.config = settings
        if settings.loss.class_weights is not None and len(settings.loss.class_weights) != settings.num_classes:
            raise ConfigError(f"class_weights has {len(settings.loss.class_weights)} values; expected "
                              f"{settings.num_classes} (one per class)")

    def batch_transform(self) -> BatchTransform:
        c = self.config
        return SegTransform(c.image_size, c.mean, c.std, c.aug)

    def forward(self, batch: dict[str, torch.Tensor], step: int,  # type: ignore[override]
                stage: int | None = None) -> ObjectiveOutput:
        masks = batch["masks"]
        logits = self.model(batch["images"], timestamps=batch.get("timestamps"))  # (B, K, H, W)
        terms = segmentation_loss(logits, masks, self.config.loss)
        valid = masks != self.config.loss.ignore_index
        acc = ((logits.argmax(1) == masks) & valid).sum() * 100.0 / valid.sum().clamp(min=1)
        loss = terms.pop("loss")
        return ObjectiveOutput(loss, {k: v.detach() for k, v in terms.items()} | {"pixel_acc": acc.detach()})

    def export_backbone(self) -> nn.Module:
        return self.model.backbone


__all__ = ["SegLossConfig", "SegTransform", "SegmentationObjective", "SegmentationSettings", "dice_loss",
           "normalise", "segmentation_loss"]
