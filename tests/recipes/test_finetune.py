"""LoRA fine-tuning: parameter accounting, gradients only where they belong, the batch transform, overfitting."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
from finetune_checks import assert_gradients_reach_exactly
from torch.utils.data import TensorDataset

from explora.eval.features import EvalTransform
from explora.recipes.finetune import (
    AugConfig,
    ClassifierModel,
    FinetuneObjective,
    FinetuneTransform,
    evaluate,
    mixed_targets,
    prepare_classifier,
    trainable_counts,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class _Labeled(TensorDataset):
    mean, std, num_classes = MEAN, STD, 4


def _tiny_set(n: int = 8) -> _Labeled:
    g = torch.Generator().manual_seed(3)
    return _Labeled(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 4)


def test_vit_large_lora_r8_trains_0_8m_plus_head():
    with torch.device("meta"):
        backbone = timm.create_model("vit_large_patch16_224", num_classes=0)
    counts = trainable_counts(prepare_classifier(backbone, num_classes=62, mode="lora"))
    assert counts["backbone"] == 24 * 2 * 8 * (1024 + 1024) == 786_432  # Q,V x rank 8 x (in + out), every block
    assert counts["head"] == 1024 * 62 + 62


@pytest.mark.parametrize("pool,dim", [("cls", 64), ("avg", 64), ("cls+avg", 128)])
def test_classifier_pools(tiny_dinov2, pool, dim):
    model = ClassifierModel(tiny_dinov2, 5, pool=pool).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.head.in_features == dim and model(x).shape == (2, 5)
    tokens = tiny_dinov2.forward_features(x)
    expected = {"cls": tokens[:, 0], "avg": tokens[:, 1:].mean(1)}
    if pool in expected:
        torch.testing.assert_close(model.features(x), expected[pool])


def test_only_lora_and_head_receive_gradients(tiny_dinov2):
    model = prepare_classifier(tiny_dinov2, 4, mode="lora")
    obj = FinetuneObjective(model, 4, 32, MEAN, STD)
    ds = _tiny_set(4)

    def loss():
        batch = obj.batch_transform()(ds.tensors[0], torch.Generator().manual_seed(0))
        return obj({**batch, "labels": ds.tensors[1]}, 0).loss

    assert_gradients_reach_exactly(model, loss, {"head.weight", "head.bias"} | {
        f"backbone.blocks.{i}.attn.qkv.lora_{ab}" for i in range(4) for ab in "AB"
    })
    assert trainable_counts(model) == {"backbone": 4 * 2 * 8 * (64 + 64), "head": 64 * 4 + 4}


def test_modes_full_and_head(tiny_mae):
    assert trainable_counts(prepare_classifier(tiny_mae, 3, mode="head"))["backbone"] == 0
    full = prepare_classifier(tiny_mae, 3, mode="full")
    assert trainable_counts(full)["backbone"] == sum(p.numel() for p in tiny_mae.parameters())


def test_batch_transform_is_deterministic_picklable_and_mixes():
    ds = _tiny_set(6)
    t = pickle.loads(pickle.dumps(FinetuneTransform(24, MEAN, STD, AugConfig())))
    a = t(ds.tensors[0], torch.Generator().manual_seed(5))
    b = t(ds.tensors[0], torch.Generator().manual_seed(5))
    assert a["images"].shape == (6, 3, 24, 24) and a["mix_lam"].shape == (6,)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["mix_lam"], b["mix_lam"])
    lams = {float(t(ds.tensors[0], torch.Generator().manual_seed(s))["mix_lam"][0]) for s in range(8)}
    assert len(lams) > 1 and all(0.0 <= v <= 1.0 for v in lams)
    # no augmentation at all: a full-image crop of a constant image normalises to a constant
    plain = FinetuneTransform(
        16, MEAN, STD, AugConfig(scale=(1, 1), ratio=(1, 1), hflip=0, mixup_alpha=0, cutmix_alpha=0)
    )
    out = plain(torch.full((2, 3, 32, 32), 255, dtype=torch.uint8), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["images"], torch.full((2, 3, 16, 16), 2.0))
    assert out["mix_lam"].tolist() == [1.0, 1.0]


def test_mixed_targets_hand_computed():
    t = mixed_targets(torch.tensor([0, 2]), torch.tensor([0.75, 0.75]), 4, smoothing=0.1)
    # smoothed one-hot: off 0.025, on 0.925; sample 0 mixes with sample 1's label 2
    torch.testing.assert_close(
        t[0], torch.tensor([0.75 * 0.925 + 0.25 * 0.025, 0.025, 0.75 * 0.025 + 0.25 * 0.925, 0.025])
    )
    torch.testing.assert_close(t.sum(1), torch.ones(2))


def test_lora_finetuning_overfits_tiny_labeled_set(tiny_mae):
    # MAE layout: a random DinoV2-layout ViT has LayerScale 1e-5, so its CLS token barely depends on the image
    ds = _tiny_set(8)
    model = prepare_classifier(tiny_mae, 4, mode="lora", head_init_std=0.02)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    aug = AugConfig(
        scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0
    )
    obj = FinetuneObjective(model, 4, 32, MEAN, STD, aug)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.0)
    transform = obj.batch_transform()
    images, labels = ds.tensors
    losses = []
    for step in range(15):
        batch = transform(images, torch.Generator().manual_seed(step))
        batch["labels"] = labels
        out = obj(batch, step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert all(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_" in n)
    metrics = evaluate(model, ds, batch_size=4, transform=EvalTransform(32, MEAN, STD, crop_pct=1.0))
    assert metrics["top1"] == 100.0 and metrics["num_samples"] == 8
    assert metrics["per_class_accuracy"] == [100.0] * 4


def test_run_finetune_through_engine_writes_metrics(tiny_mae, tmp_path):
    from explora.engine.trainer import TrainConfig
    from explora.recipes.finetune import run_finetune

    ds = _tiny_set(8)
    cfg = TrainConfig(steps=2, batch_size=4, num_workers=0, precision="fp32", tensorboard=False, log_every=1)
    m = run_finetune(tiny_mae, ds, ds, tmp_path, image_size=32, train_cfg=cfg)
    assert m["steps"] == 2 and m["num_samples"] == 8 and m["protocol"] == "finetune-lora"
    assert m["trainable"] == {"backbone": 4 * 2 * 8 * 128, "head": 64 * 4 + 4}
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "confusion_matrix.png").is_file()


def test_run_finetune_evaluates_each_epoch_keeps_best_and_resumes(tmp_path):
    import json

    from safetensors.torch import load_file

    from explora.engine.trainer import TrainConfig
    from explora.models.backbone import build_backbone
    from explora.recipes.finetune import run_finetune

    ds = _tiny_set(8)
    cfg = TrainConfig(steps=6, batch_size=4, num_workers=0, precision="fp32", tensorboard=False, ckpt_every=2)

    def run(out, steps=6, resume=False):
        torch.manual_seed(0)
        return run_finetune(
            build_backbone("test_mae"),
            ds,
            ds,
            out,
            image_size=32,
            train_cfg=TrainConfig(**{**cfg.__dict__, "steps": steps}),
            resume=resume,
        )

    ref = run(tmp_path / "ref")
    history = json.loads((tmp_path / "ref" / "eval_history.json").read_text())
    assert [h["step"] for h in history] == [2, 4, 6]  # one epoch = 8 samples / batch 4 = 2 steps
    best = max(history, key=lambda h: h["top1"])
    assert ref["best_top1"] == best["top1"]
    saved = json.loads((tmp_path / "ref" / "best" / "metrics.json").read_text())
    assert saved["step"] == best["step"]
    state = load_file(tmp_path / "ref" / "best" / "model.safetensors")
    assert "head.weight" in state and not any("lora_" in k for k in state)

    run(tmp_path / "cut", steps=6)
    for p in (tmp_path / "cut" / "checkpoints").glob("ckpt-00000006.*"):
        p.unlink()
    resumed = run(tmp_path / "cut", resume=True)
    assert resumed["top1"] == ref["top1"] and resumed["best_step"] == ref["best_step"]
