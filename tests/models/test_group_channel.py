"""SatMAE group-channel embedding, masking and loss on tiny multispectral inputs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import LANDSAT_SCENE, require

from explora.core.errors import ConfigError
from explora.models.backbone import build_backbone
from explora.models.group_channel import SENTINEL2_GROUPS, GroupChannelViT
from explora.objectives.mae import MAEConfig, MAEObjective, build_feature_extractor, build_mae_objective
from explora.objectives.mae.loss import group_masked_mse
from explora.vit.sincos import sincos_1d, sincos_2d

SMALL = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4, group_dim=16, decoder_group_dim=8)


def _obj(**kw) -> MAEObjective:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_mae_objective(build_backbone("test_mae"), MAEConfig(kind="group_channel", **{**SMALL, **kw}))


def test_sincos_values():
    e = sincos_1d(4, torch.tensor([0.0, 1.0]))
    assert torch.allclose(e[1], torch.tensor([np.sin(1.0), np.sin(0.01), np.cos(1.0), np.cos(0.01)]).float())
    assert sincos_2d(8, (2, 3)).shape == (6, 8)


def test_group_embedding_shapes_and_init(tiny_mae):
    vit = GroupChannelViT(tiny_mae, drop_bands=(0, 9, 10), group_dim=16)
    x = torch.randn(2, 13, 32, 32)
    tokens, grid = vit.embed(x)
    assert grid == (4, 4) and tokens.shape == (2, 3 * 16, 64)
    assert vit.forward_features(x).shape == (2, 1 + 48, 64) and vit(x).shape == (2, 64)
    enc = vit.patch_embed.encoding((4, 4))  # (1, G, L, D): spatial part shared, group part per group
    assert enc.shape == (1, 3, 16, 64)
    assert torch.equal(enc[0, 0, :, :48], enc[0, 2, :, :48]) and not torch.equal(enc[0, 0, 0, 48:], enc[0, 1, 0, 48:])
    rgb = tiny_mae.patch_embed.proj.weight
    w = vit.patch_embed.proj[2].weight  # group (8, 9): 2 bands
    assert w.shape == (64, 2, 8, 8)
    assert torch.allclose(w[:, 0], rgb.mean(1) * 1.5) and torch.allclose(w[:, 1], w[:, 0])
    assert all(p.requires_grad for p in vit.patch_embed.parameters())
    names = [n for n, _ in vit.named_parameters()]
    assert "patch_embed.proj.0.weight" in names and "blocks.3.attn.qkv.weight" in names


def test_add_mode_reuses_rgb_positions(tiny_mae):
    vit = GroupChannelViT(tiny_mae, groups=((0, 1), (2, 3)), pos_mode="add")
    assert torch.equal(vit.patch_embed.pos_embed, tiny_mae.pos_embed[:, 1:])
    assert vit(torch.randn(1, 4, 32, 32)).shape == (1, 64)


def test_group_loss_hand_computed():
    groups, C, L, pp = ((0, 2), (1,)), 3, 2, 1
    target = torch.arange(6.0).reshape(1, L, pp * C)  # patch l has bands [3l, 3l+1, 3l+2]
    preds = [torch.zeros(1, L, 2), torch.zeros(1, L, 1)]
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]])  # group 0: pos 0 removed; group 1: both removed
    # group 0 pos 0: bands 0,2 -> (0^2+2^2)/2 = 2; group 1 pos 0: 1; pos 1: 16 -> (2 + 1 + 16) / 3
    assert torch.allclose(group_masked_mse(preds, target, mask, groups, C), torch.tensor(19 / 3))


def test_per_group_loss_on_13_band_input_and_visible_invariance():
    obj = _obj(drop_bands=(0, 9, 10))
    batch = obj.batch_transform()(torch.rand(2, 13, 32, 32), torch.Generator().manual_seed(0))
    assert batch["noise"].shape == (2, 48)
    pred, mask = obj.predict(batch)
    assert [p.shape for p in pred] == [(2, 16, 256), (2, 16, 256), (2, 16, 128)]
    target = obj.targets(batch["images"])
    assert target.shape == (2, 16, 64 * 10)
    loss = obj.loss_from(pred, target, mask)
    m = mask.mask.reshape(2, 3, 16)
    changed = [p.clone() for p in pred]
    for g in range(3):
        changed[g][m[:, g] == 0] = 1e3
    assert torch.allclose(obj.loss_from(changed, target, mask), loss)
    loss.backward()
    assert obj.encoder.patch_embed.proj[0].weight.grad is not None


def test_spatial_mask_shared_across_groups():
    obj = _obj(groups=((0, 1, 2), (3, 4, 5)), spatial_mask=True, mask_ratio=0.5)
    batch = obj.batch_transform()(torch.rand(2, 6, 32, 32), torch.Generator().manual_seed(0))
    assert batch["noise"].shape == (2, 16)
    m = obj.make_mask(batch["noise"]).mask.reshape(2, 2, 16)
    assert torch.equal(m[:, 0], m[:, 1]) and (m.sum(-1) == 8).all()


def test_landsat_scene_end_to_end():
    tifffile = pytest.importorskip("tifffile")
    scene = tifffile.imread(require(LANDSAT_SCENE))
    assert scene.shape == (352, 349, 6) and scene.dtype == np.uint8
    x = torch.from_numpy(np.ascontiguousarray(scene)).permute(2, 0, 1)  # (6, H, W)
    chips = x[:, :64, :96].unfold(1, 32, 32).unfold(2, 32, 32)  # (6, 2, 3, 32, 32)
    chips = chips.permute(1, 2, 0, 3, 4).reshape(-1, 6, 32, 32)  # (6 chips, 6 bands, 32, 32)
    obj = _obj(groups=((0, 1, 2), (3, 4, 5)), crop_scale=(0.5, 1.0))
    batch = obj.batch_transform()(chips, torch.Generator().manual_seed(0))
    out = obj(batch, 0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in obj.parameters() if p.grad is not None)
    fx = build_feature_extractor(obj.export_backbone())
    assert fx(batch["images"]).shape == (6, 64)


def _hand_sincos(dim: int, pos: float) -> torch.Tensor:
    """1-D sin-cos of one position, written out: [sin(pos * w_i) | cos(pos * w_i)], w_i = 10000^(-i / (dim/2))."""
    w = [10000 ** (-i / (dim / 2)) for i in range(dim // 2)]
    return torch.tensor([math.sin(pos * x) for x in w] + [math.cos(pos * x) for x in w])


def _decoder_block_input(obj: MAEObjective, batch: dict) -> tuple[torch.Tensor, torch.Tensor, object]:
    """What enters the first decoder block, the decoder_embed output, and the mask."""
    seen = {}
    h1 = obj.decoder.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    h2 = obj.decoder.decoder_embed.register_forward_hook(lambda m, a, out: seen.setdefault("e", out))
    with torch.no_grad():
        _, mask = obj.predict(batch)
    h1.remove()
    h2.remove()
    return seen["x"], seen["e"], mask


def test_decoder_cls_token_gets_the_group_encoding_of_index_G():
    """SatMAE decoder: cls = [decoder_pos_embed cls row || decoder_channel_embed[:, G]] (sin-cos of G, not 0);
    a removed token of group g at position l = mask token + [spatial position l || sin-cos of g]."""
    obj = _obj(groups=((0, 1, 2), (3, 4, 5)), decoder_group_dim=8)
    G, Dg = 2, 8
    batch = obj.batch_transform()(torch.rand(2, 6, 32, 32), torch.Generator().manual_seed(0))
    x, e, mask = _decoder_block_input(obj, batch)
    pos = obj.decoder.decoder_pos_embed[0]  # (1 + L, 32 - Dg): cls row, then spatial
    expected_cls = torch.cat([pos[0], _hand_sincos(Dg, G)])
    torch.testing.assert_close(x[:, 0], e[:, 0] + expected_cls, rtol=1e-5, atol=1e-6)
    removed = mask.mask[0].nonzero().flatten()
    for n in removed[:5].tolist():
        g, l = divmod(n, 16)
        expected = obj.decoder.mask_token[0, 0] + torch.cat([pos[1 + l], _hand_sincos(Dg, g)])
        torch.testing.assert_close(x[0, 1 + n], expected, rtol=1e-5, atol=1e-6)


def test_encoder_cls_enters_bare_with_mae_weights(tiny_mae):
    """SatMAE's encoder adds no encoding to the cls token; with MAE weights (zero cls position row) neither do we."""
    with torch.no_grad():
        tiny_mae.pos_embed[:, 0] = 0.0  # MAE: get_2d_sincos_pos_embed(..., cls_token=True) puts zeros there
    vit = GroupChannelViT(tiny_mae, groups=((0, 1, 2), (3, 4, 5)), group_dim=16)
    seen = {}
    vit.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    vit.forward_features(torch.randn(2, 6, 32, 32))
    assert torch.equal(seen["x"][:, 0], tiny_mae.cls_token[0].expand(2, -1))


def test_satmae_group_loss_equals_ours_when_groups_are_in_band_order():
    groups = ((0, 1, 2), (3, 4, 5))
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 5, 4 * 6, generator=gen)  # p*p = 4, 6 bands
    preds = [torch.randn(2, 5, 4 * 3, generator=gen) for _ in groups]
    mask = (torch.rand(2, 10, generator=gen) < 0.6).float()
    ours = group_masked_mse(preds, target, mask, groups, 6)
    torch.testing.assert_close(group_masked_mse(preds, target, mask, groups, 6, "satmae"), ours)


def test_satmae_group_loss_differs_exactly_where_group_order_is_not_band_order():
    """Sentinel groups: concatenated head channels are bands (0,1,2,6,3,4,5,7,8,9), so channel k of the heads
    is scored against band k: wrong for k = 3..6 (groups 0 and 1), right for 0-2 and 7-9 (group 2 only 8, 9)."""
    groups, C, pp, L = SENTINEL2_GROUPS, 10, 4, 3
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(1, L, pp * C, generator=gen)
    t = target.reshape(1, L, pp, C)
    perfect = [t[..., list(g)].flatten(2) for g in groups]  # each head predicts its own bands exactly
    only = {g: torch.zeros(1, 3, L) for g in range(3)}
    for g in range(3):
        only[g][:, g] = 1.0
    for g in range(3):
        m = only[g].flatten(1)
        assert group_masked_mse(perfect, target, m, groups, C) == 0
        satmae = group_masked_mse(perfect, target, m, groups, C, "satmae")
        concat = [b for gr in groups for b in gr]  # head channel k predicts band concat[k]
        hand = sum(((t[0, l, :, concat[k]] - t[0, l, :, k]) ** 2).mean() for k in groups[g] for l in range(L))
        torch.testing.assert_close(satmae, hand / len(groups[g]) / L)
        assert (satmae > 0) == (g != 2)


def test_satmae_group_loss_needs_a_band_partition():
    MAEConfig(kind="group_channel", group_loss="satmae")  # Sentinel groups cover 0..9 once
    with pytest.raises(ConfigError, match="cover bands 0..C-1 exactly once"):
        MAEConfig(kind="group_channel", groups=((0, 1), (1, 2)), group_loss="satmae")
    with pytest.raises(ConfigError, match="group_loss must be"):
        MAEConfig(group_loss="mean")


def test_objective_uses_the_configured_group_loss():
    obj = _obj(drop_bands=(0, 9, 10))
    batch = obj.batch_transform()(torch.rand(2, 13, 32, 32), torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = obj(batch, 0).loss
        obj.config.group_loss = "satmae"
        released = obj(batch, 0).loss
    assert not torch.isclose(ours, released, rtol=1e-4)
