"""Block masking statistics and masked forward equality with timm."""

from __future__ import annotations

import torch

from explora.models.masked_forward import forward_tokens
from explora.objectives.dinov2.masking import BlockMaskSampler, MaskingGenerator


def test_generator_respects_target_and_block_bounds():
    gen = MaskingGenerator(14, min_num_patches=4)
    g = torch.Generator().manual_seed(0)
    for target in (0, 3, 20, 60, 98):
        m = gen(target, g)
        assert m.shape == (14, 14) and m.dtype == torch.bool
        assert int(m.sum()) <= target
        if target >= 20:
            assert int(m.sum()) >= target // 2  # blocks fill most of the request
    assert gen.max_num_patches == 98  # half the grid


def test_sampler_count_ratios_and_determinism():
    sampler = BlockMaskSampler(14, mask_probability=0.5, mask_ratio_min_max=(0.1, 0.5))
    n_tok = 196
    g = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(20):
        masks = sampler(8, g)
        assert masks.shape == (8, n_tok)
        c = masks.sum(1)
        assert int((c > 0).sum()) <= 4 and int((c == 0).sum()) >= 4  # exactly int(8 * 0.5) crops asked to mask
        bounds = torch.linspace(0.1, 0.5, 5)
        masked = c[c > 0].sort().values
        for k, v in enumerate(masked.flip(0)):  # k-th largest <= k-th largest sub-interval bound
            assert int(v) <= int(n_tok * bounds[4 - k])
        counts.append(masked.float().mean())
    mean_ratio = torch.stack(counts).mean() / n_tok
    assert 0.2 < mean_ratio < 0.35  # ratios spread over [0.1, 0.5], mean 0.3 (a little under-filled)
    a = sampler(8, torch.Generator().manual_seed(7))
    b = sampler(8, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_forward_tokens_equals_timm_unmasked(tiny_dinov2):
    vit = tiny_dinov2.eval()
    x = torch.randn(2, 3, 32, 32)
    cls, patch = forward_tokens(vit, x)
    ref = vit.forward_features(x)
    assert cls.shape == (2, 64) and patch.shape == (2, 16, 64)
    assert torch.allclose(cls, ref[:, 0], atol=1e-6) and torch.allclose(patch, ref[:, 1:], atol=1e-6)
    x16 = torch.randn(2, 3, 16, 16)  # dynamic size: local crops
    assert torch.allclose(forward_tokens(vit, x16)[1], vit.forward_features(x16)[:, 1:], atol=1e-6)


def test_forward_tokens_reg_tokens_and_checkpointing():
    from explora.models.backbone import build_backbone

    vit = build_backbone("test_dinov2", reg_tokens=4, no_embed_class=True).eval()
    x = torch.randn(2, 3, 32, 32)
    cls, patch = forward_tokens(vit, x)
    ref = vit.forward_features(x)
    assert patch.shape == (2, 16, 64)
    assert torch.allclose(cls, ref[:, 0], atol=1e-6) and torch.allclose(patch, ref[:, 5:], atol=1e-6)
    vit.set_grad_checkpointing(True)
    x.requires_grad_(True)
    cls2, _ = forward_tokens(vit, x)
    cls2.sum().backward()
    assert torch.allclose(cls2, cls, atol=1e-6) and x.grad is not None


def test_masked_tokens_replaced_before_pos_embed(tiny_dinov2):
    vit = tiny_dinov2.eval()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5]] = True
    token = torch.randn(1, 64)
    from explora.models.masked_forward import embed_tokens

    emb = embed_tokens(vit, x, masks, token)  # (2, 17, 64)
    pos = vit.pos_embed[:, 1:]  # (1, 16, 64) at the native grid
    assert torch.allclose(emb[0, 1 + 0], token[0] + pos[0, 0], atol=1e-6)
    assert torch.allclose(emb[0, 1 + 5], token[0] + pos[0, 5], atol=1e-6)
    assert torch.allclose(emb[1], embed_tokens(vit, x)[1])  # unmasked image untouched
    _, patch = forward_tokens(vit, x, masks, token)
    _, ref = forward_tokens(vit, x)
    assert torch.allclose(patch[1], ref[1], atol=1e-6)
    assert not torch.allclose(patch[0, 0], ref[0, 0], atol=1e-3)  # LayerScale 1e-5: cls barely moves, patches do
