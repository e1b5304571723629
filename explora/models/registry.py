"""Short backbone names and where their released weights live.

The paper's notation names backbones by family (DinoV2 or MAE) and size; users know the upstream file names.
This table maps both to timm architectures, so every backbone is a plain timm ``VisionTransformer`` and a merged
ExPLoRA model exports as a plain timm state dict.

The ``test_*`` entries are tiny architectures (depth 4, width 64, 32-px input) with the same module layout as their
full-size family; tests, the CPU benchmarks and the smoke run of the demo use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{stem}_pretrain.pth"
MAE_URL = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_{size}.pth"
MAE_VIS_URL = "https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_{size}.pth"


@dataclass(frozen=True)
class BackboneSpec:
    """One named backbone: the timm architecture, overrides of its constructor, and its upstream weights."""

    name: str
    timm_name: str
    family: str  # "dinov2" | "mae" | "timm"
    url: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    default_img_size: int = 224


def _dinov2(size: str, timm_size: str, reg: bool = False) -> BackboneSpec:
    arch = f"dinov2_vit{size}14"
    name = arch + ("_reg4" if reg else "")
    timm_name = f"vit_{timm_size}_patch14_" + ("reg4_" if reg else "") + "dinov2"
    return BackboneSpec(
        name=name,
        timm_name=timm_name,
        family="dinov2",
        url=DINOV2_URL.format(arch=arch, stem=name),
        default_img_size=224,
    )


BACKBONES: dict[str, BackboneSpec] = {}
for _size, _timm_size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")):
    for _reg in (False, True):
        _spec = _dinov2(_size, _timm_size, _reg)
        BACKBONES[_spec.name] = _spec
for _name, _timm, _size in (
    ("mae_vitb16", "vit_base_patch16_224", "base"),
    ("mae_vitl16", "vit_large_patch16_224", "large"),
    ("mae_vith14", "vit_huge_patch14_224", "huge"),
):
    BACKBONES[_name] = BackboneSpec(
        name=_name, timm_name=_timm, family="mae", url=MAE_URL.format(size=_size), default_img_size=224
    )

_TINY = dict(embed_dim=64, depth=4, num_heads=4, patch_size=8, img_size=32)
BACKBONES["test_dinov2"] = BackboneSpec(
    name="test_dinov2", timm_name="vit_small_patch14_dinov2", family="dinov2", timm_kwargs=_TINY, default_img_size=32
)
BACKBONES["test_mae"] = BackboneSpec(
    name="test_mae", timm_name="vit_base_patch16_224", family="mae", timm_kwargs=_TINY, default_img_size=32
)

MAE_VISUALIZE_URLS = {
    "mae_vitb16": MAE_VIS_URL.format(size="base"),
    "mae_vitl16": MAE_VIS_URL.format(size="large"),
}


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec for a short name, or a pass-through spec for any other timm ViT name."""
    if name in BACKBONES:
        return BACKBONES[name]
    family = "dinov2" if "dinov2" in name else ("mae" if name.endswith(".mae") else "timm")
    return BackboneSpec(name=name, timm_name=name, family=family)
