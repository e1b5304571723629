"""apply_explora / presets / parameter report: trainable sets, gradients, and the paper's parameter counts."""

from __future__ import annotations

import pytest
import torch

from explora.adapt import PRESETS, ExploraSpec, apply_explora, apply_preset
from explora.errors import ConfigError
from explora.lora import LoRAQKV, lora_modules
from explora.models.backbone import build_backbone
from explora.params import memory_estimate, parameter_report


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_apply_explora_trainable_set(tiny_dinov2) -> None:
    mask_token = torch.nn.Parameter(torch.zeros(1, 64))
    spec = apply_explora(tiny_dinov2, unfrozen_blocks=(-1,), lora_rank=4, mask_token=mask_token)
    assert spec.resolved_unfrozen_blocks == (3,) and spec.resolved_lora_blocks == (0, 1, 2)
    assert tiny_dinov2.explora_spec is spec
    assert not mask_token.requires_grad  # tokens default frozen
    trainable = _trainable(tiny_dinov2)
    assert {n for n in trainable if n.startswith("blocks.3.")} == {
        n for n, _ in tiny_dinov2.named_parameters() if n.startswith("blocks.3.")
    }
    assert sorted(lora_modules(tiny_dinov2)) == [f"blocks.{i}.attn.qkv" for i in range(3)]
    for i in range(3):
        assert isinstance(tiny_dinov2.blocks[i].attn.qkv, LoRAQKV)
        assert {n for n in trainable if n.startswith(f"blocks.{i}.")} == {
            f"blocks.{i}.{m}.{p}" for m in ("norm1", "norm2") for p in ("weight", "bias")
        } | {f"blocks.{i}.attn.qkv.lora_A", f"blocks.{i}.attn.qkv.lora_B"}
    assert {"norm.weight", "norm.bias"} <= trainable
    frozen = {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.ls1.gamma", "blocks.0.attn.qkv.weight"}
    assert not frozen & trainable


def test_gradients_reach_only_trainable(tiny_dinov2) -> None:
    apply_preset(tiny_dinov2, "D-[L]-r64", lora_rank=4)
    with torch.no_grad():
        for n, p in tiny_dinov2.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    tiny_dinov2(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, p in tiny_dinov2.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # LoRA of the first block receives a non-zero gradient through the frozen weights
    assert tiny_dinov2.blocks[0].attn.qkv.lora_A.grad.abs().sum() > 0


def test_options_patch_pos_tokens(tiny_dinov2) -> None:
    mask = torch.nn.Parameter(torch.zeros(1, 64))
    apply_explora(
        tiny_dinov2, unfrozen_blocks=(0, -1), lora_rank=0, train_norms=False,
        train_patch_embed=True, train_pos_embed=True, train_tokens=True, mask_token=mask,
    )
    assert mask.requires_grad
    trainable = _trainable(tiny_dinov2)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"} <= trainable
    assert "norm.weight" not in trainable and "blocks.1.norm1.weight" not in trainable
    assert not lora_modules(tiny_dinov2)
    report = parameter_report(tiny_dinov2, extra={"mask_token": mask})
    assert report.unfrozen_block_indices == [0, 3]
    assert report.groups["embeddings"] == 64 + 64 * 17 + 64 * 3 * 8 * 8 + 64  # cls + pos (16+1) + conv
    assert report.extra == {"mask_token": 64}


def test_presets_and_unknown_name(tiny_mae) -> None:
    assert set(PRESETS) == {"D-[L]-r64", "M-[1,L]-r32", "LoRA-r8", "lora-only-r64", "unfreeze-only-[L]"}
    spec = apply_preset(tiny_mae, "M-[1,L]-r32")
    assert spec.preset == "M-[1,L]-r32" and spec.resolved_unfrozen_blocks == (0, 3) and spec.lora_rank == 32
    with pytest.raises(ConfigError, match="did you mean 'D-\\[L\\]-r64'"):
        apply_preset(build_backbone("test_mae"), "D-[L]-r46")


def test_lora_r8_and_ablations(tiny_mae) -> None:
    apply_preset(tiny_mae, "LoRA-r8")
    r = parameter_report(tiny_mae)
    assert r.groups == {"unfrozen_blocks": 0, "lora": 4 * 2 * 8 * (64 + 64), "norms": 0, "embeddings": 0, "other": 0}
    m = build_backbone("test_mae")
    apply_preset(m, "unfreeze-only-[L]")
    assert not lora_modules(m) and parameter_report(m).unfrozen_block_indices == [3]


def test_spec_round_trip_rebuilds_same_model(tiny_dinov2) -> None:
    spec = apply_preset(tiny_dinov2, "D-[L]-r64", lora_rank=4, lora_dropout=0.1)
    again = ExploraSpec.from_yaml(spec.to_yaml())
    assert again == spec
    fresh = build_backbone("test_dinov2")
    assert again.apply(fresh) == spec
    assert _trainable(fresh) == _trainable(tiny_dinov2)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in tiny_dinov2.state_dict().items()
    }
    with pytest.raises(ConfigError, match="unknown ExploraSpec key"):
        ExploraSpec.from_dict({"lora_rnak": 3})
    with pytest.raises(ConfigError, match="4-block"):
        ExploraSpec.from_dict({**spec.to_dict(), "depth": 4}).apply(build_backbone("test_dinov2", depth=6))
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_explora(tiny_dinov2)


def _meta(name: str):
    with torch.device("meta"):
        return build_backbone(name)


def test_vits14_count_matches_hand_count() -> None:
    model = _meta("dinov2_vits14")
    apply_preset(model, "D-[L]-r64")
    d, r = 384, 64
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d + 2 * d  # + LayerScale
    lora = 11 * 2 * (r * d + d * r)
    norms = 11 * 2 * 2 * d + 2 * d
    report = parameter_report(model)
    assert report.groups == {"unfrozen_blocks": block, "lora": lora, "norms": norms, "embeddings": 0, "other": 0}
    assert report.paper_count == 2_874_240
    assert report.backbone_total == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


@pytest.fixture(scope="module")
def vitl():
    return _meta("dinov2_vitl14")


@pytest.mark.parametrize(
    "preset,expected_m,exact",
    [("D-[L]-r64", 18.7, 18_723_840), ("unfreeze-only-[L]", 12.7, 12_694_528), ("LoRA-r8", 0.8, 786_432)],
)
def test_paper_counts_vitl(vitl, preset, expected_m, exact) -> None:
    import copy

    model = copy.deepcopy(vitl)
    apply_preset(model, preset)
    report = parameter_report(model)
    assert report.paper_count == exact
    assert round(report.paper_count / 1e6, 1) == expected_m
    assert "18.72M" in parameter_report(model).to_markdown() or preset != "D-[L]-r64"


def test_paper_count_vitb_and_memory() -> None:
    model = _meta("dinov2_vitb14")
    apply_preset(model, "D-[L]-r64")
    report = parameter_report(model)
    assert report.paper_count == 9_287_424  # the paper's "9M"
    d = report.to_dict()
    assert d["trainable_backbone"] == 9_287_424 and 0 < d["percentage"] < 12
    mem = memory_estimate(report)
    assert mem.gradients == 4 * report.trainable_total and mem.optimizer == 8 * report.trainable_total
    assert mem.weights == 4 * (report.backbone_total + report.lora_total)
