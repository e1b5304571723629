"""LoRA layers: zero init, exact slices of the fused qkv, merge/unmerge, merged state dicts, peft parity."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tolerances import FP32_NETWORK, FP32_ONE_OP
from torch import nn

from explora.core.errors import ConfigError
from explora.vit.lora import (
    LoRALinear,
    LoRAQKV,
    inject_lora,
    lora_modules,
    merge_lora,
    merged_state_dict,
    remove_lora,
    unmerge_lora,
)


def _randomise_b(model: nn.Module, std: float = 0.2) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


def test_lora_linear_matches_hand_computation() -> None:
    base = nn.Linear(5, 3)
    layer = LoRALinear.from_linear(base, rank=2, alpha=4)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.lora_A.shape == (2, 5) and layer.lora_B.shape == (3, 2)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(5)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert layer.lora_A.abs().max() <= bound
    _randomise_b(layer)
    x = torch.randn(7, 5)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)  # scale 4/2
    torch.testing.assert_close(layer(x), expected, **FP32_ONE_OP)


def test_lora_qkv_touches_only_target_slices() -> None:
    dim = 8
    base = nn.Linear(dim, 3 * dim)
    layer = LoRAQKV.from_linear(base, rank=2, targets=("v", "q"))
    assert layer.targets == ("q", "v")
    assert layer.lora_A.shape == (2, 2, dim) and layer.lora_B.shape == (2, dim, 2)
    _randomise_b(layer)
    x = torch.randn(3, 4, dim)
    out = layer(x) - base(x)  # (3, 4, 3*dim): the LoRA contribution only
    q, k, v = out.split(dim, dim=-1)
    assert torch.count_nonzero(k) == 0
    torch.testing.assert_close(q, x @ layer.lora_A[0].T @ layer.lora_B[0].T, **FP32_ONE_OP)  # alpha = rank -> scale 1
    torch.testing.assert_close(v, x @ layer.lora_A[1].T @ layer.lora_B[1].T, **FP32_ONE_OP)
    # delta_weight is the same update laid out like weight
    torch.testing.assert_close(out, x @ layer.delta_weight().T, **FP32_ONE_OP)


@pytest.mark.parametrize("targets", [("q", "v"), ("k",), ("q", "k", "v"), ("v",)])
def test_lora_qkv_forward_and_gradients_match_the_merged_weight(targets) -> None:
    """The training path (base matmul + one in-place addmm of ``low @ up_weight()``) gives the outputs and the
    gradients of ``F.linear(x, W + delta_weight())`` for every target subset, with a scaling other than 1."""
    dim = 8
    torch.manual_seed(0)
    layer = LoRAQKV.from_linear(nn.Linear(dim, 3 * dim), rank=2, alpha=6, targets=targets)  # scaling 3
    _randomise_b(layer)
    up = layer.up_weight()  # (T*r, 3*dim): zeros outside the targets' columns
    assert up.shape == (len(targets) * 2, 3 * dim)
    for i, name in enumerate(("q", "k", "v")):
        assert (torch.count_nonzero(up[:, i * dim:(i + 1) * dim]) > 0) == (name in targets)
    x = torch.randn(3, 5, dim, requires_grad=True)
    out = layer(x)  # (3, 5, 3*dim)
    ref_layer = copy.deepcopy(layer)
    xr = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(xr, ref_layer.weight + ref_layer.delta_weight(), ref_layer.bias)
    torch.testing.assert_close(out, ref, **FP32_ONE_OP)
    g = torch.randn_like(out)  # gradients: several ops summed in other orders, so the network tolerance
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, **FP32_NETWORK)
    torch.testing.assert_close(layer.lora_A.grad, ref_layer.lora_A.grad, **FP32_NETWORK)
    torch.testing.assert_close(layer.lora_B.grad, ref_layer.lora_B.grad, **FP32_NETWORK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = layer(x)
    assert low_precision.dtype == torch.bfloat16
    torch.testing.assert_close(low_precision.float(), ref.detach(), atol=0.1, rtol=0.05)


def test_zero_init_leaves_outputs_unchanged(tiny_mae) -> None:
    model = tiny_mae.eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    names = inject_lora(model, None, ("q", "v", "proj", "fc1", "fc2"), rank=4)
    assert len(names) == 4 * 4
    assert torch.equal(model(x), before)


def test_merge_unmerge_round_trip_and_merged_state_dict(tiny_mae) -> None:
    model = tiny_mae.eval()
    inject_lora(model, (0, -1), ("q", "k", "v", "proj", "fc2"), rank=4, alpha=8)
    _randomise_b(model)
    x = torch.randn(2, 3, 32, 32)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lora_out = model(x)

    sd = merged_state_dict(model)
    assert not any("lora_" in k for k in sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())  # model untouched

    merge_lora(model)
    merged_out = model(x)
    torch.testing.assert_close(merged_out, lora_out, **FP32_NETWORK)  # one matmul vs base + low-rank path
    assert all(m.merged for m in lora_modules(model).values())
    unmerge_lora(model)
    for k, v in weights.items():
        torch.testing.assert_close(model.state_dict()[k], v, **FP32_ONE_OP)  # W + d - d: one rounding
    torch.testing.assert_close(model(x), lora_out, **FP32_NETWORK)  # that rounding through 4 blocks

    plain = copy.deepcopy(tiny_mae).eval()
    remove_lora(plain)
    assert not lora_modules(plain)
    assert set(plain.state_dict()) == set(sd)
    assert type(plain.blocks[0].attn.qkv) is nn.Linear
    torch.testing.assert_close(plain(x), lora_out, **FP32_NETWORK)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_gradients_reach_lora_not_frozen_base() -> None:
    base = nn.Linear(6, 18)
    base.requires_grad_(False)
    layer = LoRAQKV.from_linear(base, rank=3, targets=("q", "v"))
    _randomise_b(layer)
    layer(torch.randn(4, 6)).square().sum().backward()
    assert base.weight.grad is None and layer.weight.grad is None
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0


def test_dropout_only_on_low_rank_path() -> None:
    layer = LoRALinear.from_linear(nn.Linear(4, 4), rank=2, dropout=0.5).train()
    x = torch.randn(50, 4)
    torch.testing.assert_close(layer(x), F_linear(layer, x))  # B = 0: dropout cannot change the output


def F_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, layer.weight, layer.bias)


@pytest.mark.parametrize(
    "kwargs",
    [dict(rank=0), dict(rank=2, dropout=1.0)],
)
def test_bad_hyperparameters_raise(kwargs) -> None:
    with pytest.raises(ConfigError):
        LoRALinear.from_linear(nn.Linear(4, 4), **kwargs)


def test_bad_targets_and_double_injection(tiny_dinov2) -> None:
    with pytest.raises(ConfigError, match="unknown LoRA target 'o'"):
        inject_lora(tiny_dinov2, None, ("q", "o"), rank=2)
    with pytest.raises(ConfigError, match="out of range"):
        inject_lora(tiny_dinov2, (7,), ("q",), rank=2)
    inject_lora(tiny_dinov2, (-1,), ("q",), rank=2)
    with pytest.raises(ConfigError, match="already carries LoRA"):
        inject_lora(tiny_dinov2, (3,), ("v",), rank=2)


def test_matches_peft_lora_linear() -> None:
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(16, 12))
    ours = LoRALinear.from_linear(copy.deepcopy(base[0]), rank=4, alpha=8)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["0"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config).base_model.model[0]
    _randomise_b(ours)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), theirs(x), **FP32_ONE_OP)
    torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"), **FP32_ONE_OP)
