"""The classifier and pooled-feature modules pool through the Encoder of any registered kind."""

from __future__ import annotations

import pytest
import torch
from tolerances import FP32_NETWORK
from torch import nn

from explora.core.errors import ConfigError
from explora.models.classifier import ClassifierModel, PooledEncoder, resolve_pool
from explora.models.encoder import as_encoder
from explora.models.group_channel import GroupChannelViT


def test_pool_auto_is_the_encoders_default(tiny_mae) -> None:
    assert resolve_pool(as_encoder(tiny_mae), "auto") == "cls"
    assert resolve_pool(as_encoder(GroupChannelViT(tiny_mae, groups=((0, 1),), group_dim=16)), "auto") == "avg"
    with pytest.raises(ConfigError, match="expected one of"):
        resolve_pool(as_encoder(tiny_mae), "max")


def test_head_reads_the_encoders_pooled_feature(tiny_mae) -> None:
    vit = tiny_mae.eval()
    x = torch.randn(2, 3, 32, 32)
    model = ClassifierModel(vit, 5, pool="cls+avg").eval()
    assert model.head.in_features == 128
    with torch.no_grad():
        tokens = vit.forward_features(x)
        torch.testing.assert_close(model.features(x), torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1),
                                   **FP32_NETWORK)
        torch.testing.assert_close(PooledEncoder(vit)(x), tokens[:, 1:].mean(1), **FP32_NETWORK)


def test_a_pooling_callable_needs_in_dim() -> None:
    with pytest.raises(ConfigError, match="not a registered encoder; pass in_dim"):
        ClassifierModel(nn.Flatten(), 3)
    model = ClassifierModel(nn.Flatten(), 3, in_dim=12)
    assert model(torch.randn(2, 3, 2, 2)).shape == (2, 3)
