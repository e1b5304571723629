"""DinoV2Objective: teacher shares frozen storage, EMA, gradients, picklable transform, loss falls on a fixed batch."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from tolerances import FP32_NETWORK, FP32_ONE_OP

from explora.core.errors import ConfigError
from explora.models.record import record_of
from explora.objectives.dinov2 import DinoV2Config, DinoV2Objective
from explora.objectives.dinov2.objective import teacher_momentum, teacher_temperature

TINY = dict(n_prototypes=64, hidden_dim=32, bottleneck_dim=16, n_local=2, global_size=32, local_size=16,
            warmup_teacher_temp_steps=10)


def _explora_like(vit) -> None:
    """Freeze all but block 3 and the norms (what apply_explora does, minus LoRA)."""
    for n, p in vit.named_parameters():
        p.requires_grad_("blocks.3." in n or "norm" in n)


def _objective(vit, **kw) -> DinoV2Objective:
    _explora_like(vit)
    return DinoV2Objective(vit, DinoV2Config(**{**TINY, **kw}), total_steps=30)


def _batch(obj, b: int = 4, seed: int = 0):
    images = torch.randint(0, 256, (b, 3, 40, 40), dtype=torch.uint8)
    return obj.batch_transform()(images, torch.Generator().manual_seed(seed))


def test_teacher_shares_frozen_storage_and_has_no_grads(tiny_dinov2):
    obj = _objective(tiny_dinov2)
    s = dict(obj.student.named_parameters())
    t = dict(obj.teacher.named_parameters())
    assert s.keys() == t.keys()
    for n, p in s.items():
        if p.requires_grad:
            assert t[n].data_ptr() != p.data_ptr() and torch.equal(t[n], p)
        else:
            assert t[n] is p
        assert not t[n].requires_grad
    assert not obj.teacher.training
    obj.train()
    assert obj.student.training and not obj.teacher.training
    assert obj.mask_token.shape == (1, 64) and obj.mask_token.requires_grad
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    a = pickle.loads(pickle.dumps(obj.batch_transform()))(images, torch.Generator().manual_seed(3))
    b = obj.batch_transform()(images, torch.Generator().manual_seed(3))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the pickled copy draws the same


def test_batch_transform_keys_and_shapes(tiny_dinov2):
    obj = _objective(tiny_dinov2)
    batch = _batch(obj)
    assert batch["global"].shape == (8, 3, 32, 32) and batch["local"].shape == (8, 3, 16, 16)
    assert batch["masks"].shape == (8, 16) and batch["masks"].dtype == torch.bool
    assert int((batch["masks"].sum(1) > 0).sum()) <= 4


def test_only_trainable_params_get_grads_and_ema_leaves_frozen(tiny_dinov2):
    obj = _objective(tiny_dinov2)
    batch = _batch(obj)
    out = obj(batch, step=0)
    assert set(out.terms) >= {"dino_local", "dino_global", "ibot", "koleo", "teacher_temp", "momentum"}
    out.loss.backward()
    s = dict(obj.student.named_parameters())
    for n, p in s.items():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert all(p.grad is None for p in obj.teacher.parameters())
    trainable = {n for n, p in s.items() if p.requires_grad}
    s_ema, t_ema = obj.ema_pairs()  # the EMA touches exactly the trainable tensors, each with its own teacher copy
    assert {n for n, p in s.items() if any(p is q for q in s_ema)} == trainable
    assert len({t.data_ptr() for t in t_ema} | {p.data_ptr() for p in s_ema}) == 2 * len(trainable)
    with torch.no_grad():
        for p in s.values():
            if p.requires_grad:
                p.add_(1.0)
    t_before = {n: p.clone() for n, p in obj.teacher.named_parameters()}
    obj.on_optimizer_step(0)
    m = teacher_momentum(obj.config, 0, 30)
    for n, p in obj.teacher.named_parameters():
        if n in trainable:
            assert torch.allclose(p, m * t_before[n] + (1 - m) * s[n], **FP32_ONE_OP)
            assert not torch.equal(p, t_before[n]), n
        else:  # frozen: the student's own tensor, never written
            assert p is s[n] and torch.equal(p, t_before[n]), n
    exported = obj.export_backbone()
    assert exported is obj.teacher["backbone"] and record_of(exported).mask_token.shape == (1, 64)


def test_schedules():
    """Teacher temperature as upstream's ``np.linspace(0.04, 0.07, W)``; momentum cosine to ``total_steps``."""
    import numpy as np

    cfg = DinoV2Config(warmup_teacher_temp_steps=10)
    want = np.linspace(0.04, 0.07, 10)
    assert [round(teacher_temperature(cfg, i), 12) for i in range(10)] == [round(float(v), 12) for v in want]
    assert teacher_temperature(cfg, 9) == 0.07 and teacher_temperature(cfg, 100) == 0.07
    assert teacher_temperature(DinoV2Config(warmup_teacher_temp_steps=1), 0) == 0.04  # linspace(a, b, 1) == [a]
    assert teacher_temperature(DinoV2Config(warmup_teacher_temp_steps=0), 0) == 0.07
    assert teacher_momentum(cfg, 0, 100) == 0.992 and teacher_momentum(cfg, 100, 100) == 1.0
    assert abs(teacher_momentum(cfg, 50, 100) - 0.996) < 1e-9


def test_total_steps_is_required_and_a_short_run_warns(tiny_dinov2):
    _explora_like(tiny_dinov2)
    cfg = DinoV2Config(**{**TINY, "warmup_teacher_temp_steps": 100})
    with pytest.raises(TypeError, match="total_steps"):
        DinoV2Objective(tiny_dinov2, cfg)  # type: ignore[call-arg]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="total_steps must be a positive int"):
            DinoV2Objective(tiny_dinov2, cfg, total_steps=bad)
    with pytest.warns(UserWarning, match=r"total_steps=40 .*dinov2.warmup_teacher_temp_steps=100: the teacher "
                                         r"temperature rises from 0.04 only to 0.051818 at the last step and never "
                                         r"reaches teacher_temp=0.07"):
        DinoV2Objective(tiny_dinov2, cfg, total_steps=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DinoV2Objective(tiny_dinov2, cfg, total_steps=100)  # the last step (99) has teacher_temp: no warning


def test_weight_norm_gain_trains_and_is_an_ema_of_the_students(tiny_dinov2):
    g_name = "dino_head.last_layer.parametrizations.weight.original0"
    obj = _objective(tiny_dinov2)
    s, t = dict(obj.student.named_parameters()), dict(obj.teacher.named_parameters())
    assert s[g_name].requires_grad and g_name in obj._ema_names and t[g_name] is not s[g_name]
    obj(_batch(obj), step=0).loss.backward()
    assert s[g_name].grad is not None and s[g_name].grad.abs().sum() > 0
    frozen = _objective(tiny_dinov2, freeze_weight_norm_gain=True)
    s, t = dict(frozen.student.named_parameters()), dict(frozen.teacher.named_parameters())
    assert not s[g_name].requires_grad and t[g_name] is s[g_name]  # DINO v1: fixed at 1, shared like frozen weights


def test_separate_ibot_head_has_its_own_sizes(tiny_dinov2):
    obj = _objective(tiny_dinov2, separate_head=True, ibot_n_prototypes=48, ibot_hidden_dim=24,
                     ibot_bottleneck_dim=8, ibot_head_nlayers=2)
    head = obj.student["ibot_head"]
    assert [tuple(m.weight.shape) for m in head.mlp if isinstance(m, torch.nn.Linear)] == [(24, 64), (8, 24)]
    assert tuple(head.last_layer.weight.shape) == (48, 8)
    assert sum(p.numel() for p in head.parameters()) == (64 * 24 + 24) + (24 * 8 + 8) + 48 + 48 * 8
    assert tuple(obj.ibot_center.center.shape) == (1, 48) and tuple(obj.dino_center.center.shape) == (1, 64)
    dino = obj.student["dino_head"]
    assert [tuple(m.weight.shape) for m in dino.mlp if isinstance(m, torch.nn.Linear)] == [(32, 64), (32, 32), (16, 32)]
    same = _objective(tiny_dinov2, separate_head=True)  # None: every size from the DINO head
    assert [p.shape for p in same.student["ibot_head"].parameters()] == [p.shape for p in dino.parameters()]
    out = obj(_batch(obj), step=0)
    assert torch.isfinite(out.loss) and out.terms["ibot"] > 0
    with pytest.raises(ConfigError, match="ibot_hidden_dim.*separate_head is false"):
        DinoV2Config(ibot_hidden_dim=1024)
    with pytest.raises(ConfigError, match="ibot_head_nlayers must be positive"):
        DinoV2Config(separate_head=True, ibot_head_nlayers=0)


def test_separate_head_and_sinkhorn_run(tiny_dinov2):
    obj = _objective(tiny_dinov2, separate_head=True, centering="sinkhorn_knopp")
    assert "ibot_head" in obj.student and "ibot_head" in obj.teacher
    out = obj(_batch(obj, b=2), step=3)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert obj.student["ibot_head"].mlp[0].weight.grad is not None
    assert obj.student["dino_head"].mlp[0].weight.grad is not None
    # Sinkhorn-Knopp targets replace the EMA centres: they stay at zero (EMA centering moves them every step)
    assert torch.count_nonzero(obj.dino_center.center) == 0 and torch.count_nonzero(obj.ibot_center.center) == 0
    ema = _objective(tiny_dinov2, separate_head=True)
    ema(_batch(ema, b=2), step=3)
    assert torch.count_nonzero(ema.dino_center.center) > 0 and torch.count_nonzero(ema.ibot_center.center) > 0


def test_total_loss_falls_on_fixed_batch(tiny_dinov2):
    # Sinkhorn targets keep a fixed entropy; with EMA centering the teacher targets of a random tiny model start
    # near one-hot and flatten as the centre catches up, so the cross-entropy floor itself rises for a while.
    torch.manual_seed(0)
    obj = _objective(tiny_dinov2, centering="sinkhorn_knopp", warmup_teacher_temp_steps=0)
    batch = _batch(obj)
    params = [p for p in obj.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(30):
        out = obj(batch, step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.on_optimizer_step(step)
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def _grads(obj) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in obj.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode, stages, extra", [
    ("crop_size", 2, {}), ("view", 4, {}), ("view", 4, {"separate_head": True, "centering": "sinkhorn_knopp"})])
def test_split_backward_gives_the_joint_gradients(tiny_dinov2, mode, stages, extra):
    """Crops back-propagated in parts, one after the other: same loss, terms, gradients and teacher centre."""
    import copy

    from explora.engine.step import forward_backward

    torch.manual_seed(0)
    with torch.no_grad():  # move off the initialisation so that no term is trivially zero
        for p in tiny_dinov2.parameters():
            p.add_(0.01 * torch.randn_like(p))
    joint = _objective(copy.deepcopy(tiny_dinov2), split_backward="none", n_local=4, **extra).train()
    split = _objective(tiny_dinov2, split_backward=mode, n_local=4, **extra).train()
    split.load_state_dict(joint.state_dict())
    assert joint.backward_stages() == 1 and split.backward_stages() == stages
    batches = (_batch(joint, seed=seed) for seed in range(50))
    batch = next(b for b in batches if b["masks"][:4].any() and b["masks"][4:].any())  # masks in both views
    cpu = torch.device("cpu")
    a = forward_backward(joint, joint, batch, 3, "fp32", cpu)
    b = forward_backward(split, split, batch, 3, "fp32", cpu)
    assert a.finite and b.finite
    torch.testing.assert_close(b.loss, a.loss, **FP32_NETWORK)  # crops through the network in other batches
    assert a.terms.keys() == b.terms.keys()
    for k in a.terms:
        torch.testing.assert_close(b.terms[k], a.terms[k], **FP32_NETWORK)
    ga, gb = _grads(joint), _grads(split)
    assert ga.keys() == gb.keys() and any(k.startswith("student.backbone.blocks.3") for k in ga)
    for k in ga:  # float summation order only: per-tensor relative error at fp32 rounding level
        assert (gb[k] - ga[k]).norm() <= 1e-5 * ga[k].norm() + 1e-9, k
    for center in ("dino_center", "ibot_center"):  # the teacher ran once (with Sinkhorn-Knopp both stay zero;
        # tests/objectives/dinov2/test_reference.py checks the centres of every mode against upstream's)
        torch.testing.assert_close(getattr(split, center).center, getattr(joint, center).center)


def test_stage_plans(tiny_dinov2):
    """view: local views packed into stages of at most one global view's tokens, then each global view."""
    # patch 8: a 64-px global view has 65 tokens, a 32-px local view 17: 3 local views per stage
    obj = DinoV2Objective(tiny_dinov2, DinoV2Config(**{**TINY, "global_size": 64, "local_size": 32, "n_local": 8}),
                          total_steps=30)
    assert obj.stage_plan() == [("local", 0, 3), ("local", 3, 3), ("local", 6, 2), ("global", 0, 1), ("global", 1, 1)]
    obj.config.split_backward = "crop_size"
    assert obj.stage_plan() == [("local", 0, 8), ("global", 0, 2)]
    obj.config.split_backward = "none"
    assert obj.stage_plan() == [("all", 0, 0)] and obj.backward_stages() == 1
    assert DinoV2Config(split_backward=True).split_backward == "view"
    assert DinoV2Config(split_backward=False).split_backward == "none"
    with pytest.raises(ConfigError, match="split_backward"):
        DinoV2Config(split_backward="crops")


def test_split_backward_stage_order_and_off_switches(tiny_dinov2):
    obj = _objective(tiny_dinov2).train()
    batch = _batch(obj)
    last = obj.backward_stages() - 1
    with pytest.raises(RuntimeError, match="without stage 0"):
        obj(batch, 0, stage=last)
    with pytest.raises(ValueError, match="stage"):
        obj(batch, 0, stage=last + 1)
    obj(batch, 0, stage=0)
    with pytest.raises(RuntimeError, match="without stage 0"):  # targets belong to their step
        obj(batch, 1, stage=last)
    only_global = DinoV2Objective(tiny_dinov2, DinoV2Config(**{**TINY, "n_local": 0}), total_steps=30)
    assert only_global.stage_plan() == [("global", 0, 1), ("global", 1, 1)]
    only_global.config.split_backward = "crop_size"
    assert only_global.backward_stages() == 1
