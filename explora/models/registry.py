"""Short backbone names and where their released weights live.

The paper's notation names backbones by family (DinoV2 or MAE) and size; users know the upstream file names.
This table maps both to timm architectures, so every backbone is a plain timm ``VisionTransformer`` and a merged
ExPLoRA model exports as a plain timm state dict.

Each registry backbone has *named weights* (``build_backbone(name, weights="<weights name>")``): DinoV2 ``default``
(the hub file); MAE ``default`` = ``mae_pretrain_vit_*_full.pth`` (encoder + decoder trained on normalised pixels,
``norm_pix_loss``), ``visualize`` = ``mae_visualize_vit_*.pth`` (encoder + decoder trained on raw pixels; base and
large only) and ``encoder`` = ``mae_pretrain_vit_*.pth`` (encoder only). File names as published in the MAE README
("Pre-trained checkpoints", the ``_full`` variants; ``demo/mae_visualize.ipynb`` for the visualize ones).

DINOv3 (Siméoni et al., 2025, arXiv:2508.10104) backbones are timm ``Eva`` models (RoPE, 4 register tokens,
LayerScale; ecosystem-notes §11), named after the official hub entries (``dinov3/hub/backbones.py``:
``dinov3_vits16`` ... ``dinov3_vit7b16``; ``_sat`` for the SAT-493M satellite weights). Their official ``.pth`` files
are gated downloads without a fixed URL, so their named weights are timm's hub copies (``default``:
``timm:<arch>.<tag>``, online); a local official file loads by path (:mod:`explora.models.checkpoints` converts its
layout). The short names map to timm's default models without the ``qkv`` bias (timm ``eva.py``: the distilled
B/L/H+ weights have all-zero ``qkv`` biases; a non-zero bias is refused, not dropped); the ``*_qkvb`` timm names,
which keep a q/v bias, work by timm name. They carry the DINOv3 License
(``license``), which a distributed derivative keeps; the satellite ones their own normalisation (``mean``/``std``).

The ``test_*`` entries are tiny architectures (depth 4, width 64, 32-px input) with the same module layout as their
full-size family; tests, the CPU benchmarks and the smoke run of the demo use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from timm.models import get_pretrained_cfg

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{stem}_pretrain.pth"
MAE_URL = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_{size}.pth"
MAE_FULL_URL = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_{size}_full.pth"
SATMAE_LICENSE = "cc-by-nc-4.0"  # SatMAE code and weights (ecosystem-notes: SatMAE, "License: CC-BY-NC 4.0")
MAE_VIS_URL = "https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_{size}.pth"


@dataclass(frozen=True)
class BackboneSpec:
    """One named backbone: the timm architecture, overrides of its constructor, and its upstream weights.

    ``weights`` maps weights names to URLs (``"default"`` is what ``weights="default"`` loads).
    ``default_img_size`` is the input size the model is used at when the caller gives none (the paper's 224);
    ``native_img_size`` the size whose patch grid the position embedding is stored at when there is no checkpoint to
    take it from (the upstream checkpoint's: DinoV2 518 = 37x37 patches of 14 px, MAE 224); None keeps timm's.
    """

    name: str
    timm_name: str
    family: str  # "dinov2" | "mae" | "timm"
    weights: dict[str, str] = field(default_factory=dict)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    default_img_size: int = 224
    native_img_size: int | None = None
    license: str | None = None  # the weights' licence as timm tags it (``dinov3-license``); None: timm's tag
    mean: tuple[float, float, float] | None = None  # input normalisation of the weights; None: timm's
    std: tuple[float, float, float] | None = None

    @property
    def url(self) -> str | None:
        """The URL of the ``default`` weights, None when there are none."""
        return self.weights.get("default")


def _dinov2(size: str, timm_size: str, reg: bool = False) -> BackboneSpec:
    arch = f"dinov2_vit{size}14"
    name = arch + ("_reg4" if reg else "")
    timm_name = f"vit_{timm_size}_patch14_" + ("reg4_" if reg else "") + "dinov2"
    return BackboneSpec(
        name=name,
        timm_name=timm_name,
        family="dinov2",
        weights={"default": DINOV2_URL.format(arch=arch, stem=name)},
        default_img_size=224,
        native_img_size=518,  # dinov2/hub/backbones.py: img_size=518 (37x37 position embeddings)
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
    _weights = {"default": MAE_FULL_URL.format(size=_size), "encoder": MAE_URL.format(size=_size)}
    if _size != "huge":  # MAE publishes no visualize checkpoint of ViT-H
        _weights["visualize"] = MAE_VIS_URL.format(size=_size)
    BACKBONES[_name] = BackboneSpec(
        name=_name, timm_name=_timm, family="mae", weights=_weights, default_img_size=224,
        native_img_size=224,  # MAE models_mae.py: img_size=224 (14x14 / 16x16 position embeddings)
    )

DINOV3_LICENSE = "dinov3-license"
# SAT-493M normalisation (dinov3 README "Pretrained models", satellite; timm eva.py ``*.sat493m`` cfgs)
DINOV3_SAT_MEAN, DINOV3_SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
for _name, _timm, _tag in (
    ("dinov3_vits16", "vit_small_patch16_dinov3", "lvd1689m"),
    ("dinov3_vits16plus", "vit_small_plus_patch16_dinov3", "lvd1689m"),
    ("dinov3_vitb16", "vit_base_patch16_dinov3", "lvd1689m"),
    ("dinov3_vitl16", "vit_large_patch16_dinov3", "lvd1689m"),
    ("dinov3_vitl16_sat", "vit_large_patch16_dinov3", "sat493m"),
    ("dinov3_vith16plus", "vit_huge_plus_patch16_dinov3", "lvd1689m"),
    ("dinov3_vit7b16", "vit_7b_patch16_dinov3", "lvd1689m"),
    ("dinov3_vit7b16_sat", "vit_7b_patch16_dinov3", "sat493m"),
):
    _sat = _tag == "sat493m"
    BACKBONES[_name] = BackboneSpec(
        name=_name, timm_name=f"{_timm}.{_tag}", family="dinov3", weights={"default": f"timm:{_timm}.{_tag}"},
        default_img_size=224, license=DINOV3_LICENSE,
        mean=DINOV3_SAT_MEAN if _sat else IMAGENET_MEAN, std=DINOV3_SAT_STD if _sat else IMAGENET_STD,
    )

_TINY = dict(embed_dim=64, depth=4, num_heads=4, patch_size=8)
BACKBONES["test_dinov2"] = BackboneSpec(
    name="test_dinov2", timm_name="vit_small_patch14_dinov2", family="dinov2", timm_kwargs=_TINY,
    default_img_size=32, native_img_size=32,
)
BACKBONES["test_mae"] = BackboneSpec(
    name="test_mae", timm_name="vit_base_patch16_224", family="mae", timm_kwargs=_TINY,
    default_img_size=32, native_img_size=32,
)
BACKBONES["test_dinov3"] = BackboneSpec(
    name="test_dinov3", timm_name="vit_small_patch16_dinov3.lvd1689m", family="dinov3",
    timm_kwargs=dict(embed_dim=64, depth=4, num_heads=4), default_img_size=32, license=DINOV3_LICENSE,
    mean=IMAGENET_MEAN, std=IMAGENET_STD,
)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec for a short name, or a pass-through spec for any other timm ViT name."""
    if name in BACKBONES:
        return BACKBONES[name]
    if "dinov3" in name:
        return BackboneSpec(name=name, timm_name=name, family="dinov3", license=DINOV3_LICENSE)
    family = "dinov2" if "dinov2" in name else ("mae" if name.endswith(".mae") else "timm")
    return BackboneSpec(name=name, timm_name=name, family=family)


def base_license(timm_name: str, family: str | None = None, source: str | None = None) -> str | None:
    """The licence of the weights an export derives from: timm's ``pretrained_cfg["license"]`` of the base model
    (``apache-2.0`` for DinoV2, ``dinov3-license`` for DINOv3, ``cc-by-nc-4.0`` for the MAE weights, as the MAE
    repository's LICENSE says), CC-BY-NC-4.0 when the weights came from a SatMAE file; None when unknown.

    An untagged MAE name (the registry's ``vit_large_patch16_224``) is looked up with timm's ``.mae`` tag, whose
    weights it loads; any other untagged name resolves to timm's default tag.
    """
    if source and "satmae" in str(source).lower():
        return SATMAE_LICENSE
    name = timm_name if "." in timm_name or family != "mae" else f"{timm_name}.mae"
    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - timm raises different errors across versions for unknown names
        cfg = None
    value = getattr(cfg, "license", None) if cfg is not None else None
    return str(value) if value else None

