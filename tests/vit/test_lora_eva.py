"""LoRA on timm's Eva attention (DINOv3): the update reaches the output in the plain and the ``_qkvb`` layout, and
attention layouts LoRA cannot reach are refused instead of silently doing nothing."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.eva import EvaAttention
from timm.models.vision_transformer import Attention
from tolerances import FP32_NETWORK
from torch import nn

from explora.core.errors import ConfigError
from explora.models.adapt import apply_preset
from explora.vit.lora import LoRAQKV, inject_lora, lora_modules, merged_state_dict, route_qkv_through_module

TINY = dict(embed_dim=64, depth=2, num_heads=4, img_size=32, num_classes=0)
VARIANTS = ("vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb")


def _tiny_eva(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **TINY).eval()
    with torch.no_grad():  # non-trivial biases and layer scales, so a bypassed bias or qkv would show
        for m in model.modules():
            if isinstance(m, EvaAttention) and m.q_bias is not None:
                m.q_bias.normal_(0, 0.5)
                m.v_bias.normal_(0, 0.5)
        for blk in model.blocks:
            blk.gamma_1.fill_(0.5)
            blk.gamma_2.fill_(0.5)
    return model


def _randomise_lora(model: nn.Module) -> None:
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.normal_(0, 0.5)
            m.lora_B.normal_(0, 0.5)


@pytest.mark.parametrize("name", VARIANTS)
def test_lora_update_changes_eva_output(name: str) -> None:
    model = _tiny_eva(name)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    replaced = inject_lora(model, targets=("q", "v"), rank=4)
    assert replaced == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    with torch.no_grad():
        zero_update = model(x)  # B = 0: the routed forward computes the same function
    torch.testing.assert_close(zero_update, before, **FP32_NETWORK)
    _randomise_lora(model)
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max() > 1e-2, "LoRA update did not reach the output"
    with torch.enable_grad():  # the training path (no fold-on-the-fly) agrees with the folded inference path
        trained = model(x).detach()
    torch.testing.assert_close(trained, after, **FP32_NETWORK)

    plain = timm.create_model(name, pretrained=False, **TINY).eval()  # fresh timm model, default bias routing
    plain.load_state_dict(merged_state_dict(model))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), after, **FP32_NETWORK)


@pytest.mark.parametrize("name", VARIANTS)
def test_lora_gradient_flows_in_eva(name: str) -> None:
    model = _tiny_eva(name)
    apply_preset(model, "D-[L]-r64", lora_rank=4)
    _randomise_lora(model)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    lora = lora_modules(model)["blocks.0.attn.qkv"]
    assert lora.lora_A.grad is not None and lora.lora_A.grad.abs().sum() > 0
    assert lora.lora_B.grad is not None and lora.lora_B.grad.abs().sum() > 0


def test_qkvb_attention_is_routed_through_the_module() -> None:
    model = _tiny_eva("vit_small_patch16_dinov3_qkvb")
    attn = model.blocks[0].attn
    assert attn.q_bias is not None and not attn.qkv_bias_separate
    inject_lora(model, blocks=[0], rank=2)
    assert attn.qkv_bias_separate and isinstance(attn.qkv, LoRAQKV)
    calls = []
    attn.qkv.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == [1]


def test_unfused_eva_attention_is_refused() -> None:
    attn = EvaAttention(dim=64, num_heads=4, qkv_fused=False, scale_norm=False)
    holder = nn.Module()
    holder.blocks = nn.ModuleList([nn.Module()])
    holder.blocks[0].attn = attn
    with pytest.raises(ConfigError, match="no fused qkv"):
        inject_lora(holder, rank=2)


def test_unknown_attention_forward_is_refused() -> None:
    class Custom(Attention):
        def forward(self, x, attn_mask=None):  # noqa: ANN001, ANN202 - bypasses self.qkv like timm's _qkvb path
            return self.proj(x + nn.functional.linear(x, self.qkv.weight)[..., : x.shape[-1]])

    with pytest.raises(ConfigError, match="LoRA cannot reach"):
        route_qkv_through_module(Custom(dim=64, num_heads=4), "blocks.0.attn")


def test_swiglu_mlp_target_is_refused() -> None:
    model = timm.create_model("vit_huge_plus_patch16_dinov3", pretrained=False, embed_dim=64, depth=1, num_heads=4,
                              img_size=32, num_classes=0)
    with pytest.raises(ConfigError, match="SwiGLU"):
        inject_lora(model, targets=("fc1",), rank=2)
