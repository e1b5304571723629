"""SatMAE temporal encoder and objective."""

from __future__ import annotations

import warnings

import torch

from explora.models.backbone import build_backbone
from explora.models.temporal import TemporalViT, timestamp_encoding
from explora.objectives.mae import MAEConfig, MAEObjective, build_feature_extractor

TS = torch.tensor([[[2016, 1, 10], [2017, 6, 12], [2018, 11, 15]]] * 2)


def test_timestamp_encoding_differs_across_frames():
    e = timestamp_encoding(TS, 16)
    assert e.shape == (2, 3, 48)
    assert not torch.equal(e[0, 0], e[0, 1]) and not torch.equal(e[0, 1], e[0, 2])


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
        obj = MAEObjective(build_backbone("test_mae"), MAEConfig(
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
