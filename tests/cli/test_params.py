"""`explora params --config`: the objective's report, with heads/decoder counted separately."""

from __future__ import annotations

import json

from explora.cli.main import main


def test_mae_config_reports_decoder_and_its_trainability(capsys):
    base = ["params", "--json", "--config", "mae_vitb16_fmow_rgb", "model.name=test_mae"]
    assert main(base) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["objective"] == "mae" and trained["extra"]["decoder"] > 0
    assert main([*base, "mae.train_decoder=false"]) == 0
    frozen = json.loads(capsys.readouterr().out)
    assert frozen["extra"]["decoder"] == 0
    assert frozen["trainable_backbone"] == trained["trainable_backbone"]


def test_dinov2_config_reports_heads_outside_the_paper_count(capsys):
    args = ["params", "--config", "dinov2_vits14_cpu", "model.name=test_dinov2", "dinov2.n_prototypes=64",
            "dinov2.hidden_dim=32", "dinov2.bottleneck_dim=16", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    head = 64 * 32 + 32 + 32 * 32 + 32 + 32 * 16 + 16 + 16 * 64 + 64  # 3-layer MLP + prototypes V + their gains g
    assert report["extra"]["dino_head"] == head
    assert report["trainable_total"] == report["trainable_backbone"] + head


def test_params_official_presets_reproduce_the_paper(capsys):
    """`explora params --model M --preset P`: the paper's 18.7M (+ the cls token the official scripts train) and
    0.8M, on the real architectures (meta device)."""
    expected = {("dinov2_vitl14", "D-[L]-r64-official"): 18_724_864, ("dinov2_vitb14", "D-[L]-r64-official"): 9_288_192,
                ("mae_vitl16", "LoRA-r8-official"): 786_432}
    for (model, preset), count in expected.items():
        assert main(["params", "--model", model, "--preset", preset, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["trainable_backbone"] == count and report["preset"] == preset
    assert main(["params", "--model", "dinov2_vitl14", "--preset", "D-[L]-r64-official"]) == 0
    assert "| embeddings | 1,024 |" in capsys.readouterr().out  # the cls token's row


def test_params_counts_a_one_channel_patch_embedding(capsys):
    """Grayscale with in_chans=1: the summed RGB filters make the patch embedding 2/3 smaller."""
    counts = {}
    for c in (3, 1):
        assert main(["params", "--json", "--model", "test_dinov2", "--in-chans", str(c)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["in_chans"] == c
        counts[c] = out["backbone_total"]
    embed, patch = 64, 8  # test_dinov2: width 64, patch 8
    assert counts[3] - counts[1] == 2 * embed * patch * patch
