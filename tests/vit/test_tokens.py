"""The ViT toolkit: one block runner, the patch grid check and the sin-cos encodings."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import FP32_NETWORK

from explora.core.errors import ConfigError
from explora.vit.sincos import sincos_1d, sincos_2d
from explora.vit.tokens import forward_tokens, patch_grid_size, run_blocks


def test_run_blocks_equals_timm_forward_features(tiny_mae) -> None:
    vit = tiny_mae.eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))  # (2, 1 + 16, 64)
    torch.testing.assert_close(run_blocks(vit, tokens), vit.forward_features(x), **FP32_NETWORK)


def test_run_blocks_checkpointed_matches_plain(tiny_mae) -> None:
    vit = tiny_mae.train()
    x = torch.randn(2, 3, 32, 32)
    ref = forward_tokens(vit, x)[1]
    vit.set_grad_checkpointing(True)
    try:
        out = forward_tokens(vit, x)[1]
    finally:
        vit.set_grad_checkpointing(False)
    torch.testing.assert_close(out, ref, **FP32_NETWORK)


def test_patch_grid_size_checks_the_multiple() -> None:
    assert patch_grid_size(torch.zeros(1, 3, 32, 48), 8) == (4, 6)
    assert patch_grid_size(torch.zeros(1, 3, 32, 48), (16, 16)) == (2, 3)
    with pytest.raises(ConfigError, match="not a multiple of the patch size 8"):
        patch_grid_size(torch.zeros(1, 3, 30, 32), 8)


def test_sincos_halves_and_widths() -> None:
    e = sincos_1d(4, torch.tensor([1.0]))  # frequencies 1, 1/100
    torch.testing.assert_close(e[0], torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]))
    assert sincos_2d(8, (2, 3)).shape == (6, 8)
    with pytest.raises(ConfigError, match="even"):
        sincos_1d(3, torch.tensor([0.0]))
    with pytest.raises(ConfigError, match="multiple of 4"):
        sincos_2d(6, (2, 2))
