"""An explora export as a backbone in TerraTorch and torchgeo, through timm ``local-dir:`` names: the exact calls
those libraries make (read from their sources), without installing them.

- torchgeo ``ClassificationTask.config_model``: ``timm.create_model(model, num_classes=..., in_chans=...,
  pretrained=weights is True)``;
- TerraTorch ``BACKBONE_REGISTRY.build("timm_<name>", ...)``: the source prefix is split off at the first ``_``
  (the rest re-joined with ``_``), then ``TimmRegistry.build`` calls ``timm.create_model(name,
  features_only=True, **kwargs)`` and reads ``feature_info.channels()`` as ``out_channels``.
"""

from __future__ import annotations

import timm
import torch
from tolerances import FP32_NETWORK

from explora.models.adapt import apply_preset
from explora.models.backbone import build_backbone
from explora.models.export import export_backbone


def _export(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("test_dinov2").eval()
    apply_preset(model, "D-[L]-r64", lora_rank=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path / "my_run" / "export"  # underscores in the path, as TerraTorch's prefix parsing must survive
    export_backbone(model, out, "vit_small_patch14_dinov2", formats=("safetensors",))
    return model, out


def test_torchgeo_classification_task_call(tmp_path) -> None:
    model, out = _export(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    net = timm.create_model(f"local-dir:{out}", num_classes=10, in_chans=3, pretrained=True).eval()
    assert net(x).shape == (2, 10)  # a new head for the task, on the exported backbone
    torch.testing.assert_close(net.forward_features(x), model.forward_features(x), **FP32_NETWORK)
    multispectral = timm.create_model(f"local-dir:{out}", num_classes=10, in_chans=6, pretrained=True).eval()
    assert multispectral(torch.randn(2, 6, 32, 32)).shape == (2, 10)  # timm adapts the RGB patch filters


def test_terratorch_timm_backbone_call(tmp_path) -> None:
    model, out = _export(tmp_path)
    registry_name = f"timm_local-dir:{out}"
    prefix, *rest = registry_name.split("_")  # terratorch MultiSourceRegistry._parse_prefix
    assert prefix == "timm"
    backbone = timm.create_model("_".join(rest), features_only=True, pretrained=True, out_indices=(1, 3)).eval()
    assert backbone.feature_info.channels() == [64, 64]
    x = torch.randn(2, 3, 48, 48)  # another size than the export's 32 px: the position embedding is interpolated
    features = backbone(x)
    want = model.forward_intermediates(x, indices=(1, 3), output_fmt="NCHW", intermediates_only=True)
    assert [tuple(f.shape) for f in features] == [(2, 64, 6, 6)] * 2
    for got, ref in zip(features, want, strict=True):
        torch.testing.assert_close(got, ref, **FP32_NETWORK)
