"""build_backbone: every weights source (file, URL through the hub cache, registry default, timm/HF hub) and layout."""

from __future__ import annotations

import dataclasses
import json

import pytest
import timm
import torch
from checkpoint_layouts import (
    TINY,
    assert_same,
    fake_mae_decoder,
    randomized,
    state,
    tiny,
    to_dinov2_hub,
    to_explora_full,
    to_mae,
)
from conftest import DINOV2_VITS14, require
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from tolerances import FP32_NETWORK
from torch import nn

from explora.core.errors import CheckpointError
from explora.models import registry
from explora.models.backbone import build_backbone, input_size
from explora.models.record import record_of


def test_random_backbone_is_a_dynamic_size_feature_extractor(tiny_dinov2):
    assert tiny_dinov2.num_classes == 0 and tiny_dinov2.dynamic_img_size
    record = record_of(tiny_dinov2)
    assert (record.source, record.mask_token, record.mae_decoder, record.mae_decoder_targets) == (
        "random init", None, None, None)
    for size in (32, 48):  # global and local crops through one model
        assert tiny_dinov2(torch.randn(2, 3, size, size)).shape == (2, 64)
    assert tiny_dinov2.patch_embed.grid_size == (4, 4)  # registry native_img_size=32 for test_*
    assert input_size(tiny_dinov2) == (32, 32) and tiny_dinov2.pretrained_cfg["input_size"] == (3, 32, 32)


def test_unknown_name_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="no_such_vit"):
        build_backbone("no_such_vit")


def test_dinov2_hub_file_round_trip(tmp_path, tiny_dinov2):
    model = randomized(tiny_dinov2)
    mask = torch.randn(1, 64)
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(to_dinov2_hub(state(model), mask), path)
    loaded = build_backbone("test_dinov2", weights=path)
    assert_same(loaded.state_dict(), model.state_dict())
    assert torch.equal(record_of(loaded).mask_token, mask)
    assert record_of(loaded).mae_decoder is None
    assert record_of(loaded).source.startswith(f"dinov2-hub checkpoint {path} (+mask_token)")


def test_reg4_and_giant_variants_round_trip(tmp_path):
    for name, kwargs in (("vit_small_patch14_reg4_dinov2", {}), ("vit_giant_patch14_dinov2", {"mlp_ratio": 4})):
        model = tiny(name, **kwargs)
        cls_pos = torch.zeros(1, 1, 64)  # zero cls slot: the fold is exact, so the round trip is bitwise
        path = tmp_path / f"{name}.pth"
        torch.save(to_dinov2_hub(state(model), torch.randn(1, 64), cls_pos=cls_pos), path)
        loaded = build_backbone(name, weights=str(path), **(TINY | kwargs))
        assert loaded.patch_embed.grid_size == (4, 4)
        assert_same(loaded.state_dict(), model.state_dict())


@pytest.mark.parametrize("with_decoder", [True, False])
def test_mae_file_puts_decoder_in_extras(tmp_path, tiny_mae, with_decoder):
    model = randomized(tiny_mae)
    decoder = fake_mae_decoder() if with_decoder else None
    path = tmp_path / "mae_pretrain_tiny.pth"
    torch.save(to_mae(state(model), decoder), path)
    loaded = build_backbone("test_mae", weights=path)
    assert_same(loaded.state_dict(), model.state_dict())
    assert record_of(loaded).mask_token is None
    if with_decoder:
        assert_same(record_of(loaded).mae_decoder, decoder)
    else:
        assert record_of(loaded).mae_decoder is None


def test_explora_full_file_round_trip(tmp_path, tiny_dinov2):
    model = randomized(tiny_dinov2)
    path = tmp_path / "explora_dinov2_tiny.pth"
    torch.save(to_explora_full(state(model), torch.randn(1, 64), keep_qkv=False), path)
    loaded = build_backbone("test_dinov2", weights=path)
    assert_same(loaded.state_dict(), model.state_dict())
    assert "explora-full" in record_of(loaded).source and "rebuilt 8 qkv" in record_of(loaded).source


def test_own_safetensors_export_with_non_square_sidecar(tmp_path):
    wide = randomized(build_backbone("test_dinov2", pos_embed_grid=(4, 6)))  # 4x6 grid: needs the sidecar
    path = tmp_path / "adapted.safetensors"
    save_file(state(wide), str(path))
    same = build_backbone("test_dinov2", weights=path, pos_embed_grid=(4, 6))
    assert_same(same.state_dict(), wide.state_dict())
    with pytest.raises(CheckpointError, match=r"adapted\.safetensors.*not a square grid"):
        build_backbone("test_dinov2", weights=path)
    for meta in ({"img_size": [32, 48], "patch_size": 8}, {"pos_embed_grid": [4, 6]}):  # older and current keys
        (tmp_path / "adapted.json").write_text(json.dumps(meta))
        kept = build_backbone("test_dinov2", weights=path)  # the sidecar's grid is kept, the input size is 32
        assert_same(kept.state_dict(), wide.state_dict())
        assert kept.patch_embed.grid_size == (4, 6) and input_size(kept) == (32, 32)
    square = build_backbone("test_dinov2", weights=path, pos_embed_grid=4)
    assert square.pos_embed.shape == (1, 17, 64) and "4x6 -> 4x4" in record_of(square).source


def test_img_size_is_the_input_size_and_the_stored_grid_stays(tmp_path, tiny_dinov2):
    model = randomized(tiny_dinov2)
    path = tmp_path / "t.pth"
    torch.save(state(model), path)
    big = build_backbone("test_dinov2", weights=path, img_size=64)
    assert_same(big.state_dict(), model.state_dict())  # 4x4 position embedding kept, not resampled
    assert input_size(big) == (64, 64) and big.pretrained_cfg["input_size"] == (3, 64, 64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(big(x), model(x), rtol=0, atol=0)  # the same timm per-forward interpolation
    resampled = build_backbone("test_dinov2", weights=path, img_size=64, pos_embed_grid=8)  # asked for: at load
    want = resample_abs_pos_embed(model.pos_embed.detach(), new_size=[8, 8], num_prefix_tokens=1)
    assert resampled.patch_embed.grid_size == (8, 8) and torch.equal(resampled.pos_embed.detach(), want)
    assert "4x4 -> 8x8" in record_of(resampled).source
    nearest = build_backbone("test_dinov2", weights=path, pos_embed_grid=8, pos_embed_interpolation="nearest",
                             pos_embed_antialias=False)
    assert torch.equal(nearest.pos_embed[:, 1:3].detach(), model.pos_embed[:, 1:2].detach().expand(-1, 2, -1))


def test_rgb_weights_into_multispectral_model(tmp_path, tiny_mae):
    path = tmp_path / "rgb.pth"
    torch.save({"model": state(randomized(tiny_mae))}, path)
    six = build_backbone("test_mae", weights=path, in_chans=6)
    assert six.patch_embed.proj.weight.shape == (64, 6, 8, 8)
    assert "adapted from 3 to 6 channels" in record_of(six).source
    assert six(torch.randn(1, 6, 32, 32)).shape == (1, 64)


def test_mismatch_names_the_file(tmp_path, tiny_dinov2):
    path = tmp_path / "dinov2_for_mae.pth"
    torch.save(state(tiny_dinov2), path)
    with pytest.raises(CheckpointError, match=r"dinov2_for_mae\.pth.*test_mae \(embed_dim=64, depth=4, in_chans=3"):
        build_backbone("test_mae", weights=path)


def _with_url(monkeypatch, name: str, url: str | None, weights_name: str = "default") -> None:
    weights = {} if url is None else {weights_name: url}
    monkeypatch.setitem(registry.BACKBONES, name, dataclasses.replace(registry.BACKBONES[name], weights=weights))


def test_default_weights_come_from_the_torch_hub_cache_offline(tmp_path, monkeypatch, tiny_dinov2):
    model = randomized(tiny_dinov2)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _with_url(monkeypatch, "test_dinov2", "https://dl.fbaipublicfiles.com/dinov2/x/test_dinov2_pretrain.pth")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(to_dinov2_hub(state(model), torch.zeros(1, 64)), tmp_path / "hub/checkpoints/test_dinov2_pretrain.pth")
    loaded = build_backbone("test_dinov2", weights="default")
    assert_same(loaded.state_dict(), model.state_dict())
    assert "https://dl.fbaipublicfiles.com/dinov2/x/test_dinov2_pretrain.pth" in record_of(loaded).source


def test_default_without_url_or_download_fails_clearly(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=r"backbone 'test_mae' has no named weights.*dinov2_vits14"):
        build_backbone("test_mae", weights="default")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = (tmp_path / "absent" / "w.pth").as_uri()  # a failing download without touching the network
    with pytest.raises(CheckpointError, match=r"could not download.*place the file at .*hub/checkpoints/w\.pth"):
        build_backbone("test_mae", weights=url)


@pytest.mark.parametrize("weights", ["timm:vit_tiny_dinov2.fake_tag", "hf-hub:someone/tiny-vit"])
def test_online_sources_go_through_timm_pretrained(monkeypatch, tiny_dinov2, weights):
    source = randomized(tiny_dinov2)
    real_create = timm.create_model
    calls = []

    def fake_create(model_name, pretrained=False, **kwargs):
        if pretrained:
            calls.append(model_name)
            return source
        return real_create(model_name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", fake_create)
    loaded = build_backbone("test_dinov2", weights=weights)
    assert calls == [weights.removeprefix("timm:")]
    assert_same(loaded.state_dict(), source.state_dict())
    assert record_of(loaded).source.startswith(f"timm checkpoint {weights}")


@pytest.mark.slow
def test_real_dinov2_vits14_matches_timm_reference():
    path = require(DINOV2_VITS14)
    model = build_backbone("dinov2_vits14", weights=path, img_size=224).eval()
    reference = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        img_size=224,
        num_classes=0,
    ).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
    assert ours.shape == (1, 384)
    torch.testing.assert_close(ours, theirs, **FP32_NETWORK)
    assert record_of(model).mask_token.shape == (1, 384)
    assert model.pos_embed.shape == (1, 1370, 384) and input_size(model) == (224, 224)  # stored 37x37, used at 224
    assert "resampled" not in record_of(model).source


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("test_dinov2", {}), ("vit_small_patch14_reg4_dinov2", TINY | {"img_size": (32, 48)}), ("test_mae", {})],
)
def test_every_export_format_loads_back_bit_exactly(tmp_path, name, kwargs):
    """export_backbone writes timm safetensors, {'model'} and {'teacher'} files plus one shared model.json sidecar."""
    from explora.models.export import export_backbone

    model = randomized(build_backbone(name, **kwargs))
    record_of(model).mask_token = torch.randn(1, 64) if "dinov2" in name else None
    paths = export_backbone(model, tmp_path, registry.get_backbone_spec(name).timm_name)
    assert {"safetensors", "encoder", "teacher"} <= set(paths)
    for fmt, path in paths.items():
        if path.suffix == ".json":
            continue
        loaded = build_backbone(name, weights=path, **kwargs)
        assert_same(loaded.state_dict(), model.state_dict())
        if "dinov2" in name and fmt != "safetensors":
            assert torch.equal(record_of(loaded).mask_token, record_of(model).mask_token)
    # the shared sidecar gives the 4x6 grid of the non-square export to a square model
    if kwargs.get("img_size") == (32, 48):
        kept = build_backbone(name, weights=paths["encoder"], **(kwargs | {"img_size": 32}))
        assert kept.patch_embed.grid_size == (4, 6) and input_size(kept) == (32, 32)
        square = build_backbone(name, weights=paths["encoder"], pos_embed_grid=4, **(kwargs | {"img_size": 32}))
        assert square.pos_embed.shape == (1, 16, 64) and "4x6 -> 4x4" in record_of(square).source


def test_sidecar_that_contradicts_the_file_is_an_error(tmp_path, tiny_dinov2):
    path = tmp_path / "w.pth"
    torch.save(state(tiny_dinov2), path)
    (tmp_path / "w.json").write_text(json.dumps({"grid_size": [2, 3]}))
    with pytest.raises(CheckpointError, match=r"w\.pth: pos_embed \(1, 17, 64\) has 16 patch positions, not the 2x3"):
        build_backbone("test_dinov2", weights=path)


def test_registry_named_weights_are_the_published_mae_and_dinov2_files():
    mae = "https://dl.fbaipublicfiles.com/mae"
    assert registry.BACKBONES["mae_vitl16"].weights == {
        "default": f"{mae}/pretrain/mae_pretrain_vit_large_full.pth",
        "visualize": f"{mae}/visualize/mae_visualize_vit_large.pth",
        "encoder": f"{mae}/pretrain/mae_pretrain_vit_large.pth",
    }
    assert set(registry.BACKBONES["mae_vith14"].weights) == {"default", "encoder"}  # no ViT-H visualize file
    assert registry.BACKBONES["dinov2_vitb14_reg4"].weights == {
        "default": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"
    }
    assert registry.BACKBONES["mae_vitb16"].url == f"{mae}/pretrain/mae_pretrain_vit_base_full.pth"


def _tiny_mae_hub(tmp_path, monkeypatch, tiny_mae) -> tuple[nn.Module, dict]:
    """test_mae with MAE's three published file names, placed in a temporary torch hub cache (no network)."""
    model = randomized(tiny_mae)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = {
        "default": registry.MAE_FULL_URL.format(size="tiny"),
        "visualize": registry.MAE_VIS_URL.format(size="tiny"),
        "encoder": registry.MAE_URL.format(size="tiny"),
    }
    monkeypatch.setitem(registry.BACKBONES, "test_mae", dataclasses.replace(registry.BACKBONES["test_mae"],
                                                                            weights=weights))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    decoders = {"default": fake_mae_decoder(), "visualize": {k: v + 1 for k, v in fake_mae_decoder().items()}}
    for key, url in weights.items():
        torch.save(to_mae(state(model), decoders.get(key)), cache / url.rsplit("/", 1)[1])
    return model, decoders


def test_mae_named_weights_load_their_decoder_and_say_its_targets(tmp_path, monkeypatch, tiny_mae):
    model, decoders = _tiny_mae_hub(tmp_path, monkeypatch, tiny_mae)
    expected = {"default": "norm_pix", "visualize": "pixel", "encoder": None}
    for key, targets in expected.items():
        loaded = build_backbone("test_mae", weights=key)
        assert_same(loaded.state_dict(), model.state_dict())
        assert record_of(loaded).mae_decoder_targets == targets, key
        if key in decoders:
            assert_same(record_of(loaded).mae_decoder, decoders[key])
            assert "(+mae_decoder)" in record_of(loaded).source
        else:
            assert record_of(loaded).mae_decoder is None
    assert "mae_pretrain_vit_tiny_full.pth" in record_of(build_backbone("test_mae", weights="default")).source


def test_unknown_weights_name_lists_the_names_and_suggests_one(tmp_path, monkeypatch, tiny_mae):
    _tiny_mae_hub(tmp_path, monkeypatch, tiny_mae)
    with pytest.raises(CheckpointError, match=r"weights='visualise': not a weights name of 'test_mae' \(did you "
                                              r"mean 'visualize'\?\); its named weights are default, encoder, "
                                              r"visualize"):
        build_backbone("test_mae", weights="visualise")
    with pytest.raises(CheckpointError, match="'dinov2_vits14'.*named weights are default"):
        build_backbone("dinov2_vits14", weights="visualize")


@pytest.mark.parametrize(("file_name", "targets"), [("mae_visualize_vit_tiny.pth", "pixel"),
                                                    ("explora_mae_tiny_full.pth", "norm_pix"),
                                                    ("mae_tiny_decoder.pth", None)])
def test_local_mae_file_targets_follow_the_file_name(tmp_path, tiny_mae, file_name, targets):
    path = tmp_path / file_name
    torch.save(to_mae(state(randomized(tiny_mae)), fake_mae_decoder()), path)
    assert record_of(build_backbone("test_mae", weights=path)).mae_decoder_targets == targets
    torch.save(to_mae(state(tiny_mae), None), path)  # no decoder: nothing to say about its targets
    assert record_of(build_backbone("test_mae", weights=path)).mae_decoder_targets is None
