"""A merged DINOv3 ExPLoRA export loads with plain ``timm.create_model("vit_small_patch16_dinov3")`` and gives the
adapted model's outputs (fp32, 1e-5), states the DINOv3 licence, and loads back through explora's readers."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from explora.models.adapt import apply_preset
from explora.models.backbone import build_backbone
from explora.models.export import export_backbone, load_exported
from explora.models.registry import DINOV3_LICENSE, get_backbone_spec

TINY = dict(embed_dim=64, depth=2, num_heads=4, img_size=32)


def _adapted(name: str, preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_backbone(name, **TINY).eval()
    with torch.no_grad():  # the frozen q/v biases of the _qkvb variant non-zero, so the export must carry them
        for n, p in model.named_parameters():
            if n.endswith(("q_bias", "v_bias")) or "gamma_" in n:
                p.normal_(0, 0.3)
    apply_preset(model, preset, lora_rank=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name,plain,preset", [
    ("dinov3_vits16", "vit_small_patch16_dinov3", "D3-[L]-r64-reg"),
    ("vit_small_patch16_dinov3_qkvb", "vit_small_patch16_dinov3_qkvb", "D3-[L-1,L]-r32"),
])
def test_merged_export_loads_in_plain_timm_and_matches(tmp_path, name: str, plain: str, preset: str) -> None:
    model = _adapted(name, preset)
    x = torch.randn(2, 3, 48, 64)  # another size than the build size: RoPE follows the grid
    with torch.no_grad():
        expected = model(x)
    paths = export_backbone(model, tmp_path, get_backbone_spec(name).timm_name)
    side = json.loads(paths["sidecar"].read_text())
    assert side["license"] == DINOV3_LICENSE and side["family"] == "dinov3" and side["pos_embed_grid"] is None
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in side["model_args"].items()}
    loaded = timm.create_model(plain, pretrained=False, **args).eval()
    loaded.load_state_dict(load_file(paths["safetensors"]), strict=True)
    with torch.no_grad():
        got = loaded(x)
        assert (got - expected).abs().max() <= 1e-5
        assert (load_exported(tmp_path).eval()(x) - expected).abs().max() <= 1e-5
        for kind in ("encoder", "teacher"):
            back = build_backbone(name, weights=str(paths[kind]), **TINY).eval()
            assert (back(x) - expected).abs().max() <= 1e-5
