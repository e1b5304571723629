"""apply_explora / presets / parameter report: trainable sets, gradients, and the paper's parameter counts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from explora.core.errors import ConfigError
from explora.models.adapt import PRESETS, ExploraSpec, apply_explora, apply_preset
from explora.models.backbone import build_backbone
from explora.models.params import memory_estimate, parameter_report
from explora.models.record import record_of
from explora.vit.lora import LoRAQKV, lora_modules


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_apply_explora_trainable_set(tiny_dinov2) -> None:
    mask_token = torch.nn.Parameter(torch.zeros(1, 64))
    spec = apply_explora(tiny_dinov2, unfrozen_blocks=(-1,), lora_rank=4, mask_token=mask_token)
    assert spec.resolved_unfrozen_blocks == (3,) and spec.resolved_lora_blocks == (0, 1, 2)
    assert record_of(tiny_dinov2).spec is spec
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
    assert set(PRESETS) == {
        "D-[L]-r64", "M-[1,L]-r32", "LoRA-r8", "lora-only-r64", "unfreeze-only-[L]",
        "D-[L]-r64-official", "M-[L]-r64-official", "LoRA-r8-official",
        "D3-[L]-r64", "D3-[L]-r64-reg", "D3-[L-1,L]-r32",
    }
    spec = apply_preset(tiny_mae, "M-[1,L]-r32")
    assert spec.preset == "M-[1,L]-r32" and spec.resolved_unfrozen_blocks == (0, 3) and spec.lora_rank == 32
    with pytest.raises(ConfigError, match="did you mean 'D-\\[L\\]-r64'"):
        apply_preset(build_backbone("test_mae"), "D-[L]-r46")


def test_cls_token_option_trains_the_cls_token_only(tiny_dinov2) -> None:
    mask = torch.nn.Parameter(torch.zeros(1, 64))
    spec = apply_explora(tiny_dinov2, unfrozen_blocks=(), lora_rank=0, train_norms=False, train_cls_token=True,
                         mask_token=mask)
    assert _trainable(tiny_dinov2) == {"cls_token"} and not mask.requires_grad and spec.train_cls_token
    tiny_dinov2(torch.randn(2, 3, 32, 32)).sum().backward()
    assert tiny_dinov2.cls_token.grad is not None and tiny_dinov2.cls_token.grad.abs().sum() > 0
    assert parameter_report(tiny_dinov2).groups["embeddings"] == 64  # the cls token is counted with the embeddings
    no_cls = build_backbone("test_dinov2", class_token=False, global_pool="avg")
    with pytest.raises(ConfigError, match="no cls_token"):
        apply_explora(no_cls, train_cls_token=True)


@pytest.mark.parametrize("preset", ["D-[L]-r64-official", "M-[L]-r64-official"])
def test_official_pretraining_presets(preset) -> None:
    model = build_backbone("test_mae" if preset.startswith("M") else "test_dinov2")
    spec = apply_preset(model, preset)
    assert spec.resolved_unfrozen_blocks == (3,) and spec.resolved_lora_blocks == (0, 1, 2)
    assert spec.lora_rank == 64 and spec.lora_alpha == 1.0 and spec.train_cls_token and not spec.train_tokens
    trainable = _trainable(model)
    assert "cls_token" in trainable and {"pos_embed", "patch_embed.proj.weight"}.isdisjoint(trainable)
    assert {"norm.weight", "blocks.0.norm1.weight", "blocks.2.norm2.bias"} <= trainable
    for i in range(3):
        qkv = model.blocks[i].attn.qkv
        assert qkv.scaling == 1.0 / 64 and qkv.targets == ("q", "v")
    fresh = build_backbone("test_mae" if preset.startswith("M") else "test_dinov2")
    assert ExploraSpec.from_yaml(spec.to_yaml()).apply(fresh) == spec  # resume rebuilds it, cls token included
    assert _trainable(fresh) == trainable and fresh.blocks[0].attn.qkv.scaling == 1.0 / 64


def test_official_lora_alpha_scales_the_update_by_one_over_rank(tiny_mae) -> None:
    """loralib's lora_alpha = 1: the LoRA update is (1/r) B A, r times smaller than explora's alpha = r."""
    import copy

    official, own = copy.deepcopy(tiny_mae), copy.deepcopy(tiny_mae)
    apply_preset(official, "LoRA-r8-official")
    apply_preset(own, "LoRA-r8")
    x = torch.randn(2, 17, 64)
    for model in (official, own):
        qkv = model.blocks[0].attn.qkv
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            qkv.lora_B.copy_(torch.randn(qkv.lora_B.shape, generator=g))
            qkv.lora_A.copy_(torch.randn(qkv.lora_A.shape, generator=g))
    with torch.no_grad():
        base = torch.nn.functional.linear(x, tiny_mae.blocks[0].attn.qkv.weight, tiny_mae.blocks[0].attn.qkv.bias)
        delta_official = official.blocks[0].attn.qkv(x) - base  # (2, 17, 192)
        delta_own = own.blocks[0].attn.qkv(x) - base
    assert delta_own.abs().max() > 1.0
    torch.testing.assert_close(delta_official * 8, delta_own, rtol=1e-4, atol=1e-4 * float(delta_own.abs().max()))
    assert delta_official[..., 64:128].abs().max() < 1e-5  # K carries no LoRA


def test_out_of_range_block_is_a_config_error() -> None:
    """A ViT-B/12 given the ViT-L block index 23 (as copied from the official ViT-L script) unfreezes nothing
    silently in the official code; here it is an error naming the index, the depth and the valid range."""
    vitb = _meta("dinov2_vitb14")
    with pytest.raises(ConfigError, match=r"unfrozen_blocks: block index 23 is out of range for a model with 12 "
                                          r"blocks \(valid: -12\.\.11"):
        apply_preset(vitb, "D-[L]-r64-official", unfrozen_blocks=(23,))
    with pytest.raises(ConfigError, match="lora_blocks: block index -13"):
        apply_explora(_meta("dinov2_vitb14"), lora_blocks=(-13,))
    # checked before anything is changed: the model is left as it was built (all trainable, no LoRA, no spec)
    assert not lora_modules(vitb) and all(p.requires_grad for p in vitb.parameters())
    assert not hasattr(vitb, "explora_spec")


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


@pytest.mark.parametrize(
    "name,preset,exact",
    [
        # the paper's 18.7M: 18,723,840 (block 23 + LoRA + norms) + 1,024 (the cls token, in `embeddings`)
        ("dinov2_vitl14", "D-[L]-r64-official", 18_723_840 + 1_024),
        ("dinov2_vitb14", "D-[L]-r64-official", 9_287_424 + 768),  # the paper's ~9M (ViT-B)
        ("mae_vitl16", "M-[L]-r64-official", 12_596_224 + 6_029_312 + 96_256 + 1_024),  # no LayerScale in MAE blocks
        ("dinov2_vitl14", "LoRA-r8-official", 786_432),  # the paper's 0.8M fine-tuning parameters
    ],
)
def test_paper_counts_official_presets(name, preset, exact) -> None:
    model = _meta(name)
    apply_preset(model, preset)
    report = parameter_report(model)
    assert report.paper_count == exact
    assert report.groups["embeddings"] == (0 if preset.startswith("LoRA") else model.cls_token.numel())
    assert report.groups["other"] == 0


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


# -- one spec: presets are instances, config sections read into it ---------------------------------------------------


def test_presets_are_specs_and_both_call_forms_agree(tiny_dinov2):
    from explora.models.adapt import preset_options

    assert all(isinstance(s, ExploraSpec) and s.preset == name for name, s in PRESETS.items())
    a = apply_explora(build_backbone("test_dinov2"), PRESETS["M-[1,L]-r32"], lora_rank=4)
    b = apply_explora(build_backbone("test_dinov2"), **preset_options("M-[1,L]-r32", lora_rank=4), preset="M-[1,L]-r32")
    assert a == b and a.lora_rank == 4 and a.resolved_unfrozen_blocks == (0, len(tiny_dinov2.blocks) - 1)
    assert ExploraSpec.from_preset("LoRA-r8", lora_rank=2) == replace(PRESETS["LoRA-r8"], lora_rank=2)
    with pytest.raises(TypeError, match="lora_rnak"):
        apply_explora(build_backbone("test_dinov2"), lora_rnak=3)


def test_config_section_starts_from_its_preset():
    default = PRESETS["D-[L]-r64"]
    spec = ExploraSpec.from_config({"preset": "D-[L]-r64-official", "lora_rank": 8}, default)
    assert spec == replace(PRESETS["D-[L]-r64-official"], lora_rank=8)
    assert ExploraSpec.from_config({"lora_rank": 8}, default) == replace(default, lora_rank=8)
    assert ExploraSpec.from_config({"preset": None}, default) == ExploraSpec()
    with pytest.raises(ConfigError, match="did you mean 'M-\\[1,L\\]-r32'"):
        ExploraSpec.from_config({"preset": "M-[1,L]-r23"}, default)
    with pytest.raises(ConfigError, match="Did you mean 'lora_rank'"):
        ExploraSpec.from_config({"lora_rnak": 8}, default)


def test_pre_issue_14_adapt_section_reads_the_same():
    """config.yaml saved by earlier versions (every unset field null) must rebuild the same spec on --resume."""
    old = {"preset": "D-[L]-r64-official", "unfrozen_blocks": None, "lora_rank": None, "lora_alpha": None,
           "lora_dropout": None, "lora_targets": None, "train_norms": None, "train_patch_embed": None,
           "train_pos_embed": None, "train_tokens": None, "train_cls_token": None}
    assert ExploraSpec.from_config(old, None) == PRESETS["D-[L]-r64-official"]  # alpha 1.0, not null
    assert ExploraSpec.from_config({**old, "lora_rank": 16}, None).lora_rank == 16
