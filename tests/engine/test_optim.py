"""Optimiser groups, schedules and clipping as DinoV2 applies them: exact lr / weight decay per tensor, weight
decay on tokens, the last layer frozen by lr 0 (moments accumulate), gradient clipping per student module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explora.core.errors import ConfigError
from explora.engine.optim import apply_schedules, build_optimizer, build_param_groups, clip_gradients
from explora.engine.trainer import OptimConfig, TrainConfig, clip_partition, train
from explora.models.adapt import apply_preset
from explora.objectives.base import Objective, ObjectiveOutput


def _dinov2(tiny_dinov2, **cfg):
    from explora.objectives.dinov2.config import DinoV2Config
    from explora.objectives.dinov2.objective import DinoV2Objective

    apply_preset(tiny_dinov2, "D-[L]-r64", train_tokens=True, train_patch_embed=True, train_pos_embed=True)
    cfg = {"global_size": 32, "local_size": 16, **cfg}  # multiples of the tiny model's 8-px patch
    return DinoV2Objective(tiny_dinov2, DinoV2Config(n_prototypes=64, hidden_dim=32, bottleneck_dim=16, **cfg),
                           total_steps=10)


def _lr_wd(optimizer: torch.optim.Optimizer, objective: nn.Module) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in objective.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


LAST = "student.dino_head.last_layer.parametrizations.weight.original1"


@pytest.mark.parametrize("decay_tokens", [True, False])
def test_lr_and_weight_decay_of_each_tensor(tiny_dinov2, decay_tokens):
    """Depth 4, layer decay 0.9: embeddings are layer 0 (0.9^5), block 3 is layer 4 (0.9^1), heads 1; patch
    embedding x 0.2; no weight decay on 1-D tensors and biases; tokens decayed unless decay_tokens is False."""
    objective = _dinov2(tiny_dinov2)
    groups = build_param_groups(objective.named_parameters(), num_layers=4, layer_decay=0.9,
                                patch_embed_lr_mult=0.2, decay_tokens=decay_tokens)
    optimizer = build_optimizer(groups, (0.9, 0.999), fused=False)
    apply_schedules(optimizer, lr=0.1, wd=0.04, last_layer_lr=0.0)
    got = _lr_wd(optimizer, objective)
    token_wd = 0.04 if decay_tokens else 0.0
    expected = {
        "mask_token": (0.1 * 0.9**5, token_wd),
        "student.backbone.cls_token": (0.1 * 0.9**5, token_wd),
        "student.backbone.pos_embed": (0.1 * 0.9**5, token_wd),
        "student.backbone.patch_embed.proj.weight": (0.1 * 0.9**5 * 0.2, 0.04),
        "student.backbone.patch_embed.proj.bias": (0.1 * 0.9**5 * 0.2, 0.0),
        "student.backbone.blocks.0.attn.qkv.lora_A": (0.1 * 0.9**4, 0.04),  # LoRA A/B: 2-D, decayed
        "student.backbone.blocks.2.attn.qkv.lora_B": (0.1 * 0.9**2, 0.04),
        "student.backbone.blocks.1.norm1.weight": (0.1 * 0.9**3, 0.0),
        "student.backbone.blocks.3.attn.qkv.weight": (0.1 * 0.9, 0.04),
        "student.backbone.blocks.3.attn.qkv.bias": (0.1 * 0.9, 0.0),
        "student.backbone.blocks.3.ls1.gamma": (0.1 * 0.9, 0.0),
        "student.backbone.norm.weight": (0.1, 0.0),
        "student.dino_head.mlp.0.weight": (0.1, 0.04),
        "student.dino_head.mlp.4.bias": (0.1, 0.0),
        LAST: (0.0, 0.04),  # frozen: lr 0; decoupled weight decay (lr x wd) does not act either
    }
    for name, (lr, wd) in expected.items():
        assert got[name] == pytest.approx((lr, wd), rel=1e-12, abs=0), name
    apply_schedules(optimizer, lr=0.1, wd=0.04, last_layer_lr=0.1)
    assert _lr_wd(optimizer, objective)[LAST] == pytest.approx((0.1, 0.04), rel=1e-12)
    assert len(got) == sum(p.requires_grad for p in objective.parameters())


def test_clipping_per_group_and_global():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))

    def grads():
        a.grad, b.grad = torch.tensor([6.0, 0.0]), torch.tensor([0.0, 8.0])

    grads()
    assert float(clip_gradients([[a], [b]], 3.0)) == pytest.approx(10.0)  # the total norm before clipping
    assert float(a.grad.norm()) == pytest.approx(3.0) and float(b.grad.norm()) == pytest.approx(3.0)
    grads()
    assert float(clip_gradients([[a, b]], 3.0)) == pytest.approx(10.0)
    assert float(a.grad.norm()) == pytest.approx(1.8) and float(b.grad.norm()) == pytest.approx(2.4)
    grads()
    assert float(clip_gradients([[a], [b]], 0.0)) == pytest.approx(10.0)  # 0: measured, not clipped
    assert a.grad.tolist() == [6.0, 0.0] and b.grad.tolist() == [0.0, 8.0]
    b.grad = None  # a group without gradients is skipped
    assert float(clip_gradients([[a], [b]], 3.0)) == pytest.approx(6.0) and float(a.grad.norm()) == pytest.approx(3)


@pytest.mark.parametrize("separate_head", [False, True])
def test_dinov2_clip_groups_are_the_student_modules(tiny_dinov2, separate_head):
    objective = _dinov2(tiny_dinov2, separate_head=separate_head)
    groups = objective.clip_groups()
    assert list(groups) == ["backbone", "dino_head", *(["ibot_head"] if separate_head else [])]
    assert any(p is objective.mask_token for p in groups["backbone"])  # a backbone parameter upstream
    params = [p for g in build_param_groups(objective.named_parameters(), num_layers=4) for p in g["params"]]
    partition = clip_partition(objective, params, "per_module")
    assert sorted(map(id, params)) == sorted(id(p) for g in partition for p in g)
    assert clip_partition(objective, params, "global") == [params]
    assert OptimConfig().clip_grad_mode == "per_module"  # DinoV2's default, see OptimConfig


def test_clip_groups_that_miss_a_tensor_are_refused(tiny_dinov2):
    objective = _dinov2(tiny_dinov2)
    params = [p for p in objective.parameters() if p.requires_grad]
    objective.clip_groups = lambda: {"backbone": [objective.mask_token]}
    with pytest.raises(ConfigError, match=r"does not partition the trainable tensors.*clip_grad_mode=global"):
        clip_partition(objective, params, "per_module")


class _Head(Objective):
    """A frozen feature layer and a trainable ``last_layer`` (the name the engine freezes)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(12, 16)])
        self.blocks.requires_grad_(False)
        self.last_layer = nn.Linear(16, 4)

    def batch_transform(self):
        return lambda images, g: {"x": images.float().flatten(1)}

    def forward(self, batch, step):
        loss = (self.last_layer(torch.relu(self.blocks[0](batch["x"]))) - batch["x"][:, :4]).pow(2).mean()
        return ObjectiveOutput(loss, {"mse": loss.detach()})


class _Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x = torch.randn(24, 3, 2, 2, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], -1


def _run(tmp_path, freeze: int, steps: int):
    torch.manual_seed(0)
    obj = _Head()
    start = obj.last_layer.weight.detach().clone()
    optim = OptimConfig(base_lr=1e-2, lr_scaling="none", warmup_steps=0, layer_decay=1.0, weight_decay=0.5,
                        weight_decay_end=0.5, freeze_last_layer_steps=freeze)
    cfg = TrainConfig(steps=steps, batch_size=4, ckpt_every=1, keep_last=10, log_every=1, num_workers=0,
                      precision="fp32", tensorboard=False)
    train(obj, _Data(), optim, cfg, tmp_path)
    return obj, start


def _grad_norms(run) -> list[float]:
    import csv

    with open(run / "metrics.csv") as f:
        return [float(r["grad_norm"]) for r in csv.DictReader(f)]


def test_frozen_last_layer_keeps_its_weights_but_counts_and_accumulates_moments(tmp_path):
    obj, start = _run(tmp_path / "frozen", freeze=2, steps=3)
    ckpt = torch.load(tmp_path / "frozen" / "checkpoints" / "ckpt-00000002.pt", weights_only=True)
    assert torch.equal(ckpt["objective"]["last_layer.weight"], start)  # no update, no weight decay (lr 0)
    state = ckpt["optimizer"]["state"]
    assert len(state) == 2 and all(int(s["step"]) == 2 for s in state.values())
    assert all(float(s["exp_avg"].abs().sum()) > 0 and float(s["exp_avg_sq"].sum()) > 0 for s in state.values())
    assert not torch.equal(obj.last_layer.weight, start)  # step 2: the freeze is over
    # the frozen layer's gradients are part of the clipped / logged norm: the same as without a freeze at step 0
    _run(tmp_path / "free", freeze=0, steps=1)
    assert _grad_norms(tmp_path / "frozen")[0] == _grad_norms(tmp_path / "free")[0]
