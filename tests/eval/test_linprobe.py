"""Linear probe: feature extraction/caching on a tiny ViT and the 28-head sweep on separable features."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from explora.eval.features import EvalTransform, FeatureSet, extract_features, vit_features
from explora.eval.linprobe import LinearProbeConfig, head_name, train_linear_probe


class _Images(TensorDataset):
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)
    spec = "toy:mem"


def _images(n: int = 6) -> _Images:
    g = torch.Generator().manual_seed(1)
    return _Images(torch.randint(0, 256, (n, 3, 40, 40), dtype=torch.uint8, generator=g), torch.arange(n) % 3)


def test_eval_transform_resizes_crops_and_normalises():
    t = EvalTransform(32, (0.5,), (0.25,), crop_pct=1.0)
    x = torch.full((2, 1, 40, 48), 255, dtype=torch.uint8)
    y = t(x)
    assert y.shape == (2, 1, 32, 32)
    torch.testing.assert_close(y, torch.full_like(y, 2.0))  # (1 - 0.5) / 0.25


def test_vit_features_match_manual_forward(tiny_dinov2):
    model = tiny_dinov2.eval()
    x = torch.randn(2, 3, 32, 32)
    cls, patch_mean = vit_features(model, x, 4)
    assert cls.shape == (2, 4, 64) and patch_mean.shape == (2, 64)
    # last-block CLS through the final norm == forward_features CLS; patch mean over the 16 normed patch tokens
    tokens = model.forward_features(x)  # (2, 17, 64)
    torch.testing.assert_close(cls[:, -1], tokens[:, 0])
    torch.testing.assert_close(patch_mean, tokens[:, 1:].mean(1))
    # an earlier block: run its prefix through the final norm by hand
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk in model.blocks[:2]:
        h = blk(h)
    torch.testing.assert_close(cls[:, 1], model.norm(h)[:, 0])


def test_extract_features_caches_by_weights(tiny_dinov2, tmp_path):
    ds = _images()
    t = EvalTransform(32, ds.mean, ds.std)
    f1 = extract_features(tiny_dinov2, ds, t, batch_size=4, cache_dir=tmp_path, progress=False)
    assert f1.cls.shape == (6, 4, 64) and f1.patch_mean.shape == (6, 64) and f1.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    f2 = extract_features(tiny_dinov2, ds, t, batch_size=3, cache_dir=tmp_path, progress=False)  # cache hit
    assert torch.equal(f1.cls, f2.cls) and torch.equal(f1.patch_mean, f2.patch_mean)
    with torch.no_grad():
        tiny_dinov2.norm.weight.mul_(2)
    f3 = extract_features(tiny_dinov2, ds, t, batch_size=4, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and not torch.equal(f1.cls, f3.cls)
    assert tiny_dinov2.training  # restored after extraction


def test_extract_features_accepts_feature_function(tiny_mae):
    ds = _images(4)
    fn = lambda x: tiny_mae.forward_features(x).mean(1)  # noqa: E731  pooled over all tokens, like the wrappers
    f = extract_features(fn, ds, EvalTransform(32, ds.mean, ds.std), batch_size=2, progress=False)
    assert f.cls.shape == (4, 1, 64) and f.patch_mean is None
    assert f.linear_input(1, False).shape == (4, 64)


def _separable(n_per_class: int, num_classes: int = 4, dim: int = 16, seed: int = 0) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(num_classes, dim) * 3.0  # (K, D), pairwise distance 4.2
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    cls = centres[labels][:, None].repeat(1, 4, 1) + 0.3 * torch.randn(len(labels), 4, dim, generator=g)
    patch = torch.randn(len(labels), dim, generator=g)  # pure noise: avgpool adds nothing
    return FeatureSet(cls, patch, labels)


def test_linear_probe_separable_reaches_100_and_picks_a_large_lr():
    train, val = _separable(32, seed=0), _separable(16, seed=1)
    cfg = LinearProbeConfig(batch_size=32, epochs=5)
    res = train_linear_probe(train, val, num_classes=4, cfg=cfg, progress=False)
    assert len(res.head_top1) == 28  # 2 n x 2 avgpool x 7 lr
    assert res.metrics["top1"] == 100.0 and res.metrics["top5"] == 100.0
    assert res.best_spec.lr >= 5e-3  # 20 steps at lr 1e-4 x 32/256 cannot move N(0, 0.01) weights far
    assert res.metrics["iterations"] == 20
    assert res.metrics["per_class_accuracy"] == [100.0] * 4
    assert sum(map(sum, res.metrics["confusion_matrix"])) == 64
    assert res.evaluate(_separable(8, seed=2))["top1"] == 100.0


def test_linear_probe_heads_init_and_lr_scaling():
    train = _separable(8)
    cfg = LinearProbeConfig(lrs=(0.1,), n_blocks=(4,), avgpool=(True,), batch_size=16, epochs=0)
    res = train_linear_probe(train, train, num_classes=4, cfg=cfg, progress=False)
    head = res.heads.heads[head_name(4, True, 0.1)]
    assert head.weight.shape == (4, 5 * 16)  # 4 CLS + patch mean
    assert torch.all(head.bias == 0) and 0.005 < head.weight.std().item() < 0.015
    assert res.metrics["best_lr_scaled"] == 0.1 * 16 / 256
