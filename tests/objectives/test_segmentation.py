"""The segmentation objective: loss with ignore index / class weights / Dice, gradients per mode, the transform."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from tolerances import FP32_ONE_OP

from explora.core.errors import ConfigError, DataError
from explora.data.dense_augment import DenseAugConfig
from explora.objectives.segmentation import (
    SegLossConfig,
    SegmentationObjective,
    SegmentationSettings,
    SegTransform,
    dice_loss,
    segmentation_loss,
)
from explora.recipes.segment import prepare_segmenter


def test_ignored_pixels_do_not_count():
    logits = torch.randn(1, 3, 4, 4)
    masks = torch.randint(0, 3, (1, 4, 4))
    masks_ign = masks.clone()
    masks_ign[0, :2] = 255
    got = segmentation_loss(logits, masks_ign, SegLossConfig())["ce"]
    ref = F.cross_entropy(logits[..., 2:, :], masks[..., 2:, :])
    torch.testing.assert_close(got, ref, **FP32_ONE_OP)


def test_class_weights_and_dice():
    logits = torch.randn(2, 2, 4, 4)
    masks = torch.randint(0, 2, (2, 4, 4))
    w = segmentation_loss(logits, masks, SegLossConfig(class_weights=(1.0, 3.0)))["ce"]
    torch.testing.assert_close(w, F.cross_entropy(logits, masks, weight=torch.tensor([1.0, 3.0])), **FP32_ONE_OP)
    perfect = F.one_hot(masks, 2).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, masks) < 1e-3 < dice_loss(-perfect, masks)
    out = segmentation_loss(logits, masks, SegLossConfig(dice_weight=0.5))
    torch.testing.assert_close(out["loss"], out["ce"] + 0.5 * out["dice"])
    with pytest.raises(ConfigError, match="one per class"):
        segmentation_loss(logits, masks, SegLossConfig(class_weights=(1.0,)))


@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
def test_gradients_only_where_the_mode_trains(tiny_dinov2, mode):
    model = prepare_segmenter(tiny_dinov2, 3, mode=mode, head="upernet")
    settings = SegmentationSettings(3, 32, (0.5,) * 3, (0.25,) * 3)
    obj = SegmentationObjective(model, settings)
    batch = {"images": torch.randn(2, 3, 32, 32), "masks": torch.randint(0, 3, (2, 32, 32))}
    obj(batch, 0).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    backbone = {n for n in with_grad if n.startswith("backbone.")}
    assert any(n.startswith("head.") for n in with_grad)
    if mode == "frozen":
        assert backbone == set()
    elif mode == "lora":
        assert backbone and all("lora_" in n for n in backbone)
        assert {f"backbone.blocks.{i}.attn.qkv.lora_B" for i in range(4)} <= backbone  # lora_A: 0 grad at B = 0
        trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")}
        assert trainable == {f"backbone.blocks.{i}.attn.qkv.lora_{ab}" for i in range(4) for ab in "AB"}
    else:
        assert "backbone.patch_embed.proj.weight" in backbone and "backbone.blocks.0.mlp.fc1.weight" in backbone


def test_transform_pairs_masks_is_picklable_and_seeded():
    t = pickle.loads(pickle.dumps(SegTransform(16, (0.5,) * 3, (0.5,) * 3, DenseAugConfig())))
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    masks = torch.randint(0, 2, (2, 24, 24))
    a = t(images, torch.Generator().manual_seed(1), masks=masks)
    b = t(images, torch.Generator().manual_seed(1), masks=masks)
    assert a["images"].shape == (2, 3, 16, 16) and a["masks"].shape == (2, 16, 16)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["masks"], b["masks"])
    with pytest.raises(DataError, match="needs \\(image, mask\\) samples"):
        t(images, torch.Generator())
