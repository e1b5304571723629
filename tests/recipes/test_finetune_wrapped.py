"""Fine-tuning group-channel (multispectral) and temporal encoders: timestamps through the transform, the model and
the evaluation; LoRA in the shared blocks; all-token pooling; run_finetune and `explora finetune --weights <export>`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data_fixtures import fmow_sentinel, fmow_temporal
from finetune_checks import assert_gradients_reach_exactly
from tolerances import FP32_NETWORK, scaled

from explora.cli.main import main
from explora.core.errors import DataError
from explora.data import build_dataset
from explora.engine.trainer import TrainConfig
from explora.eval.features import EvalTransform
from explora.models.backbone import build_backbone
from explora.models.export import export_wrapped_encoder, infer_model_args, load_encoder
from explora.models.group_channel import SENTINEL2_DROPPED_BANDS, SENTINEL2_GROUPS, GroupChannelViT
from explora.models.temporal import TemporalViT
from explora.objectives.mae.objective import build_feature_extractor
from explora.recipes.finetune import (
    AugConfig,
    ClassifierModel,
    FinetuneObjective,
    FinetuneTransform,
    predict,
    prepare_classifier,
    run_finetune,
    trainable_counts,
)

KINDS = ("group_channel", "temporal")
LOAD_SIZE = 37  # round(32 / (224/256)): what the CLI loads for --image-size 32
NO_AUG = AugConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, mixup_alpha=0.0, cutmix_alpha=0.0,
                   label_smoothing=0.0)
LORA_COUNT = 4 * 2 * 8 * (64 + 64)  # 4 blocks x (Q, V) x rank 8 x (in + out) of the 64-wide test_mae


def _wrap(kind: str) -> torch.nn.Module:
    vit = build_backbone("test_mae")
    if kind == "group_channel":  # the fMoW-Sentinel setting: 13 bands in, B1/B9/B10 dropped, SatMAE's 3 groups
        return GroupChannelViT(vit, SENTINEL2_GROUPS, SENTINEL2_DROPPED_BANDS, in_bands=13, group_dim=16)
    return TemporalViT(vit, num_frames=3, time_dim=16, time_offset=(1980, 1, 0))


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A tiny wrapped encoder of each kind exported as pre-training does (safetensors + sidecar); no pre-training."""
    out = {}
    for kind in KINDS:
        torch.manual_seed(0)
        encoder = _wrap(kind)
        args = infer_model_args(build_backbone("test_mae"), "vit_base_patch16_224")
        out[kind] = tmp_path_factory.mktemp(f"export_{kind}")
        export_wrapped_encoder(encoder, out[kind], "vit_base_patch16_224", args)
    return out


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("wrapped_data")
    return {
        "group_channel": f"fmow_sentinel:{fmow_sentinel(root / 'sentinel', n=4)}",
        "temporal": f"fmow_temporal:{fmow_temporal(root / 'temporal')}",
    }


def _dataset(specs: dict[str, str], kind: str):
    return build_dataset(specs[kind], split="train", image_size=LOAD_SIZE)


def _batch(ds, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    items = [ds[i] for i in range(n)]
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items])
    ts = torch.stack([it[2] for it in items]) if len(items[0]) > 2 else None
    return images, labels, ts


def test_transform_crops_every_frame_alike_and_returns_timestamps():
    g = torch.Generator().manual_seed(0)
    frame = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8, generator=g)
    images = frame.repeat(1, 3, 1, 1)  # (4, 9, 40, 40): three identical frames per sample
    ts = torch.tensor([[2014, 2, 9], [2015, 3, 11], [2016, 5, 10]]).expand(4, -1, -1)  # (4, 3, 3)
    mean, std = (0.4, 0.5, 0.6) * 3, (0.2, 0.25, 0.3) * 3
    t = FinetuneTransform(32, mean, std, AugConfig(mixup_alpha=0.0, cutmix_alpha=0.0))
    out = t(images, torch.Generator().manual_seed(1), timestamps=ts)
    x = out["images"]
    assert x.shape == (4, 9, 32, 32) and torch.equal(out["timestamps"], ts)
    assert torch.equal(x[:, 0:3], x[:, 3:6]) and torch.equal(x[:, 0:3], x[:, 6:9])  # same crop + flip per frame
    ref = FinetuneTransform(32, mean[:3], std[:3], t.aug)(frame, torch.Generator().manual_seed(1))["images"]
    assert torch.equal(x[:, 0:3], ref)  # and it is exactly the crop the single-frame transform draws
    assert "timestamps" not in t(images, torch.Generator().manual_seed(1))  # no timestamps in, none out
    mixed = FinetuneTransform(32, mean, std, AugConfig())(images, torch.Generator().manual_seed(2), timestamps=ts)
    assert torch.equal(mixed["timestamps"], ts)  # mixup/cutmix act on pixels only
    with pytest.raises(DataError, match=r"\(B, T, 3\)"):
        t(images, torch.Generator().manual_seed(1), timestamps=ts[:, :, :2])


@pytest.mark.parametrize("kind", KINDS)
def test_head_reads_the_all_token_mean_and_eval_passes_timestamps(kind, exports, specs):
    encoder = load_encoder(exports[kind])
    model = ClassifierModel(encoder, 62).eval()
    assert model.pool == "avg" and model.head.in_features == 64
    ds = _dataset(specs, kind)
    images, labels, ts = _batch(ds, 4)
    transform = EvalTransform(32, ds.mean, ds.std)
    x = transform(images)
    extra = () if ts is None else (ts,)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x, ts), build_feature_extractor(encoder)(x, *extra))
        logits, y = predict(model, torch.utils.data.Subset(ds, range(4)), transform, batch_size=3)
        torch.testing.assert_close(logits, model(x, timestamps=ts), **scaled(FP32_NETWORK, logits))  # batches of 3
    assert torch.equal(y, labels)
    if kind == "temporal":
        assert model.needs_timestamps
        with pytest.raises(DataError, match="timestamps"):
            model(x)
        with torch.no_grad():  # the timestamps really reach the encoding
            assert not torch.allclose(model.features(x, ts), model.features(x, ts + 5))


@pytest.mark.parametrize("kind", KINDS)
def test_lora_on_wrapper_trains_only_lora_and_head(kind, exports, specs):
    model = prepare_classifier(load_encoder(exports[kind]), 62, mode="lora")
    ds = _dataset(specs, kind)
    obj = FinetuneObjective(model, 62, 32, ds.mean, ds.std)
    images, labels, ts = _batch(ds, 4)
    extras = {} if ts is None else {"timestamps": ts}

    def loss():
        batch = obj.batch_transform()(images, torch.Generator().manual_seed(0), **extras)
        return obj({**batch, "labels": labels}, 0).loss

    # group projections, position/group/time encodings, norms: frozen
    assert_gradients_reach_exactly(model, loss, {"head.weight", "head.bias"} | {
        f"backbone.blocks.{i}.attn.qkv.lora_{ab}" for i in range(4) for ab in "AB"
    })
    assert trainable_counts(model) == {"backbone": LORA_COUNT, "head": 64 * 62 + 62}


@pytest.mark.parametrize("kind", KINDS)
def test_full_and_head_modes_on_wrappers(kind, exports):
    head = prepare_classifier(load_encoder(exports[kind]), 5, mode="head")
    assert trainable_counts(head) == {"backbone": 0, "head": 64 * 5 + 5}
    encoder = load_encoder(exports[kind])
    total = sum(p.numel() for p in encoder.parameters())
    full = prepare_classifier(encoder, 5, mode="full")
    assert trainable_counts(full)["backbone"] == total
    names = {n for n, p in full.named_parameters() if p.requires_grad}
    assert ("backbone.patch_embed.proj.0.weight" if kind == "group_channel" else "backbone.pos_embed") in names


def test_lora_loss_decreases_on_a_fixed_temporal_batch(exports, specs):
    model = prepare_classifier(load_encoder(exports["temporal"]), 62, mode="lora", head_init_std=0.02)
    ds = _dataset(specs, "temporal")
    obj = FinetuneObjective(model, 62, 32, ds.mean, ds.std, NO_AUG)
    images, labels, ts = _batch(ds, 5)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.0)
    transform = obj.batch_transform()
    losses = []
    for step in range(8):
        batch = transform(images, torch.Generator().manual_seed(step), timestamps=ts)
        batch["labels"] = labels
        loss = obj(batch, step).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("kind", KINDS)
def test_run_finetune_on_wrapped_export(kind, exports, specs, tmp_path):
    ds = _dataset(specs, kind)
    encoder = load_encoder(exports[kind])
    frozen_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    cfg = TrainConfig(steps=2, batch_size=2, num_workers=0, precision="fp32", tensorboard=False, log_every=1)
    m = run_finetune(encoder, ds, ds, tmp_path, image_size=32, train_cfg=cfg)
    assert m["steps"] == 2 and m["num_samples"] == len(ds) and m["protocol"] == "finetune-lora"
    assert m["pool"] == "avg" and m["backbone_kind"] == kind
    assert m["trainable"] == {"backbone": LORA_COUNT, "head": 64 * 62 + 62}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["top1"] == m["top1"] and len(saved["confusion_matrix"]) == 62
    after = encoder.state_dict()
    changed = {k for k in after if k in frozen_before and not torch.equal(after[k], frozen_before[k])}
    assert changed == set()  # only the LoRA tensors (new keys) and the head moved
    assert any("lora_" in k for k in after) and (tmp_path / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", KINDS)
def test_cli_finetune_with_wrapped_export(kind, exports, specs, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", "--backbone", "test_mae", "--weights", str(exports[kind]), "--data", specs[kind],
            "--image-size", "32", "--batch-size", "2", "--num-workers", "0", "--steps", "2", "--precision", "fp32",
            "--out", str(out)]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"] == "finetune-lora" and m["pool"] == "avg" and m["backbone_kind"] == kind
    assert m["trainable"]["backbone"] == LORA_COUNT and 0.0 <= m["top1"] <= 100.0
    assert m["num_samples"] == len(_dataset(specs, kind))
