"""Fake upstream checkpoints for tests: a timm state dict re-laid out as each upstream project stores it
(DinoV2 hub and training, MAE, explora full), on tiny models."""


from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from explora.models.backbone import build_backbone

TINY = dict(embed_dim=64, depth=2, num_heads=4, patch_size=8, img_size=32)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every tensor with distinct random values, so a swapped or dropped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g))
    return model


def tiny(name: str, **kwargs) -> nn.Module:
    """A tiny randomized backbone: registry ``test_*`` names as is, timm DinoV2 names shrunk to ``TINY``."""
    extra = {} if name.startswith("test_") else dict(TINY)
    extra.update(kwargs)
    return randomized(build_backbone(name, **extra))


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def to_dinov2_hub(sd: dict[str, Tensor], mask_token: Tensor, cls_pos: Tensor | None = None) -> dict[str, Tensor]:
    """timm -> official DinoV2 hub flat dict (``mask_token`` (1, D); registers with a cls pos slot; SwiGLU w12/w3)."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        k = re.sub(r"mlp\.fc1\.", "mlp.w12.", k) if _is_swiglu(sd) else k
        k = re.sub(r"mlp\.fc2\.", "mlp.w3.", k) if _is_swiglu(sd) else k
        out[k] = v
    if "reg_token" in out:
        assert cls_pos is not None, "register models need the cls position embedding to unfold"
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = out["cls_token"] - cls_pos  # timm's cls = DinoV2 cls + pos_embed[:, 0]
        out["pos_embed"] = torch.cat([cls_pos, out["pos_embed"]], dim=1)  # (1, 1 + N, D)
    out["mask_token"] = mask_token
    return out


def _is_swiglu(sd: dict[str, Tensor]) -> bool:
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def to_dinov2_train(sd: dict[str, Tensor], mask_token: Tensor, chunks: int = 0) -> dict:
    """timm -> ``{'teacher': {'backbone.*', 'dino_head.*', 'ibot_head.*'}, 'student': ...}`` (optionally chunked)."""
    teacher: dict[str, Tensor] = {}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    per_chunk = max(1, depth // chunks) if chunks else 0
    for k, v in {**sd, "mask_token": mask_token}.items():
        if chunks and k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // per_chunk}.{k[len('blocks.') :]}"
        teacher["backbone." + k] = v
    teacher["dino_head.mlp.0.weight"] = torch.randn(32, 64)
    teacher["ibot_head.last_layer.weight_g"] = torch.randn(128, 1)
    student = {k: torch.zeros_like(v) for k, v in teacher.items()}  # must not be picked
    return {"teacher": student | teacher, "student": student, "iteration": 7}


def to_mae(sd: dict[str, Tensor], decoder: dict[str, Tensor] | None) -> dict:
    """timm -> MAE ``{'model': encoder (+ decoder_*, mask_token (1, 1, Dd))}`` as ``misc.save_model`` writes it."""
    model = dict(sd)
    if decoder is not None:
        model.update(decoder)
    return {"model": model, "epoch": 799}


def fake_mae_decoder(dim: int = 64, dec_dim: int = 32, n: int = 17, patch_pixels: int = 8 * 8 * 3) -> dict:
    """A one-block MAE decoder in ``models_mae.py`` key names."""
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> Tensor:
        return torch.randn(shape, generator=g)

    return {
        "mask_token": r(1, 1, dec_dim),
        "decoder_embed.weight": r(dec_dim, dim),
        "decoder_embed.bias": r(dec_dim),
        "decoder_pos_embed": r(1, n, dec_dim),
        "decoder_blocks.0.norm1.weight": r(dec_dim),
        "decoder_blocks.0.attn.qkv.weight": r(3 * dec_dim, dec_dim),
        "decoder_norm.weight": r(dec_dim),
        "decoder_pred.weight": r(patch_pixels, dec_dim),
        "decoder_pred.bias": r(patch_pixels),
    }


def to_explora_full(sd: dict[str, Tensor], mask_token: Tensor, keep_qkv: bool = True) -> dict:
    """timm -> released ExPLoRA full ``{'teacher': {'backbone.*'}}`` with split q/k/v_proj (and ``qkv`` if kept)."""
    teacher: dict[str, Tensor] = {"backbone.mask_token": mask_token}
    for k, v in sd.items():
        m = re.match(r"^(blocks\.\d+\.attn\.)qkv\.(weight|bias)$", k)
        if m:
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                teacher[f"backbone.{m.group(1)}{name}_proj.{m.group(2)}"] = part.clone()
            if not keep_qkv:
                continue
        teacher["backbone." + k] = v
    teacher["dino_head.last_layer.weight"] = torch.randn(16, 64)
    return {"teacher": teacher}


# ------------------------------------------------------------------------------------------------------------ tests


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    """Bitwise equality of two state dicts (same keys, dtypes, shapes, values)."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def to_dinov3_official(sd: dict[str, Tensor], mask_token: Tensor, k_bias_junk: float = 0.0) -> dict[str, Tensor]:
    """timm Eva -> the official DINOv3 ``.pth`` layout (``dinov3/models/vision_transformer.py``): ``storage_tokens``,
    ``ls1/ls2.gamma``, SwiGLU ``w1/w2/w3``, one ``qkv.bias`` (3D,) with a ``bias_mask`` zeroing the key part (filled
    with ``k_bias_junk`` here, which the mask must remove), ``rope_embed.periods``, ``mask_token`` (1, D)."""
    out: dict[str, Tensor] = {}
    dim = sd["cls_token"].shape[-1]
    for k, v in sd.items():
        if k.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        k = k.replace("reg_token", "storage_tokens")
        k = re.sub(r"\.gamma_1$", ".ls1.gamma", k)
        k = re.sub(r"\.gamma_2$", ".ls2.gamma", k)
        k = k.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.")
        k = k.replace("mlp.fc2.", "mlp.w3.") if "blocks.0.mlp.fc1_g.weight" in sd else k
        out[k] = v
        m = re.match(r"^(blocks\.\d+\.attn\.)qkv\.weight$", k)
        if m:
            q = sd.get(f"{m.group(1)}q_bias", torch.zeros(dim))
            val = sd.get(f"{m.group(1)}v_bias", torch.zeros(dim))
            out[f"{m.group(1)}qkv.bias"] = torch.cat([q, torch.full((dim,), k_bias_junk), val])
            out[f"{m.group(1)}qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    heads = sd["blocks.0.attn.qkv.weight"].shape[0] // 3 // 4
    out["rope_embed.periods"] = torch.arange(1, dim // heads // 4 + 1, dtype=torch.float32)
    out["mask_token"] = mask_token
    return out
