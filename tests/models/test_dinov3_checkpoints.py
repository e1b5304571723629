"""DINOv3 backbones: registry short names, and the official ``.pth`` layout loaded into timm's Eva (synthetic state
dicts written in that layout for tiny models of the same configuration; nothing here downloads weights)."""

from __future__ import annotations

import pytest
import timm
import torch
from checkpoint_layouts import randomized, state, to_dinov3_official
from timm.models.eva import Eva

from explora.core.errors import CheckpointError
from explora.models.backbone import build_backbone
from explora.models.export import weights_license
from explora.models.record import record_of
from explora.models.registry import BACKBONES, DINOV3_LICENSE, DINOV3_SAT_MEAN

SHORT_NAMES = ("dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vitl16_sat",
               "dinov3_vith16plus", "dinov3_vit7b16", "dinov3_vit7b16_sat")
TINY = dict(embed_dim=64, depth=2, num_heads=4, img_size=32)


def test_short_names_map_to_timm_dinov3_weights() -> None:
    released = set(timm.list_models("*dinov3*", pretrained=True))
    for name in SHORT_NAMES:
        spec = BACKBONES[name]
        assert spec.timm_name in released, spec.timm_name
        assert spec.weights["default"] == f"timm:{spec.timm_name}"
        assert spec.license == DINOV3_LICENSE
        assert (spec.mean == DINOV3_SAT_MEAN) == name.endswith("_sat")


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vitl16_sat"])
def test_short_name_builds_an_eva_with_its_licence_and_normalisation(name: str) -> None:
    model = build_backbone(name, **TINY)
    assert isinstance(model, Eva) and model.num_prefix_tokens == 5 and model.pos_embed is None
    assert weights_license(model) == DINOV3_LICENSE
    assert tuple(model.pretrained_cfg["mean"]) == BACKBONES[name].mean
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb",
                                  "vit_small_plus_patch16_dinov3"])
def test_official_layout_round_trip(tmp_path, name: str) -> None:
    src = randomized(build_backbone(name, **TINY))
    mask_token = torch.randn(1, 64)
    path = tmp_path / "dinov3_official.pth"
    official = to_dinov3_official(state(src), mask_token, k_bias_junk=3.0)
    if "_qkvb" not in name:  # the released distilled weights: zero q/v bias, dropped by the plain timm model
        official = {k: (torch.zeros_like(v) if k.endswith("qkv.bias") else v) for k, v in official.items()}
    torch.save(official, path)
    model = build_backbone(name, weights=str(path), **TINY)
    loaded = model.state_dict()
    assert loaded.keys() == src.state_dict().keys()
    for k, v in src.state_dict().items():
        assert torch.equal(loaded[k], v), k
    rec = record_of(model)
    assert torch.equal(rec.mask_token, mask_token)
    assert rec.source.startswith("dinov3-official checkpoint")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), src.eval()(x))


def test_nonzero_qkv_bias_into_a_model_without_one_is_refused(tmp_path) -> None:
    src = randomized(build_backbone("vit_small_patch16_dinov3_qkvb", **TINY))
    path = tmp_path / "official.pth"
    torch.save(to_dinov3_official(state(src), torch.zeros(1, 64)), path)
    with pytest.raises(CheckpointError, match=r"official\.pth.*_qkvb"):
        build_backbone("vit_small_patch16_dinov3", weights=str(path), **TINY)


def test_other_architecture_names_the_file(tmp_path) -> None:
    src = randomized(build_backbone("vit_small_patch16_dinov3", **TINY))
    path = tmp_path / "deep.pth"
    torch.save(to_dinov3_official(state(src), torch.zeros(1, 64)), path)
    with pytest.raises(CheckpointError, match=r"deep\.pth: checkpoint is another architecture.*depth=3"):
        build_backbone("vit_small_patch16_dinov3", weights=str(path), **{**TINY, "depth": 3})
