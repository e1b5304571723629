"""The RGB MAE objective against an independent plain-torch transcription of MAE's forward.

The reference follows facebookresearch/mae ``models_mae.py`` (``MaskedAutoencoderViT``: ``random_masking``,
``forward_encoder``, ``forward_decoder``, ``forward_loss``) step by step on raw tensors from the state dict. It
calls none of explora's masking, decoder, loss or LoRA forward code and no timm module: transformer blocks are
written out (pre-norm attention + MLP, LayerNorm eps 1e-6 as MAE's ``norm_layer``), and a LoRA-carrying ``qkv``
is ``W + (alpha / r) * B @ A`` on its q and v row slices (Hu et al. 2021). Same weights, same noise: the losses
must agree to fp32 rounding.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from explora.models.adapt import apply_preset
from explora.models.backbone import build_backbone
from explora.objectives.mae import MAEConfig, MAEObjective

EPS = 1e-6  # MAE: norm_layer=partial(nn.LayerNorm, eps=1e-6)
ENC_HEADS, ENC_RANK, ENC_ALPHA = 4, 4, 2.0  # test_mae: 4 heads; encoder LoRA r4, alpha 2 -> scaling 1/2
DEC = dict(decoder_dim=32, decoder_depth=2, decoder_heads=4, decoder_lora_rank=2, decoder_lora_alpha=1.0)
PATCH, MASK_RATIO = 8, 0.75


# --- the reference: plain torch on a state dict ------------------------------------------------------------------


def ref_qkv_weight(sd: dict[str, torch.Tensor], prefix: str, scaling: float) -> torch.Tensor:
    """Fused qkv weight (3*dim, in) with the LoRA updates of the q and v slices folded in (K untouched)."""
    w = sd[f"{prefix}.weight"].clone()
    if f"{prefix}.lora_A" not in sd:
        return w
    dim = w.shape[0] // 3
    a, b = sd[f"{prefix}.lora_A"], sd[f"{prefix}.lora_B"]  # (2, r, in), (2, dim, r): targets q, v
    w[:dim] += scaling * b[0] @ a[0]
    w[2 * dim :] += scaling * b[1] @ a[1]
    return w


def ref_block(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, heads: int, scaling: float) -> torch.Tensor:
    """timm/MAE ``Block``: x + attn(LN(x)); x + mlp(LN(x)). x (B, N, D)."""
    B, N, D = x.shape
    h = F.layer_norm(x, (D,), sd[f"{prefix}.norm1.weight"], sd[f"{prefix}.norm1.bias"], EPS)
    qkv = h @ ref_qkv_weight(sd, f"{prefix}.attn.qkv", scaling).T + sd[f"{prefix}.attn.qkv.bias"]  # (B, N, 3D)
    q, k, v = qkv.reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # each (B, H, N, d)
    attn = (q @ k.transpose(-2, -1) / math.sqrt(D // heads)).softmax(dim=-1)  # (B, H, N, N)
    out = (attn @ v).transpose(1, 2).reshape(B, N, D)
    x = x + out @ sd[f"{prefix}.attn.proj.weight"].T + sd[f"{prefix}.attn.proj.bias"]
    h = F.layer_norm(x, (D,), sd[f"{prefix}.norm2.weight"], sd[f"{prefix}.norm2.bias"], EPS)
    h = F.gelu(h @ sd[f"{prefix}.mlp.fc1.weight"].T + sd[f"{prefix}.mlp.fc1.bias"])
    return x + h @ sd[f"{prefix}.mlp.fc2.weight"].T + sd[f"{prefix}.mlp.fc2.bias"]


def ref_mae(
    enc: dict[str, torch.Tensor],
    dec: dict[str, torch.Tensor],
    imgs: torch.Tensor,
    noise: torch.Tensor,
    norm_pix_loss: bool,
    dec_heads: int,
    dec_scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE ``forward``: (loss, pred (B, L, p*p*3)) from encoder and decoder state dicts, images and noise."""
    B = imgs.shape[0]
    # forward_encoder: patch embed, + pos (without cls row), masking, cls + its pos, blocks, norm
    x = F.conv2d(imgs, enc["patch_embed.proj.weight"], enc["patch_embed.proj.bias"], stride=PATCH)  # (B, D, h, w)
    x = x.flatten(2).transpose(1, 2)  # (B, L, D)
    x = x + enc["pos_embed"][:, 1:]
    L, D = x.shape[1:]
    len_keep = int(L * (1 - MASK_RATIO))
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(B, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # 0 keep, 1 remove
    cls = (enc["cls_token"] + enc["pos_embed"][:, :1]).expand(B, -1, -1)
    x = torch.cat([cls, x], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in enc if k.startswith("blocks."))
    for i in range(depth):
        x = ref_block(x, enc, f"blocks.{i}", ENC_HEADS, ENC_ALPHA / ENC_RANK)
    x = F.layer_norm(x, (D,), enc["norm.weight"], enc["norm.bias"], EPS)

    # forward_decoder: embed, append mask tokens, unshuffle, cls back, + pos, blocks, norm, pred, drop cls
    x = x @ dec["decoder_embed.weight"].T + dec["decoder_embed.bias"]
    Dd = x.shape[-1]
    mask_tokens = dec["mask_token"].repeat(B, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, Dd))  # unshuffle
    x = torch.cat([x[:, :1], x_], dim=1)
    x = x + dec["decoder_pos_embed"]
    dec_depth = 1 + max(int(k.split(".")[1]) for k in dec if k.startswith("decoder_blocks."))
    for i in range(dec_depth):
        x = ref_block(x, dec, f"decoder_blocks.{i}", dec_heads, dec_scaling)
    x = F.layer_norm(x, (Dd,), dec["decoder_norm.weight"], dec["decoder_norm.bias"], EPS)
    pred = (x @ dec["decoder_pred.weight"].T + dec["decoder_pred.bias"])[:, 1:]

    # forward_loss: patchify 'nchpwq->nhwpqc', norm-pix per patch (unbiased var, eps 1e-6), removed patches only
    h = w = imgs.shape[2] // PATCH
    target = imgs.reshape(B, 3, h, PATCH, w, PATCH)
    target = torch.einsum("nchpwq->nhwpqc", target).reshape(B, h * w, PATCH * PATCH * 3)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # (B, L) mean loss per patch
    return (loss * mask).sum() / mask.sum(), pred


# --- explora's objective on the same weights ----------------------------------------------------------------------


def _objective(norm_pix_loss: bool) -> MAEObjective:
    torch.manual_seed(0)
    backbone = build_backbone("test_mae")
    apply_preset(backbone, "D-[L]-r64", lora_rank=ENC_RANK, lora_alpha=ENC_ALPHA)  # block 3 full, LoRA on 0-2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random test backbone: no decoder in the checkpoint
        obj = MAEObjective(backbone, MAEConfig(norm_pix_loss=norm_pix_loss, mask_ratio=MASK_RATIO, **DEC))
    with torch.no_grad():  # LoRA B starts at zero (a no-op): give every LoRA pair a real update
        for name, p in obj.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.2)
        for blk in obj.encoder.blocks:  # non-trivial norms too (they train in ExPLoRA)
            blk.norm1.weight.uniform_(0.5, 1.5)
            blk.norm2.bias.normal_(0.0, 0.1)
    return obj.eval()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("norm_pix_loss", [True, False], ids=["norm_pix", "pixel"])
def test_mae_loss_equals_plain_torch_transcription(norm_pix_loss):
    obj = _objective(norm_pix_loss)
    enc, dec = _state(obj.encoder), _state(obj.decoder)
    assert sum(k.endswith("lora_A") for k in enc) == 3 and sum(k.endswith("lora_A") for k in dec) == 2
    gen = torch.Generator().manual_seed(3)
    imgs = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 0.5
    noise = torch.rand(3, 16, generator=gen)

    ref_loss, ref_pred = ref_mae(enc, dec, imgs, noise, norm_pix_loss, DEC["decoder_heads"],
                                 DEC["decoder_lora_alpha"] / DEC["decoder_lora_rank"])
    with torch.no_grad():
        pred, mask = obj.predict({"images": imgs, "noise": noise})
        loss = obj({"images": imgs, "noise": noise}, 0).loss
    assert mask.mask.sum().item() == 3 * 12
    scale = ref_pred.abs().max().item()
    torch.testing.assert_close(pred, ref_pred, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)


def test_lora_and_masking_matter_to_the_reference():
    """The comparison above is sensitive: dropping either LoRA, or another mask, moves the prediction far more
    than its tolerance (1e-4 relative)."""
    obj = _objective(True)
    enc, dec = _state(obj.encoder), _state(obj.decoder)
    gen = torch.Generator().manual_seed(3)
    imgs, noise = torch.rand(3, 3, 32, 32, generator=gen), torch.rand(3, 16, generator=gen)
    args = (True, DEC["decoder_heads"], DEC["decoder_lora_alpha"] / DEC["decoder_lora_rank"])
    pred = ref_mae(enc, dec, imgs, noise, *args)[1]
    variants = {
        "no decoder LoRA": ref_mae(enc, {k: v for k, v in dec.items() if "lora_" not in k}, imgs, noise, *args)[1],
        "no encoder LoRA": ref_mae({k: v for k, v in enc.items() if "lora_" not in k}, dec, imgs, noise, *args)[1],
        "other mask": ref_mae(enc, dec, imgs, noise.flip(1), *args)[1],
    }
    for what, other in variants.items():
        assert (other - pred).abs().max() > 1e-2 * pred.abs().max(), what
