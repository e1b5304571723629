"""CLS-to-patch attention of a DINOv3 (timm Eva) block: the recomputed probabilities reproduce the block's own
attention output (q/v bias, RoPE on patch tokens, registers), with and without LoRA."""

from __future__ import annotations

import pytest
import torch
from tolerances import FP32_NETWORK

from explora.analysis.attention import attention_maps, last_block_attention
from explora.models.adapt import apply_preset
from explora.models.backbone import build_backbone


@pytest.mark.parametrize("lora", [False, True])
def test_eva_attention_probs_reproduce_the_block_output(lora: bool) -> None:
    torch.manual_seed(0)
    vit = build_backbone("vit_small_patch16_dinov3_qkvb", embed_dim=64, depth=2, num_heads=4, img_size=64).eval()
    with torch.no_grad():
        for n, p in vit.named_parameters():
            if n.endswith(("q_bias", "v_bias")) or ".attn.qkv." in n:
                p.normal_(0, 0.3)
    if lora:
        apply_preset(vit, "D3-[L]-r64", unfrozen_blocks=(), lora_rank=4)
        with torch.no_grad():
            for n, p in vit.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
    images = torch.randn(2, 3, 64, 48)
    attn = vit.blocks[-1].attn
    seen = []
    attn.register_forward_pre_hook(lambda _m, a, kw: seen.append((a[0], kw["rope"])), with_kwargs=True)
    out = []
    attn.register_forward_hook(lambda _m, _a, o: out.append(o))
    probs = last_block_attention(vit, images)  # (B, heads, 5 + 12, 5 + 12)
    x, _ = seen[-1]
    b, n, _ = x.shape
    with torch.no_grad():
        qkv = attn.qkv(x) + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[2]  # (B, heads, N, hd)
        mixed = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        rebuilt = attn.proj(attn.norm(mixed))
    assert probs.shape == (2, 4, 17, 17)
    torch.testing.assert_close(rebuilt, out[-1], **FP32_NETWORK)
    maps = attention_maps(vit, images)
    assert maps.shape == (2, 4, 4, 3)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, 4), **FP32_NETWORK)
