"""Per-block analyses (explora.analysis) and the matmul-peak benchmark, on tiny ViTs and synthetic data."""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import FASHION_MNIST, REPO, require
from tolerances import FP32_NETWORK, scaled
from torch import nn

from explora.analysis import (
    AnalysisConfig,
    ProbeConfig,
    analyze,
    attention_maps,
    class_probe,
    compare_analyses,
    last_block_attention,
    patch_eigenvalues,
    pca_feature_image,
)
from explora.analysis.blockwise import OUTPUT_FILES
from explora.analysis.features import block_patch_tokens, normalize_images
from explora.analysis.probes import split_images
from explora.core.errors import DataError

FAST = ProbeConfig(max_iter=50)


class SyntheticDataset:
    """Tiny labeled dataset: class c images are uniform noise around brightness 0.2 + 0.6 c (uint8, 3x32x32)."""

    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self, n: int = 8, num_classes: int = 2, labeled: bool = True) -> None:
        g = torch.Generator().manual_seed(1)
        self.labels = [i % num_classes for i in range(n)]
        base = torch.tensor([0.2 + 0.6 * c / max(num_classes - 1, 1) for c in self.labels]).view(n, 1, 1, 1)
        x = (base + 0.1 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0, 1)
        self.images = (x * 255).round().to(torch.uint8)
        self.num_classes = num_classes if labeled else 0
        self.labeled = labeled

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], (self.labels[i] if self.labeled else -1)


def _cfg(**kw) -> AnalysisConfig:
    return AnalysisConfig(**{"n_images": 8, "batch_size": 4, "top_k": 5, "probe": FAST, "n_visualize": 2, **kw})


# ---------------------------------------------------------------- spectra


def test_patch_eigenvalues_match_numpy_correlation_and_covariance() -> None:
    x = torch.randn(2, 10, 6)
    ev = patch_eigenvalues(x, k=4, norm="standardize")
    cov = patch_eigenvalues(x, k=4, norm="center")
    assert ev.shape == (2, 4)
    for i in range(2):
        ref_corr = np.sort(np.linalg.eigvalsh(np.corrcoef(x[i].numpy().T)))[::-1][:4]
        ref_cov = np.sort(np.linalg.eigvalsh(np.cov(x[i].numpy().T)))[::-1][:4]
        np.testing.assert_allclose(ev[i].numpy(), ref_corr, rtol=1e-4)
        np.testing.assert_allclose(cov[i].numpy(), ref_cov, rtol=1e-4)
    # standardised spectrum sums to D when N > D; k beyond rank is zero-padded
    assert torch.allclose(patch_eigenvalues(x, k=6).sum(1), torch.full((2,), 6.0), atol=1e-4)
    padded = patch_eigenvalues(torch.randn(1, 3, 6), k=5)
    assert padded[0, 2:].abs().max() < 1e-5 and padded[0, 0] > 0  # 3 centred samples: rank 2


def test_patch_eigenvalues_rank_one_hand_computed() -> None:
    # two channels perfectly correlated: correlation matrix [[1,1],[1,1]] has eigenvalues 2 and 0
    t = torch.arange(5.0).view(1, 5, 1)
    x = torch.cat([t, 3 * t + 1], dim=2)  # (1, 5, 2)
    np.testing.assert_allclose(patch_eigenvalues(x, k=2)[0].numpy(), [2.0, 0.0], atol=1e-5)
    # centred covariance of [t, 3t+1]: var(t)=2.5, so eigenvalues 2.5*(1+9)=25 and 0
    np.testing.assert_allclose(patch_eigenvalues(x, k=2, norm="center")[0].numpy(), [25.0, 0.0], atol=1e-4)


def test_normalize_images_uint8_and_255_scale_stats() -> None:
    img = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize_images(img, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(out, torch.full_like(out, 2.0))
    out255 = normalize_images(img, (127.5,) * 3, (63.75,) * 3)
    assert torch.allclose(out255, out)
    with pytest.raises(DataError, match="one mean and one std per band"):
        normalize_images(img, (0.5,), (0.25,))


# ---------------------------------------------------------------- attention


def _manual_attention_output(attn: nn.Module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    return attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c))


def _capture_attention_io(backbone: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    h = backbone.blocks[-1].attn.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    with torch.no_grad():
        backbone.forward_features(images)
    h.remove()
    return seen["x"], seen["y"]


def test_attention_maps_sum_to_one_and_reproduce_timm_attention(tiny_dinov2) -> None:
    model = tiny_dinov2.eval()
    images = torch.randn(2, 3, 32, 32)
    maps = attention_maps(model, images)
    assert maps.shape == (2, 4, 4, 4)  # (B, heads, h, w): 4 heads on the 4x4 patch grid
    assert torch.allclose(maps.sum((-2, -1)), torch.ones(2, 4), atol=1e-5)
    probs = last_block_attention(model, images)  # (B, heads, N, N)
    raw = attention_maps(model, images, renormalize=False)
    # raw CLS->patch mass plus CLS->CLS mass is the whole softmax row
    assert torch.allclose(raw.sum((-2, -1)) + probs[:, :, 0, 0], torch.ones(2, 4), atol=1e-5)
    x, y = _capture_attention_io(model, images)
    with torch.no_grad():
        assert torch.allclose(_manual_attention_output(model.blocks[-1].attn, x, probs), y, **scaled(FP32_NETWORK, y))


class _FakeLoRALinear(nn.Linear):
    """An nn.Linear subclass adding a low-rank update in forward, like explora.vit.lora's layers."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.randn(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.lora_A.T @ self.lora_B.T


def test_attention_maps_call_lora_wrapped_qkv(tiny_mae) -> None:
    model = tiny_mae.eval()
    images = torch.randn(2, 3, 32, 32)
    before = attention_maps(model, images)
    attn = model.blocks[-1].attn
    attn.qkv = _FakeLoRALinear(attn.qkv)
    after = attention_maps(model, images)
    assert not torch.allclose(before, after, atol=1e-4)  # the low-rank update changed the attention
    x, y = _capture_attention_io(model, images)
    with torch.no_grad():
        assert torch.allclose(_manual_attention_output(attn, x, last_block_attention(model, images)), y,
                              **scaled(FP32_NETWORK, y))


# ---------------------------------------------------------------- PCA feature image


def test_pca_feature_image_shape_range_and_foreground(tiny_dinov2) -> None:
    model = tiny_dinov2.eval()
    images = torch.randn(3, 3, 32, 32)
    rgb = pca_feature_image(model, images)
    assert rgb.shape == (3, 3, 4, 4)
    per_channel = rgb.permute(1, 0, 2, 3).reshape(3, -1)  # PCA fitted jointly over the batch
    assert torch.allclose(per_channel.min(1).values, torch.zeros(3))
    assert torch.allclose(per_channel.max(1).values, torch.ones(3))
    assert torch.equal(rgb, pca_feature_image(model, images))  # deterministic, signs fixed
    fg = pca_feature_image(model, images, foreground_threshold=0.5)
    background = (fg == 0).all(1)  # (B, h, w)
    assert 0 < int(background.sum()) < 3 * 16
    assert pca_feature_image(model, images, block=1).shape == (3, 3, 4, 4)


# ---------------------------------------------------------------- probes


def test_split_images_disjoint_and_complete() -> None:
    tr, te = split_images(10, 0.25, seed=0)
    assert len(te) == 2 and len(tr) == 8  # round(2.5) == 2
    assert sorted(tr.tolist() + te.tolist()) == list(range(10))
    assert split_images(2, 0.9, 0)[0].numel() == 1  # never an empty train set


def test_class_probe_recovers_planted_class_signal() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(12) % 3
    centers = 3 * torch.randn(3, 16, generator=g)
    tokens = centers[labels].unsqueeze(1) + torch.randn(12, 5, 16, generator=g)  # (n, P, D)
    tr, te = split_images(12, 0.25, seed=0)
    res = class_probe(tokens, labels, 3, tr, te, FAST)
    assert res["accuracy"] > 0.95
    noise = class_probe(torch.randn(12, 5, 16, generator=g), labels, 3, tr, te, FAST)
    assert noise["accuracy"] < 0.8


# ---------------------------------------------------------------- analyze end to end


def test_analyze_writes_every_output_with_right_shapes(tiny_dinov2, tmp_path) -> None:
    res = analyze(tiny_dinov2, SyntheticDataset(n=8), tmp_path, config=_cfg())
    for name in (*OUTPUT_FILES, "class_accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data == json.loads(json.dumps(res))
    assert data["num_blocks"] == 4 and len(data["blocks"]) == 4 and data["grid"] == [4, 4]
    assert data["n_train_images"] == 6 and data["n_test_images"] == 2
    for b, rec in enumerate(data["blocks"]):
        assert rec["block"] == b
        assert len(rec["eigenvalues_mean"]) == 5 and len(rec["eigenvalues_std"]) == 5
        assert rec["eigenvalues_mean"] == sorted(rec["eigenvalues_mean"], reverse=True)
        assert set(rec["position"]) == {"row_accuracy", "col_accuracy", "accuracy", "chance"}
        assert rec["position"]["chance"] == 1 / 16
    for key in ("eig_mean", "eig_std", "pos_accuracy", "cls_accuracy"):
        assert len(data["metrics"][key]) == 4
        assert all(np.isfinite(data["metrics"][key]))
    # the planted brightness signal separates the two classes from single patch tokens
    assert data["metrics"]["cls_accuracy"][0] >= 0.9
    assert tiny_dinov2.training  # the caller's train/eval mode is restored


def test_analyze_unlabeled_skips_class_probe(tiny_mae, tmp_path) -> None:
    res = analyze(tiny_mae.eval(), SyntheticDataset(n=6, labeled=False), tmp_path, config=_cfg(n_images=6))
    assert res["labeled"] is False and res["metrics"]["cls_accuracy"] is None
    assert all(b["class"] is None for b in res["blocks"])
    assert not (tmp_path / "class_accuracy.png").exists()
    assert (tmp_path / "attention.png").exists()


def test_position_probe_recovers_planted_position_signal(tiny_mae, tmp_path) -> None:
    """Zero patch embedding + large distinct position embeddings: block tokens encode position, not content."""
    model = tiny_mae.eval()
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        model.pos_embed.normal_(0, 3.0)
    planted = analyze(model, SyntheticDataset(n=8, labeled=False), tmp_path / "p", config=_cfg(patches_per_image=10))
    assert planted["metrics"]["pos_accuracy"][0] == 1.0
    assert min(planted["metrics"]["pos_accuracy"]) > 0.9
    # control: no position embedding and random content -> tokens carry no position information
    with torch.no_grad():
        model.pos_embed.zero_()
        model.patch_embed.proj.weight.normal_(0, 0.05)
    ctrl_data = SyntheticDataset(n=8, labeled=False)
    ctrl_data.images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    control = analyze(model, ctrl_data, tmp_path / "c", config=_cfg())
    assert max(control["metrics"]["pos_accuracy"]) < 0.4


def test_analysis_follows_the_input_grid_of_a_backbone_storing_a_larger_one(tmp_path) -> None:
    """A backbone whose position embedding is stored on 8x8 (as DinoV2's 37x37) analysed at 32 px: 4x4 grid, and
    the positions timm interpolates per forward are still recovered by the probe."""
    from explora.models.backbone import build_backbone

    model = build_backbone("test_mae", pos_embed_grid=8).eval()
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        model.pos_embed.normal_(0, 3.0)
    res = analyze(model, SyntheticDataset(n=8, labeled=False), tmp_path, config=_cfg(patches_per_image=10))
    assert res["grid"] == [4, 4] and res["blocks"][0]["position"]["chance"] == 1 / 16
    assert res["metrics"]["pos_accuracy"][0] == 1.0


def test_compare_analyses_and_cli(tiny_dinov2, tmp_path, monkeypatch) -> None:
    from explora.cli import analyze as cli

    monkeypatch.setattr(cli, "_build_dataset", lambda spec, size: SyntheticDataset(n=6))
    monkeypatch.setattr(cli, "_build_backbone", lambda name, w, size, in_chans: tiny_dinov2)
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", "--model", "test_dinov2", "--data", "synthetic:x", "--out",
                              str(tmp_path / "a"), "--n-images", "6", "--top-k", "3", "--n-visualize", "1",
                              "--probe-iters", "20"])
    assert args.func(args) == 0
    data = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert len(data["blocks"][0]["eigenvalues_mean"]) == 3 and data["n_images"] == 6
    # a second "run": same numbers shifted, then compare via the CLI (directories accepted)
    data["metrics"] = {k: [v + 0.1 for v in vals] for k, vals in data["metrics"].items()}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "analysis.json").write_text(json.dumps(data))
    args = parser.parse_args(["compare-analyses", str(tmp_path / "a"), str(tmp_path / "b" / "analysis.json"),
                              "--labels", "DinoV2", "ExPLoRA", "--out", str(tmp_path / "cmp.png")])
    assert args.func(args) == 0 and (tmp_path / "cmp.png").stat().st_size > 0
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="no 'metrics' key"):
        compare_analyses(tmp_path / "a", tmp_path / "bad.json", ["a", "b"], tmp_path / "x.png")


def test_cli_analyze_on_fashion_mnist(tmp_path, capsys) -> None:
    """Real material: the data part's dataset spec, 1-band images, a 1-band tiny backbone; skipped when absent."""
    from explora.cli import analyze as cli

    require(FASHION_MNIST)
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", "--model", "test_mae", "--data", f"fashion_mnist:{FASHION_MNIST}",
                              "--image-size", "32", "--out", str(tmp_path), "--n-images", "16", "--top-k", "4",
                              "--n-visualize", "2", "--probe-iters", "30"])
    assert args.func(args) == 0
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data["labeled"] and data["num_blocks"] == 4 and data["n_images"] == 16
    assert (tmp_path / "class_accuracy.png").exists()
    assert "pos_accuracy" in capsys.readouterr().out


def test_block_patch_tokens_one_per_block(tiny_dinov2) -> None:
    toks = block_patch_tokens(tiny_dinov2.eval(), torch.randn(2, 3, 40, 32))  # dynamic size: 5x4 grid
    assert len(toks) == 4 and all(t.shape == (2, 20, 64) for t in toks)


# ---------------------------------------------------------------- matmul peak


def test_measure_matmul_peak_positive_gflops() -> None:
    spec = importlib.util.spec_from_file_location("matmul_peak", REPO / "benchmarks" / "matmul_peak.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    gflops = mod.measure_matmul_peak(torch.float32, size=64, repeats=3)
    assert np.isfinite(gflops) and gflops > 0
    assert mod.measure_matmul_peak(torch.bfloat16, size=32, repeats=1, budget_s=0.0) > 0
