"""The Eva (DINOv3) encoder: masked forward with registers and RoPE, intermediate layers, pooling, the DINOv3
ExPLoRA presets, on tiny random-initialised models of the DINOv3 configuration."""

from __future__ import annotations

import pytest
import torch
from tolerances import FP32_NETWORK

from explora.core.errors import ConfigError
from explora.models.adapt import apply_preset
from explora.models.backbone import build_backbone
from explora.models.classifier import set_linear_drop_path
from explora.models.encoder import as_encoder, encoder_kind
from explora.models.eva import EvaEncoder
from explora.models.params import parameter_report


@pytest.fixture
def eva() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_backbone("test_dinov3").eval()  # patch 16, 32 px: a 2x2 grid after cls + 4 registers
    with torch.no_grad():
        for blk in model.blocks:  # LayerScale 1e-5 would hide most of each block
            blk.gamma_1.fill_(0.5)
            blk.gamma_2.fill_(0.5)
        model.reg_token.normal_()
        model.cls_token.normal_()
    return model


def test_eva_is_a_registered_encoder(eva) -> None:
    enc = as_encoder(eva)
    assert isinstance(enc, EvaEncoder) and encoder_kind(eva) == "eva"
    assert enc.num_prefix_tokens == 5 and enc.patch_size == (16, 16) and enc.grid((64, 48)) == (4, 3)


def test_unmasked_forward_tokens_equals_timm(eva) -> None:
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        cls, patch = as_encoder(eva).forward_tokens(x)
        ref = eva.forward_features(x)
    assert patch.shape == (2, 12, 64)  # registers dropped
    torch.testing.assert_close(cls, ref[:, 0], **FP32_NETWORK)
    torch.testing.assert_close(patch, ref[:, 5:], **FP32_NETWORK)


def test_masked_forward_swaps_patch_embeddings_before_rope(eva) -> None:
    x = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5, 6]] = True
    token = torch.randn(1, 64)

    def swap(_module, _inputs, out):  # the reference: timm's own forward on patch embeddings with the token in
        return torch.where(masks.reshape(out.shape[:-1]).unsqueeze(-1), token.reshape(64), out)

    with torch.no_grad():
        cls, patch = as_encoder(eva).forward_tokens(x, masks, token)
        handle = eva.patch_embed.register_forward_hook(swap)
        ref = eva.forward_features(x)
        handle.remove()
        plain_cls, plain_patch = as_encoder(eva).forward_tokens(x)
    torch.testing.assert_close(cls, ref[:, 0], **FP32_NETWORK)
    torch.testing.assert_close(patch, ref[:, 5:], **FP32_NETWORK)
    assert (patch[0] - plain_patch[0]).abs().max() > 1e-3  # masking changed the masked image
    torch.testing.assert_close(patch[1], plain_patch[1], **FP32_NETWORK)  # and not the other one


def test_masked_forward_under_gradient_checkpointing(eva) -> None:
    x = torch.randn(2, 3, 32, 32)
    masks = torch.tensor([[True, False, False, True], [False] * 4])
    token = torch.randn(1, 64)
    plain = as_encoder(eva).forward_tokens(x, masks, token)[1]
    eva.set_grad_checkpointing(True)
    with torch.enable_grad():
        ckpt = as_encoder(eva).forward_tokens(x, masks, token)[1]
    torch.testing.assert_close(ckpt, plain, **FP32_NETWORK)


def test_intermediate_layers_pools_and_probe_features(eva) -> None:
    enc = as_encoder(eva)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        (patch, prefix), = enc.get_intermediate_layers(x, 1)
        tokens = enc.forward_features(x)
        feats = {mode: enc.pooled(x, mode) for mode in enc.pools}
        cls, mean = enc.probe_features(x, 2)
    assert patch.shape == (3, 4, 64) and prefix.shape == (3, 5, 64)
    torch.testing.assert_close(feats["avg"], tokens[:, 5:].mean(1), **FP32_NETWORK)  # registers not pooled
    torch.testing.assert_close(feats["cls"], tokens[:, 0], **FP32_NETWORK)
    assert feats["cls+avg"].shape == (3, 128) and cls.shape == (3, 2, 64) and mean.shape == (3, 64)
    with pytest.raises(ConfigError, match="avg_fc_norm"):
        enc.pool(tokens, "avg_fc_norm")
    assert enc.default_pool == "cls"


def test_dinov3_presets(eva) -> None:
    apply_preset(eva, "D3-[L]-r64-reg", lora_rank=4)
    report = parameter_report(eva)
    assert eva.reg_token.requires_grad and eva.cls_token.requires_grad
    assert all(p.requires_grad for p in eva.blocks[-1].parameters())
    assert not eva.blocks[0].attn.qkv.weight.requires_grad
    dim, depth = 64, 4
    lora = (depth - 1) * 2 * 4 * (dim + dim)  # q and v: A (r, D) + B (D, r) per block
    assert report.groups["lora"] == lora
    assert report.groups["embeddings"] == 5 * dim  # cls + 4 registers


def test_dinov3_two_block_preset_and_drop_path(eva) -> None:
    spec = apply_preset(eva, "D3-[L-1,L]-r32")
    assert spec.resolved_unfrozen_blocks == (2, 3) and spec.resolved_lora_blocks == (0, 1)
    set_linear_drop_path(eva, 0.3)
    assert eva.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)
