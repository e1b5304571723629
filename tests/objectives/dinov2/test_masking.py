"""Block masking statistics and masked forward equality with timm."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tolerances import FP32_NETWORK, FP32_ONE_OP

from explora.objectives.dinov2.masking import BlockMaskSampler, MaskingGenerator
from explora.vit.tokens import forward_tokens


def _upstream_mask_count(rng: random.Random, size: int, target: int, min_patches: int = 4) -> int:
    """How many patches DinoV2's block-masking loop masks for ``target``, transcribed with Python's ``random``.

    ``dinov2/data/masking.py``: rectangles of area ``uniform(min_patches, still_allowed)`` and log-uniform aspect
    in [0.3, 1/0.3], at most half the grid each, ten tries per rectangle, stop after ten failed tries.
    """
    mask = [[False] * size for _ in range(size)]
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    count = 0
    while count < target:
        allowed = min(target - count, 0.5 * size * size)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_patches, allowed)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if h < size and w < size:
                top, left = rng.randint(0, size - h), rng.randint(0, size - w)
                cells = [(i, j) for i in range(top, top + h) for j in range(left, left + w)]
                new = sum(not mask[i][j] for i, j in cells)
                if 0 < new <= allowed:
                    for i, j in cells:
                        mask[i][j] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    return count


def _targets(size: int, draws: int, seed: int) -> list[int]:
    """Requested counts as the collate draws them: ``int(N * uniform(0.1, 0.5))``."""
    rng = random.Random(seed)
    return [int(size * size * rng.uniform(0.1, 0.5)) for _ in range(draws)]


@pytest.mark.parametrize("size, draws", [(7, 1500), (14, 400), (16, 300)])
def test_block_masks_fill_the_requested_count_as_dinov2(size, draws):
    """DinoV2's loop fills > 99.5% of the requested patches; it does not stop when fewer than 4 remain."""
    gen = MaskingGenerator(size)
    g = torch.Generator().manual_seed(0)
    targets = _targets(size, draws, seed=size)
    counts = [int(gen(t, g).sum()) for t in targets]
    assert all(c <= t for c, t in zip(counts, targets))  # never more than asked
    fill = sum(counts) / sum(targets)
    rng = random.Random(1)
    upstream = sum(_upstream_mask_count(rng, size, t) for t in targets) / sum(targets)
    assert fill > 0.995 and upstream > 0.995, (fill, upstream)
    assert abs(fill - upstream) < 0.003, (fill, upstream)  # same loop, different random streams
    exact = sum(c == t for c, t in zip(counts, targets)) / draws
    assert exact > 0.9, exact  # most masks hit the requested count exactly


def test_one_block_is_a_rectangle_inside_the_grid_and_the_allowance():
    gen = MaskingGenerator(14, min_num_patches=4)
    assert gen.max_num_patches == 98  # DinoV2 train.py: half the grid
    g = torch.Generator().manual_seed(0)
    for allowed in (1, 3, 4, 10, 40, 98):
        placed = 0
        for _ in range(30):
            mask = torch.zeros(14, 14, dtype=torch.bool)
            added = gen._place_block(mask, allowed, g)  # 0: ten tries drew no rectangle that fits
            assert added == int(mask.sum()) <= allowed
            if added:
                placed += 1
                rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
                h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
                assert h * w == added and h < 14 and w < 14  # one full rectangle, smaller than the grid both ways
        assert placed >= 10, allowed  # below min_num_patches too: the area is drawn from [allowed, 4]


def test_each_block_adds_at_most_max_num_patches():
    added: list[tuple[int, float]] = []

    class Recording(MaskingGenerator):
        def _place_block(self, mask, max_new, generator):
            n = super()._place_block(mask, max_new, generator)
            added.append((n, max_new))
            return n

    gen = Recording(14, max_num_patches=6)
    g = torch.Generator().manual_seed(0)
    m = gen(120, g)
    assert sum(n for n, _ in added) == int(m.sum()) > 100  # many blocks of at most 6 patches
    assert all(n <= min(6, cap) for n, cap in added)


def test_sampler_count_ratios_and_determinism():
    sampler = BlockMaskSampler(14, mask_probability=0.5, mask_ratio_min_max=(0.1, 0.5))
    n_tok = 196
    g = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(20):
        masks = sampler(8, g)
        assert masks.shape == (8, n_tok)
        c = masks.sum(1)
        assert int((c > 0).sum()) == 4 and int((c == 0).sum()) == 4  # exactly int(8 * 0.5) crops masked
        bounds = torch.linspace(0.1, 0.5, 5)
        masked = c[c > 0].sort().values
        for k, v in enumerate(masked):  # k-th smallest <= top of the k-th sub-interval (one draw in each)
            assert int(v) <= int(n_tok * bounds[k + 1])
        counts.append(masked.float().mean())
    mean_ratio = torch.stack(counts).mean() / n_tok
    assert 0.27 < mean_ratio < 0.33  # ratios spread over [0.1, 0.5], mean 0.3
    a = sampler(8, torch.Generator().manual_seed(7))
    b = sampler(8, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_forward_tokens_equals_timm_unmasked(tiny_dinov2):
    vit = tiny_dinov2.eval()
    x = torch.randn(2, 3, 32, 32)
    cls, patch = forward_tokens(vit, x)
    ref = vit.forward_features(x)
    assert cls.shape == (2, 64) and patch.shape == (2, 16, 64)
    assert torch.allclose(cls, ref[:, 0], **FP32_NETWORK) and torch.allclose(patch, ref[:, 1:], **FP32_NETWORK)
    x16 = torch.randn(2, 3, 16, 16)  # dynamic size: local crops
    assert torch.allclose(forward_tokens(vit, x16)[1], vit.forward_features(x16)[:, 1:], **FP32_NETWORK)


def test_forward_tokens_reg_tokens_and_checkpointing():
    from explora.models.backbone import build_backbone

    vit = build_backbone("test_dinov2", reg_tokens=4, no_embed_class=True).eval()
    x = torch.randn(2, 3, 32, 32)
    cls, patch = forward_tokens(vit, x)
    ref = vit.forward_features(x)
    assert patch.shape == (2, 16, 64)
    assert torch.allclose(cls, ref[:, 0], **FP32_NETWORK) and torch.allclose(patch, ref[:, 5:], **FP32_NETWORK)
    calls = []
    for blk in vit.blocks:
        blk.register_forward_pre_hook(lambda m, a: calls.append(m))
    vit.set_grad_checkpointing(True)
    x.requires_grad_(True)
    cls2, _ = forward_tokens(vit, x)
    assert len(calls) == 4
    cls2.sum().backward()
    assert len(calls) == 8  # checkpointed: the backward re-ran every block's forward
    assert torch.allclose(cls2, cls, **FP32_NETWORK) and x.grad is not None


def test_masked_tokens_replaced_before_pos_embed(tiny_dinov2):
    vit = tiny_dinov2.eval()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5]] = True
    token = torch.randn(1, 64)
    from explora.vit.tokens import embed_tokens

    emb = embed_tokens(vit, x, masks, token)  # (2, 17, 64)
    pos = vit.pos_embed[:, 1:]  # (1, 16, 64) at the native grid
    assert torch.allclose(emb[0, 1 + 0], token[0] + pos[0, 0], **FP32_ONE_OP)
    assert torch.allclose(emb[0, 1 + 5], token[0] + pos[0, 5], **FP32_ONE_OP)
    assert torch.allclose(emb[1], embed_tokens(vit, x)[1], **FP32_ONE_OP)  # unmasked image untouched
    _, patch = forward_tokens(vit, x, masks, token)
    _, ref = forward_tokens(vit, x)
    assert torch.allclose(patch[1], ref[1], **FP32_NETWORK)
    assert not torch.allclose(patch[0, 0], ref[0, 0], atol=1e-3)  # LayerScale 1e-5: cls barely moves, patches do
