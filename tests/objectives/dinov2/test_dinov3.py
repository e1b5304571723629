"""The DinoV2-family objective on a DINOv3 (timm Eva) backbone: masked forward with registers and RoPE, split
backward, crop sizes that are multiples of 16, a tiny `explora pretrain` run that resumes exactly, the shipped
DINOv3 preset, and the optional Gram anchoring to the source model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from explora.cli.main import main
from explora.core.config import load_yaml
from explora.core.errors import ConfigError
from explora.engine.step import forward_backward
from explora.models.adapt import apply_preset
from explora.models.backbone import build_backbone
from explora.models.record import record_of
from explora.objectives.dinov2 import DinoV2Config, DinoV2Objective
from explora.presets import config_path

TINY = dict(n_prototypes=64, hidden_dim=32, bottleneck_dim=16, n_local=2, global_size=32, local_size=16,
            warmup_teacher_temp_steps=0, separate_head=True, centering="sinkhorn_knopp")


def _objective(backbone, **kw) -> DinoV2Objective:
    apply_preset(backbone, "D3-[L]-r64-reg", lora_rank=4)
    return DinoV2Objective(backbone, DinoV2Config(**{**TINY, **kw}), total_steps=10)


def _batch(obj, seed: int):
    images = torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8)
    return obj.batch_transform()(images, torch.Generator().manual_seed(seed))


def test_dinov3_objective_trains_lora_registers_and_mask_token() -> None:
    torch.manual_seed(0)
    obj = _objective(build_backbone("test_dinov3")).train()
    batch = next(b for b in (_batch(obj, s) for s in range(50)) if b["masks"].any())
    assert batch["global"].shape[-1] == 32 and batch["masks"].shape == (8, 4)  # 2x2 grid of 16-px patches
    out = obj(batch, step=0)
    assert torch.isfinite(out.loss) and out.terms["ibot"] > 0
    out.loss.backward()
    backbone = obj.student["backbone"]
    assert backbone.blocks[0].attn.qkv.lora_B.grad.abs().sum() > 0  # B = 0 at init: A gets its gradient later
    assert backbone.reg_token.grad.abs().sum() > 0 and obj.mask_token.grad.abs().sum() > 0
    assert "ibot_head" in obj.student


def test_dinov3_split_backward_gives_the_joint_gradients() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("vit_small_patch16_dinov3_qkvb", embed_dim=64, depth=2, num_heads=4, img_size=32)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    joint = _objective(copy.deepcopy(backbone), split_backward="none", n_local=4, gram_loss_weight=1.0).train()
    split = _objective(backbone, split_backward="view", n_local=4, gram_loss_weight=1.0).train()
    split.load_state_dict(joint.state_dict())
    batch = next(b for b in (_batch(joint, s) for s in range(50)) if b["masks"][:4].any() and b["masks"][4:].any())
    cpu = torch.device("cpu")
    a = forward_backward(joint, joint, batch, 3, "fp32", cpu)
    b = forward_backward(split, split, batch, 3, "fp32", cpu)
    assert split.backward_stages() > 1 and a.finite and b.finite
    ga = {n: p.grad for n, p in joint.named_parameters() if p.grad is not None}
    gb = {n: p.grad for n, p in split.named_parameters() if p.grad is not None}
    assert ga.keys() == gb.keys() and any("lora_" in k for k in ga)
    for k in ga:
        assert (gb[k] - ga[k]).norm() <= 1e-5 * ga[k].norm() + 1e-9, k


def test_crop_sizes_must_be_multiples_of_the_patch() -> None:
    with pytest.raises(ConfigError, match=r"dinov2.local_size=24 is not a multiple of the backbone's patch size 16; "
                                          r"use 16 or 32"):
        _objective(build_backbone("test_dinov3"), local_size=24)


def test_shipped_dinov3_preset_is_dinov3s_objective() -> None:
    cfg = load_yaml(config_path("dinov3_vitl16_sat_fmow_D3-L-r64"))
    d = cfg["dinov2"]
    assert cfg["model"]["name"] == "dinov3_vitl16_sat" and cfg["adapt"]["preset"] == "D3-[L]-r64"
    assert d["separate_head"] is True and d["centering"] == "sinkhorn_knopp" and d["koleo_loss_weight"] == 0.1
    assert d["global_size"] % 16 == 0 and d["local_size"] % 16 == 0
    assert tuple(d["mean"]) == (0.430, 0.411, 0.296)


PRETRAIN = ["model.name=test_dinov3", "model.weights=null", "adapt.preset=D3-[L]-r64-reg", "adapt.lora_rank=4",
            "data.image_size=32", "dinov2.n_prototypes=64", "dinov2.hidden_dim=32", "dinov2.bottleneck_dim=16",
            "dinov2.separate_head=true", "dinov2.centering=sinkhorn_knopp", "dinov2.global_size=32",
            "dinov2.local_size=16", "dinov2.n_local=2", "dinov2.warmup_teacher_temp_steps=0",
            "dinov2.gram_loss_weight=1.0", "train.batch_size=4",
            "train.num_workers=0",
            "train.log_every=1", "train.tensorboard=false", "train.precision=fp32"]


def test_dinov3_pretrain_exports_and_resumes_exactly(idx_dir, tmp_path) -> None:
    def args(out, *extra):
        return ["pretrain", *PRETRAIN, f"data.spec=fashion_mnist:{idx_dir}:rgb=true", f"output_dir={out}", *extra]

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(args(ref, "train.steps=2", "train.ckpt_every=1")) == 0
    assert json.loads((ref / "summary.json").read_text())["steps"] == 2
    assert main(args(run, "train.steps=2", "train.ckpt_every=1")) == 0
    for p in (run / "checkpoints").glob("ckpt-00000002.*"):
        p.unlink()
    (run / "summary.json").unlink()
    assert main(args(run, "train.steps=2", "train.ckpt_every=1", "--resume")) == 0
    a, b = load_file(ref / "export" / "model.safetensors"), load_file(run / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "reg_token" in a and not any("lora_" in k for k in a)
    assert "gram" in (ref / "metrics.csv").read_text().splitlines()[0].split(",")
    model = build_backbone("test_dinov3", weights=str(ref / "export" / "model.safetensors"))
    assert record_of(model).source is not None


def test_gram_loss_is_the_mse_of_normalised_patch_similarities() -> None:
    from explora.objectives.dinov2.losses import GramLoss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    sn, tn = s / s.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    want = ((sn @ sn.transpose(1, 2) - tn @ tn.transpose(1, 2)) ** 2).mean()
    torch.testing.assert_close(GramLoss()(s, t), want)
    assert float(GramLoss()(s, 3 * s)) == pytest.approx(0.0, abs=1e-12)  # scale-free
    clipped = ((sn @ sn.transpose(1, 2)).clamp_min(0) - (tn @ tn.transpose(1, 2)).clamp_min(0)) ** 2
    torch.testing.assert_close(GramLoss(remove_neg=True)(s, t), clipped.mean())


def test_gram_anchoring_to_the_source_model() -> None:
    torch.manual_seed(0)
    obj = _objective(build_backbone("test_dinov3"), gram_loss_weight=1.0).train()
    gram, student = obj.gram_teacher, obj.student["backbone"]
    assert gram is not None and not gram.training and not any(p.requires_grad for p in gram.parameters())
    assert gram.blocks[0].attn.qkv.weight is student.blocks[0].attn.qkv.weight  # frozen tensors shared
    assert gram.blocks[-1].mlp.fc1.weight is not student.blocks[-1].mlp.fc1.weight  # trained ones: a fixed copy
    before = {k: v.clone() for k, v in gram.state_dict().items()}
    unmasked = _batch(obj, 0)
    unmasked["masks"] = torch.zeros_like(unmasked["masks"])
    assert float(obj(unmasked, step=0).terms["gram"]) == pytest.approx(0.0, abs=1e-10)  # student = source
    opt = torch.optim.SGD([p for p in obj.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        out = obj(unmasked, step=step)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        obj.on_optimizer_step(step)
    out = obj(unmasked, step=2)
    assert float(out.terms["gram"]) > 1e-6  # the student moved away from the source's patch similarities
    out.loss.backward()
    assert student.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0
    assert all(torch.equal(gram.state_dict()[k], v) for k, v in before.items())  # the Gram teacher never moves
    frozen = obj.frozen_state_names()  # shared source tensors are rebuilt on resume, the fixed copies checkpointed
    assert "gram_teacher.blocks.0.attn.qkv.weight" in frozen and "gram_teacher.blocks.3.mlp.fc1.weight" not in frozen
