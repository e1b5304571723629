"""SatMAE temporal encoder and objective."""

from __future__ import annotations

import math
import warnings

import torch

from explora.models.backbone import build_backbone
from explora.models.temporal import TemporalViT, timestamp_encoding
from explora.objectives.mae import MAEConfig, MAEObjective, build_feature_extractor, build_mae_objective

TS = torch.tensor([[[2016, 1, 10], [2017, 6, 12], [2018, 11, 15]]] * 2)


def _hand_sincos(dim: int, pos: float) -> list[float]:
    w = [10000 ** (-i / (dim / 2)) for i in range(dim // 2)]
    return [math.sin(pos * x) for x in w] + [math.cos(pos * x) for x in w]


def test_timestamp_encoding_is_year_month_hour_sincos_side_by_side():
    e = timestamp_encoding(TS, 16)
    assert e.shape == (2, 3, 48)
    for t, (year, month, hour) in enumerate(TS[0].tolist()):
        expected = torch.tensor(_hand_sincos(16, year) + _hand_sincos(16, month) + _hand_sincos(16, hour))
        torch.testing.assert_close(e[1, t], expected, rtol=1e-5, atol=1e-6)


def test_temporal_tokens_and_pooling(tiny_mae):
    vit = TemporalViT(tiny_mae, num_frames=3, time_dim=16)
    x = torch.randn(2, 3, 3, 32, 32)
    x[:, 1:] = x[:, :1]  # identical frames: only the time encoding tells them apart
    tokens, grid = vit.embed(x.flatten(1, 2), TS)
    assert grid == (4, 4) and tokens.shape == (2, 48, 64)
    t = tokens.reshape(2, 3, 16, 64)
    assert torch.equal(t[:, 0, :, :16], t[:, 1, :, :16])  # spatial part identical
    assert not torch.allclose(t[:, 0], t[:, 1])
    fx = build_feature_extractor(vit)
    assert torch.allclose(fx(x.flatten(1, 2), TS), vit.forward_features(x.flatten(1, 2), TS)[:, 1:].mean(1))


def test_temporal_objective_same_mask_and_training_step():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = build_mae_objective(build_backbone("test_mae"), MAEConfig(
            kind="temporal", decoder_dim=32, decoder_depth=1, decoder_heads=4, time_dim=16, decoder_time_dim=8,
            same_mask=True))
    batch = obj.batch_transform()(torch.rand(2, 9, 32, 32), torch.Generator().manual_seed(0), timestamps=TS)
    assert batch["noise"].shape == (2, 16) and batch["timestamps"].shape == (2, 3, 3)
    pred, mask = obj.predict(batch)
    assert pred.shape == (2, 48, 192)
    m = mask.mask.reshape(2, 3, 16)
    assert torch.equal(m[:, 0], m[:, 2]) and (m.sum(-1) == 12).all()
    out = obj(batch, 0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and obj.encoder.pos_embed.grad is not None


def _temporal_objective(**kw) -> MAEObjective:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_mae_objective(build_backbone("test_mae"), MAEConfig(
            kind="temporal", decoder_dim=32, decoder_depth=1, decoder_heads=4, time_dim=16, decoder_time_dim=8, **kw))


def test_default_time_offset_is_satmae_min_year_2002():
    """SatMAE util/datasets.py: (year - 2002, month - 1, hour) for fMoW."""
    assert MAEConfig().time_offset == (2002.0, 1.0, 0.0)
    obj = _temporal_objective()
    assert obj.encoder.time_offset == (2002.0, 1.0, 0.0)
    assert obj.encoder.shift_timestamps(TS)[0].tolist() == [[14.0, 0.0, 10.0], [15.0, 5.0, 12.0], [16.0, 10.0, 15.0]]
    assert obj.encoder.export_config()["time_offset"] == [2002.0, 1.0, 0.0]  # what an export's sidecar stores


def test_an_export_keeps_the_offset_it_was_written_with(tiny_mae):
    old = {"kind": "temporal", "num_frames": 3, "time_dim": 16, "time_offset": [1980, 1, 0]}
    vit = TemporalViT.from_config(tiny_mae, old)
    assert vit.time_offset == (1980.0, 1.0, 0.0)
    assert vit.shift_timestamps(TS)[0, 0].tolist() == [36.0, 0.0, 10.0]


def test_decoder_cls_token_has_no_time_encoding():
    """SatMAE temporal decoder: the cls token's time part is zeros (only the cls position row, itself zero)."""
    obj = _temporal_objective()
    batch = obj.batch_transform()(torch.rand(2, 9, 32, 32), torch.Generator().manual_seed(0), timestamps=TS)
    seen = {}
    obj.decoder.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    obj.decoder.decoder_embed.register_forward_hook(lambda m, a, out: seen.setdefault("e", out))
    with torch.no_grad():
        obj.predict(batch)
    cls_pos = torch.cat([obj.decoder.decoder_pos_embed[0, 0], torch.zeros(24)])
    assert torch.equal(cls_pos, torch.zeros(32))
    torch.testing.assert_close(seen["x"][:, 0], seen["e"][:, 0] + cls_pos)
