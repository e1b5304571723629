"""Fine-tuning recipes: the official ExPLoRA recipe setting by setting, explora's own kept as the default, explicit
overrides, and the parts the official recipe adds (fc_norm global pool, timm's linear drop path, RandAugment)."""

from __future__ import annotations

import copy
import json
import pickle
import random

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import TensorDataset

from explora.cli.main import main
from explora.core.errors import ConfigError
from explora.core.schedules import scaled_lr
from explora.data.multicrop import random_resized_crop_boxes
from explora.engine.trainer import OptimConfig, TrainConfig
from explora.models.backbone import build_backbone
from explora.recipes.finetune import (
    FINETUNE_RECIPES,
    AugConfig,
    ClassifierModel,
    FinetuneObjective,
    FinetuneTransform,
    _override,
    build_rand_augment,
    finetune_optim_defaults,
    finetune_recipe,
    prepare_classifier,
    rand_augment_images,
    run_finetune,
    set_linear_drop_path,
    trainable_counts,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
RA = "rand-m9-mstd0.5-inc1"
LORA_R8 = 4 * 2 * 8 * (64 + 64)  # 4 blocks x (Q, V) x rank 8 x (in + out) of the 64-wide tiny ViTs


class _Labeled(TensorDataset):
    mean, std, num_classes = MEAN, STD, 4


def _tiny_set(n: int = 8) -> _Labeled:
    g = torch.Generator().manual_seed(3)
    return _Labeled(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 4)


def test_official_recipe_is_the_official_script_setting_by_setting():
    """paper-notes §9, scripts/finetune.sh + finetune/finetune.py."""
    r = finetune_recipe("official")
    assert r.preset == "LoRA-r8-official" and r.pool == "avg_fc_norm"
    assert r.epochs == 120 and r.steps is None
    assert (r.batch_size, r.effective_batch) == (32, 128)  # 32 per GPU x 2 GPUs x accumulation 2
    o = r.optim
    assert scaled_lr(o["base_lr"], r.effective_batch, o["reference_batch"], o["lr_scaling"]) == pytest.approx(5e-4)
    assert o["warmup_epochs"] == 5 and "warmup_steps" not in o and o["min_lr"] == 1e-6
    assert o["layer_decay"] == 1.0 and o["weight_decay"] == o["weight_decay_end"] == 0.0 and o["clip_grad"] == 0.0
    assert r.drop_path == 0.2
    a = r.aug
    assert a.mixup_alpha == 0.0 and a.cutmix_alpha == 0.0 and a.label_smoothing == 0.1 and a.rand_augment == RA


def test_explora_recipe_keeps_todays_defaults():
    r = finetune_recipe("explora")
    assert r.preset == "LoRA-r8" and r.pool == "auto" and r.drop_path is None and r.aug == AugConfig()
    assert r.optim_config() == finetune_optim_defaults() == OptimConfig(
        base_lr=1e-3, lr_scaling="linear", reference_batch=256, min_lr=1e-6, warmup_steps=0, weight_decay=0.05,
        weight_decay_end=0.05, betas=(0.9, 0.999), layer_decay=0.75, patch_embed_lr_mult=1.0, clip_grad=0.0,
        freeze_last_layer_steps=0,
    )
    assert r.train_config(num_workers=0) == TrainConfig(steps=1000, batch_size=256, num_workers=0)
    with pytest.raises(ConfigError, match="known recipes: \\['explora', 'official'\\]"):
        finetune_recipe("offical")


def test_explicit_settings_override_the_recipe():
    recipe = {"epochs": 120, "batch_size": 32}
    assert _override(recipe, {"steps": 50, "epochs": None}, ("steps", "epochs")) == {"steps": 50, "batch_size": 32}
    assert _override({"steps": 1000}, {"epochs": 2}, ("steps", "epochs")) == {"epochs": 2}
    assert _override(recipe, {"batch_size": None}, ("steps", "epochs")) == recipe  # None = keep the recipe's
    # both given: left to the engine, which refuses the conflict
    assert _override(recipe, {"steps": 5, "epochs": 1}, ("steps", "epochs")) == {"steps": 5, "epochs": 1,
                                                                                  "batch_size": 32}
    official = finetune_recipe("official")
    optim = official.optim_config(warmup_steps=7, base_lr=2e-3)  # an explicit warm-up in steps replaces 5 epochs
    assert optim.warmup_steps == 7 and optim.base_lr == 2e-3 and optim.layer_decay == 1.0
    aug = official.aug_config(rand_augment="", mixup_alpha=None)
    assert aug.rand_augment == "" and aug.mixup_alpha == 0.0 and official.aug.rand_augment == RA


def test_official_recipe_engine_configs():
    """Needs TrainConfig.epochs/effective_batch and OptimConfig.warmup_epochs (the engine's epoch lengths)."""
    r = finetune_recipe("official")
    cfg = r.train_config()
    assert (cfg.epochs, cfg.effective_batch, cfg.batch_size) == (120, 128, 32)
    assert r.optim_config().warmup_epochs == 5
    steps = r.train_config(steps=10)
    assert steps.steps == 10 and steps.epochs is None and steps.effective_batch == 128


@pytest.mark.parametrize("fixture", ["tiny_dinov2", "tiny_mae"])
def test_avg_fc_norm_is_timms_global_average_pool(fixture, request):
    """The features equal timm's own ``global_pool='avg'`` head path on the same weights: last block's patch tokens
    (no final norm), mean, fc_norm; fc_norm starts as a plain LayerNorm (weight 1, bias 0)."""
    backbone = request.getfixturevalue(fixture)
    model = ClassifierModel(backbone, 5, pool="avg_fc_norm").eval()
    assert torch.equal(model.fc_norm.weight, torch.ones(64)) and torch.equal(model.fc_norm.bias, torch.zeros(64))
    with torch.no_grad():  # a non-trivial affine, so the reference must use this very fc_norm
        model.fc_norm.weight.uniform_(0.5, 1.5)
        model.fc_norm.bias.normal_(0, 0.1)
    reference = copy.deepcopy(backbone).eval()
    reference.global_pool, reference.norm, reference.fc_norm = "avg", torch.nn.Identity(), model.fc_norm
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)  # (3, 64)
        got = model.features(x)
        normed_mean = ClassifierModel(backbone, 5, pool="avg").eval().features(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - normed_mean).abs().max() > 1e-2  # not the mean of final-norm tokens


def test_official_lora_trains_lora_and_head_only(tiny_mae):
    model = prepare_classifier(tiny_mae, 4, mode="lora", pool="avg_fc_norm", preset="LoRA-r8-official")
    with torch.no_grad():  # LoRA B starts at zero; make it non-zero so A gets a gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"} | {
        f"backbone.blocks.{i}.attn.qkv.lora_{ab}" for i in range(4) for ab in "AB"
    }
    assert all(model.backbone.blocks[i].attn.qkv.scaling == 1 / 8 for i in range(4))  # loralib alpha 1
    assert trainable_counts(model) == {"backbone": LORA_R8, "head": 64 * 4 + 4}
    obj = FinetuneObjective(model, 4, 32, MEAN, STD, AugConfig(mixup_alpha=0.0, cutmix_alpha=0.0))
    ds = _tiny_set(4)
    batch = obj.batch_transform()(ds.tensors[0], torch.Generator().manual_seed(0))
    batch["labels"] = ds.tensors[1]
    obj(batch, 0).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable
    full = prepare_classifier(build_backbone("test_mae"), 4, mode="full", pool="avg_fc_norm")
    assert full.fc_norm.weight.requires_grad and trainable_counts(full)["head"] == 64 * 4 + 4 + 2 * 64


def test_avg_fc_norm_refuses_wrapped_encoders(tiny_mae):
    from explora.models.group_channel import GroupChannelViT

    wrapped = GroupChannelViT(tiny_mae, groups=((0, 1, 2),), group_dim=16)
    with pytest.raises(ConfigError, match="avg_fc_norm.*a group_channel encoder is not one"):
        ClassifierModel(wrapped, 3, pool="avg_fc_norm")


def test_drop_path_follows_timms_linear_rule(tiny_mae):
    reference = build_backbone("test_mae", drop_path_rate=0.2)  # timm VisionTransformer's own rule
    set_linear_drop_path(tiny_mae, 0.2)
    ours = [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in tiny_mae.blocks[1:]]
    theirs = [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in reference.blocks[1:]]
    assert ours == theirs and ours[-1][0] == pytest.approx(0.2)
    assert isinstance(tiny_mae.blocks[0].drop_path1, torch.nn.Identity)  # rate 0 in the first block, as timm
    x = torch.randn(2, 3, 32, 32)
    tiny_mae.train()
    assert not torch.equal(tiny_mae(x), tiny_mae(x))  # stochastic in training
    tiny_mae.eval()
    assert torch.equal(tiny_mae(x), tiny_mae(x))
    set_linear_drop_path(tiny_mae, 0.0)
    assert all(isinstance(b.drop_path2, torch.nn.Identity) for b in tiny_mae.blocks)


def _timm_rand_augment(image_size: int):
    """The RandAugment inside MAE's fine-tuning transform (timm create_transform, bicubic)."""
    t = timm.data.create_transform(image_size, is_training=True, auto_augment=RA, interpolation="bicubic",
                                   mean=MEAN, std=STD)
    found = [op for op in t.transforms if type(op).__name__ == "RandAugment"]
    assert len(found) == 1
    return found[0]


def test_rand_augment_is_the_one_of_maes_finetuning_transform():
    from PIL import Image

    ours, theirs = build_rand_augment(RA, 32, MEAN), _timm_rand_augment(32)
    assert ours.num_layers == theirs.num_layers == 2

    def describe(ra):
        return [(op.name, op.prob, op.magnitude, op.magnitude_std, op.kwargs, op.hparams) for op in ra.ops]

    assert describe(ours) == describe(theirs)
    assert ours.ops[0].hparams["translate_const"] == int(32 * 0.45) and ours.ops[0].kwargs["fillcolor"] == (128,) * 3
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for seed in range(8):
        random.seed(seed)
        np.random.seed(seed)
        a = np.asarray(ours(img))
        random.seed(seed)
        np.random.seed(seed)
        try:
            b = np.asarray(theirs(img))
        except ValueError:  # Pillow >= 10 refuses posterize to 0 bits; ours keeps the older Pillow's black image
            assert not a.any()
            continue
        assert np.array_equal(a, b)


def test_posterize_to_zero_bits_is_black_as_in_older_pillow():
    from PIL import Image, ImageOps

    from explora.recipes.finetune import posterize_keeping_zero_bits

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert not np.asarray(posterize_keeping_zero_bits(img, 0)).any()
    assert posterize_keeping_zero_bits(img, 8) is img
    assert np.array_equal(np.asarray(posterize_keeping_zero_bits(img, 3)), np.asarray(ImageOps.posterize(img, 3)))
    # the op reaches 0 bits: magnitude 9 +- 0.5 clipped at 10 -> 4 - int(10 / 10 * 4) = 0 bits kept
    op = next(op for op in build_rand_augment(RA, 32, MEAN).ops if op.name == "PosterizeIncreasing")
    assert op.level_fn(10.0, op.hparams) == (0,)
    assert op.aug_fn is posterize_keeping_zero_bits


def test_rand_augment_runs_per_image_on_the_uint8_crop():
    """The transform with RandAugment = the transform without it, rounded to uint8, RandAugmented image by image
    with the seeds the batch generator gives, then normalised; global random state is left untouched."""
    images = _tiny_set(4).tensors[0]
    plain = AugConfig(mixup_alpha=0.0, cutmix_alpha=0.0)
    with_ra = FinetuneTransform(24, MEAN, STD, AugConfig(mixup_alpha=0.0, cutmix_alpha=0.0, rand_augment=RA))
    state = (random.getstate(), np.random.get_state()[1].copy())
    out = with_ra(images, torch.Generator().manual_seed(7))["images"]
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(out, pickle.loads(pickle.dumps(with_ra))(images, torch.Generator().manual_seed(7))["images"])

    g = torch.Generator().manual_seed(7)  # the transform's draws, in its order: boxes, flips, RandAugment seeds
    random_resized_crop_boxes(4, 32, 32, plain.scale, plain.ratio, g)
    torch.rand(4, generator=g)
    seeds = torch.randint(0, 2**31 - 1, (4,), generator=g).tolist()
    crops = FinetuneTransform(24, (0.0,) * 3, (1.0,) * 3, plain)(images, torch.Generator().manual_seed(7))["images"]
    u8 = (crops * 255).round().clamp(0, 255).to(torch.uint8)  # (4, 3, 24, 24)
    augmented = rand_augment_images(u8, build_rand_augment(RA, 24, MEAN), seeds).float() / 255
    expected = (augmented - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (augmented - crops).abs().mean() > 0.01  # RandAugment changed the crops


def test_rand_augment_is_rgb_only_and_checks_its_string():
    four = (0.5,) * 4
    with pytest.raises(ConfigError, match="this dataset has 4 band\\(s\\)"):
        FinetuneTransform(32, four, four, AugConfig(rand_augment=RA))
    model = prepare_classifier(build_backbone("test_mae", in_chans=4), 3)
    with pytest.raises(ConfigError, match="4 band"):
        FinetuneObjective(model, 3, 32, four, four, finetune_recipe("official").aug)
    FinetuneTransform(32, four, four, AugConfig(rand_augment=""))  # off: any band count
    with pytest.raises(ConfigError, match="'rnd-m9' is not a timm RandAugment string"):
        build_rand_augment("rnd-m9", 32, MEAN)


def test_run_finetune_takes_the_official_recipes_model_and_augmentation(tiny_mae, tmp_path):
    ds = _tiny_set(8)
    cfg = TrainConfig(steps=2, batch_size=4, num_workers=0, precision="fp32", tensorboard=False, log_every=1)
    optim = FINETUNE_RECIPES["official"].optim_config(warmup_steps=1)  # explicit: no epoch length needed
    m = run_finetune(tiny_mae, ds, ds, tmp_path, image_size=32, recipe="official", train_cfg=cfg, optim=optim)
    assert m["recipe"] == "official" and m["pool"] == "avg_fc_norm" and m["steps"] == 2
    assert m["trainable"] == {"backbone": LORA_R8, "head": 64 * 4 + 4}
    assert tiny_mae.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    from safetensors.torch import load_file

    best = load_file(tmp_path / "best" / "model.safetensors")
    assert torch.equal(best["fc_norm.weight"], torch.ones(64))  # saved with the classifier, never trained


def test_cli_finetune_official_recipe(idx_dir, tmp_path):
    """`explora finetune --recipe official` end to end: epochs, effective batch by accumulation, the recipe's
    model and augmentation. Needs the engine's epochs/effective_batch/warmup_epochs."""
    out = tmp_path / "ft"
    args = ["finetune", "--recipe", "official", "--backbone", "test_mae", "--data", f"fashion_mnist:{idx_dir}:rgb=true",
            "--val-split", "test", "--image-size", "32", "--batch-size", "8", "--effective-batch", "16",
            "--epochs", "2", "--warmup-epochs", "1", "--num-workers", "0", "--precision", "fp32", "--out", str(out)]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["recipe"] == "official" and m["pool"] == "avg_fc_norm" and m["protocol"] == "finetune-lora"
    assert m["trainable"] == {"backbone": LORA_R8, "head": 64 * 10 + 10}
    assert m["steps"] == 2 * 64 // 16  # 64 training images, 16 per optimiser step, 2 epochs
    history = json.loads((out / "eval_history.json").read_text())
    assert [h["step"] for h in history] == [4, 8]  # evaluated every epoch (of the effective batch)


def test_cli_finetune_explicit_flags_override_the_recipe(idx_dir, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", "--recipe", "official", "--backbone", "test_mae", "--data", f"fashion_mnist:{idx_dir}:rgb=true",
            "--val-split", "test", "--image-size", "32", "--batch-size", "8", "--effective-batch", "8",
            "--steps", "2", "--warmup-steps", "1", "--pool", "cls", "--rand-augment", "none", "--num-workers", "0",
            "--precision", "fp32", "--out", str(out)]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["recipe"] == "official" and m["pool"] == "cls" and m["steps"] == 2
    assert m["trainable"] == {"backbone": LORA_R8, "head": 64 * 10 + 10}


def test_cli_finetune_explora_recipe_is_the_default(idx_dir, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", "--backbone", "test_mae", "--data", f"fashion_mnist:{idx_dir}:rgb=true", "--val-split",
            "test", "--image-size", "32", "--batch-size", "8", "--steps", "2", "--num-workers", "0", "--precision",
            "fp32", "--out", str(out)]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["recipe"] == "explora" and m["pool"] == "cls" and m["steps"] == 2
    assert m["trainable"] == {"backbone": LORA_R8, "head": 64 * 10 + 10}
