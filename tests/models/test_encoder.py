"""Every registered encoder kind honours the Encoder contract; unknown modules are refused by name."""

from __future__ import annotations

import pytest
import torch
from tolerances import FP32_NETWORK
from torch import nn

from explora.core.errors import ConfigError
from explora.models.backbone import build_backbone
from explora.models.encoder import (
    ENCODERS,
    Encoder,
    TimmViTEncoder,
    as_encoder,
    encoder_kind,
    is_encoder,
    rebuild_encoder,
)
from explora.models.group_channel import GroupChannelViT
from explora.models.temporal import TemporalViT

B, D, L = 2, 64, 16  # tiny test_* backbones: width 64, 32-px input, patch 8 -> a 4x4 grid


def _vit():
    return build_backbone("test_dinov2").eval(), torch.randn(B, 3, 32, 32), None, 1  # (module, x, ts, slices)


def _eva():  # DINOv3 layout (cls + 4 registers, RoPE); patch 8 here for the shared 4x4 grid
    return build_backbone("test_dinov3", patch_size=8).eval(), torch.randn(B, 3, 32, 32), None, 1


def _group_channel():
    enc = GroupChannelViT(build_backbone("test_mae"), groups=((0, 1), (2, 3, 4)), group_dim=16).eval()
    return enc, torch.randn(B, 5, 32, 32), None, 2


def _temporal():
    enc = TemporalViT(build_backbone("test_mae"), num_frames=2, time_dim=8).eval()
    ts = torch.tensor([[[2016, 1, 10], [2017, 6, 12]]] * B)
    return enc, torch.randn(B, 6, 32, 32), ts, 2


KINDS = {"vit": _vit, "eva": _eva, "group_channel": _group_channel, "temporal": _temporal}


def test_every_registered_type_has_a_contract_case() -> None:
    assert {as_encoder(make()[0]).kind for make in KINDS.values()} == set(KINDS)
    assert len(ENCODERS) == len(KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_encoder_contract(kind: str) -> None:
    module, x, ts, slices = KINDS[kind]()
    enc = as_encoder(module)
    assert isinstance(enc, Encoder) and enc.kind == kind == encoder_kind(module) and is_encoder(module)
    assert enc.needs_timestamps == (ts is not None) and enc.default_pool in enc.pools
    assert enc.embed_dim == D and enc.patch_size == (8, 8) and enc.grid(x) == (4, 4)
    n, p = slices * L, enc.num_prefix_tokens
    with torch.no_grad():
        tokens = enc.forward_features(x, ts)
        assert tokens.shape == (B, p + n, D)
        cls, patch = enc.forward_tokens(x, timestamps=ts)
        torch.testing.assert_close(patch, tokens[:, p:], **FP32_NETWORK)
        torch.testing.assert_close(cls, tokens[:, 0], **FP32_NETWORK)
        none_masked = torch.zeros(B, n, dtype=torch.bool)
        cls_m, patch_m = enc.forward_tokens(x, none_masked, torch.zeros(1, D), timestamps=ts)
        torch.testing.assert_close(patch_m, patch, **FP32_NETWORK)  # no patch masked: the unmasked forward
        masks = none_masked.clone()
        masks[0, 0] = True
        assert not torch.allclose(enc.forward_tokens(x, masks, torch.ones(1, D), timestamps=ts)[1][0], patch[0])
        layers = enc.get_intermediate_layers(x, 2, timestamps=ts)
        assert len(layers) == 2 and layers[-1][0].shape == (B, n, D) and layers[-1][1].shape == (B, p, D)
        torch.testing.assert_close(layers[-1][0], tokens[:, p:], **FP32_NETWORK)  # last block, normed
        assert len(enc.get_intermediate_layers(x, None, norm=False, timestamps=ts)) == 4
        for mode in enc.pools:
            want = 2 * D if mode == "cls+avg" else D
            assert enc.pooled(x, mode, ts).shape == (B, want)
        torch.testing.assert_close(enc.pool(tokens, "avg"), tokens[:, p:].mean(1), **FP32_NETWORK)
        cls_feats, patch_mean = enc.probe_features(x, 1, ts)
        assert cls_feats.shape[0] == B and cls_feats.shape[-1] == D
        assert patch_mean is None or patch_mean.shape == (B, D)
    config = enc.export_config()
    if config is None:
        assert kind in ("vit", "eva")  # timm rebuilds both from architecture + model_args
    else:
        assert config["kind"] == kind
        rebuilt = rebuild_encoder(build_backbone("test_mae"), config)
        assert type(rebuilt) is type(module) and rebuilt.export_config() == config


def test_timm_adapter_keeps_timm_state_dict_keys(tiny_dinov2) -> None:
    enc = as_encoder(tiny_dinov2)
    assert isinstance(enc, TimmViTEncoder) and enc.vit is tiny_dinov2 and not isinstance(enc, nn.Module)
    assert as_encoder(enc) is enc


def test_pool_modes_outside_the_encoder_are_refused() -> None:
    module, x, ts, _ = _group_channel()
    with pytest.raises(ConfigError, match="group_channel encoder pools with one of"):
        module.pooled(x, "avg_fc_norm")


def test_as_encoder_refuses_unknown_modules() -> None:
    with pytest.raises(ConfigError, match="Linear is not a registered encoder .*ENCODERS"):
        as_encoder(nn.Linear(2, 2))
    assert not is_encoder(nn.Linear(2, 2))
