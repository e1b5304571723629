"""Segmentation heads: block choice per depth, output shapes for every head, non-RGB/group-channel encoders."""

from __future__ import annotations

import pytest
import torch

from explora.core.errors import ConfigError
from explora.models.backbone import build_backbone
from explora.models.seg_heads import SegmentationModel, default_blocks, token_maps


def test_default_blocks_follow_pangaea():
    assert default_blocks(12, "upernet") == (3, 5, 7, 11)
    assert default_blocks(24, "upernet") == (7, 11, 15, 23)
    assert default_blocks(4, "upernet") == (0, 1, 2, 3)
    assert default_blocks(12, "linear") == (11,)
    with pytest.raises(ConfigError, match="4 distinct blocks"):
        default_blocks(2, "upernet")
    with pytest.raises(ConfigError, match="expected one of"):
        default_blocks(12, "fcn")


@pytest.mark.parametrize("head", ["linear", "upernet"])
def test_logits_at_input_size(tiny_dinov2, head):
    model = SegmentationModel(tiny_dinov2, 3, head=head).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3, 32, 32)
    out = model(torch.randn(1, 3, 48, 40))  # any size the patch grid tiles
    assert out.shape == (1, 3, 48, 40)


def test_token_maps_are_the_intermediate_blocks(tiny_dinov2):
    x = torch.randn(1, 3, 32, 32)
    maps = token_maps(tiny_dinov2, x, (1, 3))
    ref = tiny_dinov2.forward_intermediates(x, indices=[1, 3], norm=True, output_fmt="NCHW", intermediates_only=True)
    for m, r in zip(maps, ref, strict=True):
        assert m.shape == (1, 64, 4, 4)
        torch.testing.assert_close(m, r)


def test_bad_blocks_are_refused(tiny_dinov2):
    with pytest.raises(ConfigError, match="increasing indices in 0..3"):
        SegmentationModel(tiny_dinov2, 2, blocks=(1, 7))
    with pytest.raises(ConfigError, match="upernet reads 4 blocks"):
        SegmentationModel(tiny_dinov2, 2, head="upernet", blocks=(1, 3))


def test_group_channel_encoder_maps_average_the_groups(tiny_mae):
    from explora.models.group_channel import GroupChannelViT

    vit = GroupChannelViT(tiny_mae, groups=((0, 1, 2), (3, 4, 5)), group_dim=16)
    seg = SegmentationModel(vit, 2, head="upernet").eval()
    assert seg(torch.randn(1, 6, 32, 32)).shape == (1, 2, 32, 32)


def test_temporal_encoder_maps_average_the_frames(tiny_mae):
    from explora.models.temporal import TemporalViT

    vit = TemporalViT(tiny_mae, num_frames=3, time_dim=16)
    seg = SegmentationModel(vit, 2, head="linear").eval()
    ts = torch.tensor([[[2016, 5, 10], [2017, 6, 11], [2018, 7, 12]]]).float()
    assert seg(torch.randn(1, 9, 32, 32), timestamps=ts).shape == (1, 2, 32, 32)


@pytest.mark.parametrize("head", ["linear", "upernet"])
def test_dinov3_encoder_under_a_segmentation_head(head):
    """Eva (cls + 4 registers, RoPE): the maps leave out every prefix token and follow the 16-px patch grid."""
    backbone = build_backbone("test_dinov3").eval()
    model = SegmentationModel(backbone, 3, head=head).eval()
    assert model(torch.randn(2, 3, 64, 48)).shape == (2, 3, 64, 48)
    maps = token_maps(backbone, torch.randn(1, 3, 64, 48), (0,))
    assert maps[0].shape == (1, backbone.embed_dim, 4, 3)
