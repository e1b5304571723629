"""MAE objective: masking, loss, decoder loading, training on a fixed batch."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from explora.core.errors import ConfigError
from explora.models.backbone import build_backbone
from explora.models.record import record_of
from explora.objectives.mae import (
    MAEConfig,
    MAEObjective,
    build_feature_extractor,
    build_mae_objective,
    draw_noise,
    random_masking,
    shared_masking,
)
from explora.objectives.mae.decoder import MAEDecoder, load_decoder_state
from explora.objectives.mae.loss import masked_mse, normalize_patches, patchify, unpatchify
from explora.vit.lora import LoRAQKV, inject_lora, remove_lora

SMALL = dict(decoder_dim=32, decoder_depth=2, decoder_heads=4)


def _objective(**kw) -> MAEObjective:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_mae_objective(build_backbone("test_mae"), MAEConfig(**{**SMALL, **kw}))


def test_random_masking_counts_and_restore():
    noise = draw_noise(5, 16, torch.Generator().manual_seed(1))
    m = random_masking(noise, 0.75)
    assert m.ids_keep.shape == (5, 4)
    assert (m.mask.sum(1) == 12).all() and set(m.mask.unique().tolist()) == {0.0, 1.0}
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, m.ids_restore), torch.arange(16).expand(5, -1))
    # kept tokens are the lowest-noise ones and are exactly the unmasked positions
    for b in range(5):
        assert set(m.ids_keep[b].tolist()) == set((m.mask[b] == 0).nonzero().flatten().tolist())
        assert noise[b, m.ids_keep[b]].max() < noise[b, m.mask[b] == 1].min()


def _check_restore(m) -> None:
    """MAE's decoder contract: token n is visible iff ids_restore[n] < K, and then it is ids_keep[ids_restore[n]]."""
    K = m.ids_keep.shape[1]
    visible = m.ids_restore < K
    assert torch.equal(visible, m.mask == 0)
    for b in range(m.mask.shape[0]):
        kept = visible[b].nonzero().flatten()
        assert torch.equal(m.ids_keep[b, m.ids_restore[b, kept]], kept)


def test_shared_masking_same_positions_every_slice():
    noise = draw_noise(3, 16, torch.Generator().manual_seed(2))
    m = shared_masking(noise, 3, 0.75)
    assert m.mask.shape == (3, 48) and m.ids_keep.shape == (3, 12)
    per_slice = m.mask.reshape(3, 3, 16)
    assert torch.equal(per_slice[:, 0], per_slice[:, 1]) and torch.equal(per_slice[:, 0], per_slice[:, 2])
    assert (per_slice.sum(-1) == 12).all()
    for b in range(3):  # kept = the 4 lowest-noise positions, in every slice (token r*16 + l), and unmasked
        lowest = set(torch.argsort(noise[b])[:4].tolist())
        assert set(m.ids_keep[b].tolist()) == {r * 16 + p for r in range(3) for p in lowest}
        assert set(m.ids_keep[b].tolist()) == set((m.mask[b] == 0).nonzero().flatten().tolist())
    # the decoder's contract: un-shuffling [kept tokens in ids_keep order, mask tokens] puts each back in place
    shuffled = torch.argsort(m.ids_restore, dim=1)  # (3, 48) token id at each shuffled slot
    assert torch.equal(shuffled[:, :12], m.ids_keep)
    assert torch.equal(torch.gather(shuffled, 1, m.ids_restore), torch.arange(48).expand(3, -1))
    _check_restore(m)
    _check_restore(random_masking(noise, 0.75))


def test_patchify_round_trip_and_norm_pix():
    x = torch.randn(2, 3, 16, 16)
    p = patchify(x, 8)
    assert p.shape == (2, 4, 192)
    assert torch.equal(unpatchify(p, 8, (2, 2), 3), x)
    assert torch.equal(p[0, 1].reshape(8, 8, 3)[2, 5], x[0, :, 2, 8 + 5])  # (row, col, channel) order
    n = normalize_patches(p)
    assert torch.allclose(n.mean(-1), torch.zeros(2, 4), atol=1e-5)
    t = p[1, 3]
    assert torch.allclose(n[1, 3], (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt(), atol=1e-5)


def test_loss_ignores_visible_patches():
    target = torch.randn(2, 4, 6)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 1]])
    pred = torch.randn(2, 4, 6)
    base = masked_mse(pred, target, mask)
    pred2 = pred.clone()
    pred2[mask == 0] += 100.0
    assert torch.equal(masked_mse(pred2, target, mask), base)
    hand = sum(((pred[b, n] - target[b, n]) ** 2).mean() for b, n in [(0, 0), (0, 2), (1, 2), (1, 3)]) / 4
    assert torch.allclose(base, hand)


def test_objective_forward_backward_grads_only_where_expected():
    obj = _objective(train_decoder=False)
    obj.encoder.requires_grad_(False)
    obj.encoder.blocks[3].requires_grad_(True)
    batch = obj.batch_transform()(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8),
                                  torch.Generator().manual_seed(0))
    assert batch["images"].shape == (2, 3, 32, 32) and batch["noise"].shape == (2, 16)
    out = obj(batch, 0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.terms["mask_ratio"].item() == 0.75
    assert all(p.grad is None for p in obj.decoder.parameters())
    assert obj.encoder.blocks[3].attn.qkv.weight.grad is not None
    assert obj.encoder.blocks[0].attn.qkv.weight.grad is None
    assert obj.export_backbone() is obj.encoder


def test_batch_transform_deterministic_and_picklable():
    t = pickle.loads(pickle.dumps(_objective().batch_transform()))
    imgs = torch.rand(3, 3, 48, 48)
    a = t(imgs, torch.Generator().manual_seed(7))
    b = t(imgs, torch.Generator().manual_seed(7))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["noise"], b["noise"])


def test_grad_checkpointing_runs_every_block_checkpointed_and_matches(monkeypatch):
    obj = _objective()
    batch = obj.batch_transform()(torch.rand(2, 3, 32, 32), torch.Generator().manual_seed(0))
    ref = obj(batch, 0).loss
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    obj.encoder.set_grad_checkpointing(True)
    out = obj(batch, 0).loss
    assert len(calls) == 4
    out.backward()
    assert calls == [False] * len(obj.encoder.blocks)  # every encoder block, non-reentrant
    assert torch.equal(out, ref)  # checkpointing re-runs the same ops on the same inputs
    assert obj.encoder.blocks[0].attn.qkv.weight.grad is not None


def _mae_checkpoint_state(with_decoder: bool) -> dict[str, torch.Tensor]:
    """A fake MAE {'model': ...} state in upstream key layout (encoder via timm names + decoder_* keys)."""
    state = dict(build_backbone("test_mae").state_dict())
    if with_decoder:
        dec = MAEDecoder(64, (4, 4), 8, 3, dim=32, depth=2, heads=4)
        torch.nn.init.constant_(dec.decoder_pred.weight, 0.5)
        state.update(dec.state_dict())
    return state


def test_decoder_loaded_from_checkpoint_extras(tmp_path):
    path = tmp_path / "mae_visualize_fake.pth"
    torch.save({"model": _mae_checkpoint_state(True)}, path)
    model_state = torch.load(path, weights_only=True)["model"]
    backbone = build_backbone("test_mae")
    backbone.load_state_dict({k: v for k, v in model_state.items() if not k.startswith(("decoder", "mask_tok"))})
    record_of(backbone).mae_decoder = {k: v for k, v in model_state.items()
                                              if k.startswith(("decoder", "mask_token"))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obj = MAEObjective(backbone, MAEConfig(**SMALL))
    assert torch.equal(obj.decoder.decoder_pred.weight, torch.full_like(obj.decoder.decoder_pred.weight, 0.5))
    assert torch.equal(obj.decoder.mask_token, model_state["mask_token"])


def test_decoder_missing_warns_and_fresh_init():
    with pytest.warns(UserWarning, match="no decoder"):
        obj = MAEObjective(build_backbone("test_mae"), MAEConfig(**SMALL))
    assert obj.decoder.decoder_pos_embed.shape == (1, 17, 32)
    assert torch.equal(obj.decoder.decoder_pos_embed[0, 0], torch.zeros(32))


def test_decoder_pos_embed_resampled_on_load():
    src = MAEDecoder(64, (4, 4), 8, 3, dim=32, depth=1, heads=4)
    with torch.no_grad():
        src.decoder_pos_embed.normal_()  # not the sin-cos table dst builds itself
    dst = MAEDecoder(64, (6, 6), 8, 3, dim=32, depth=1, heads=4)
    assert load_decoder_state(dst, src.state_dict()) == []
    expected = resample_abs_pos_embed(src.decoder_pos_embed, new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=1)
    assert dst.decoder_pos_embed.shape == (1, 37, 32)
    torch.testing.assert_close(dst.decoder_pos_embed, expected)
    assert torch.equal(dst.decoder_pos_embed[:, 0], src.decoder_pos_embed[:, 0])  # cls row kept as it is


@pytest.mark.slow
def test_loss_falls_on_fixed_batch():
    torch.manual_seed(0)
    obj = _objective(norm_pix_loss=False, decoder_depth=1)
    x = torch.linspace(0, 1, 32)
    imgs = torch.stack([torch.stack([x[None].expand(32, -1), x[:, None].expand(-1, 32), 1 - x[None].expand(32, -1)])
                        for _ in range(2)])
    batch = {"images": imgs, "noise": draw_noise(2, 16, torch.Generator().manual_seed(0))}
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(30):
        loss = obj(batch, step).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_feature_extractor_pools_all_tokens():
    vit = build_backbone("test_mae")
    fx = build_feature_extractor(vit)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(fx(x), vit.forward_features(x)[:, 1:].mean(1))


@pytest.mark.parametrize("with_decoder", [True, False])
def test_mae_checkpoint_through_build_backbone(tmp_path, with_decoder):
    """Fake upstream {'model': ...} files, with (mae_visualize / *_full) and without (mae_pretrain) decoder."""
    state = _mae_checkpoint_state(with_decoder)
    path = tmp_path / "mae_fake.pth"
    torch.save({"model": state}, path)
    backbone = build_backbone("test_mae", weights=str(path))
    if with_decoder:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            obj = MAEObjective(backbone, MAEConfig(**SMALL))
        assert torch.equal(obj.decoder.decoder_pred.weight, state["decoder_pred.weight"])
        assert torch.equal(obj.decoder.decoder_blocks[1].attn.qkv.weight, state["decoder_blocks.1.attn.qkv.weight"])
    else:
        with pytest.warns(UserWarning, match="freshly initialised"):
            obj = MAEObjective(backbone, MAEConfig(**SMALL))
    assert torch.equal(obj.export_backbone().blocks[2].mlp.fc1.weight, state["blocks.2.mlp.fc1.weight"])


# --- decoder LoRA (official ExPLoRA MAE script: LoRA r8 on Q, V of every decoder block + the decoder's norms) ----

OFFICIAL_DECODER = dict(decoder_dim=512, decoder_depth=8, decoder_heads=16)  # MAE dec512d8b


def test_decoder_lora_trains_exactly_lora_and_norms():
    obj = _objective(**OFFICIAL_DECODER, decoder_lora_rank=8, decoder_lora_alpha=1.0)
    qkvs = [blk.attn.qkv for blk in obj.decoder.decoder_blocks]
    assert all(isinstance(q, LoRAQKV) and q.targets == ("q", "v") and q.scaling == 1 / 8 for q in qkvs)
    trainable = {n: p.numel() for n, p in obj.decoder.named_parameters() if p.requires_grad}
    lora = {n: c for n, c in trainable.items() if "lora_" in n}
    norms = {n: c for n, c in trainable.items() if "lora_" not in n}
    assert sum(lora.values()) == 8 * 2 * 2 * 512 * 8 == 131_072  # blocks x (q, v) x (A, B) x width x rank
    expected_norms = {f"decoder_blocks.{i}.{nm}.{w}" for i in range(8) for nm in ("norm1", "norm2")
                      for w in ("weight", "bias")} | {"decoder_norm.weight", "decoder_norm.bias"}
    assert set(norms) == expected_norms and sum(norms.values()) == 17 * 2 * 512 == 17_408
    assert {n for n, p in obj.decoder.named_parameters() if not p.requires_grad} >= {
        "decoder_embed.weight", "decoder_pred.weight", "mask_token", "decoder_blocks.0.attn.qkv.weight",
        "decoder_blocks.7.mlp.fc2.weight", "decoder_blocks.3.attn.proj.bias"}
    assert obj.parameter_report().extra == {"decoder": 131_072 + 17_408}

    batch = obj.batch_transform()(torch.rand(2, 3, 32, 32), torch.Generator().manual_seed(0))
    obj(batch, 0).loss.backward()
    with_grad = {n for n, p in obj.decoder.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)
    assert all(qkv.lora_B.grad.abs().sum() > 0 for qkv in qkvs)  # B = 0 at init, so only B's gradient is non-zero
    assert obj.decoder.decoder_norm.weight.grad.abs().sum() > 0


def test_decoder_lora_alpha_defaults_to_rank():
    obj = _objective(decoder_lora_rank=4)
    assert all(blk.attn.qkv.scaling == 1.0 for blk in obj.decoder.decoder_blocks)


def test_decoder_lora_update_changes_the_decoder_output():
    obj = _objective(decoder_lora_rank=4, decoder_lora_alpha=1.0)
    batch = obj.batch_transform()(torch.rand(2, 3, 32, 32), torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = obj.predict(batch)[0]
        for blk in obj.decoder.decoder_blocks:
            blk.attn.qkv.lora_B.normal_(0.0, 0.5)
        after = obj.predict(batch)[0]
        assert (after - before).abs().max() > 1e-2 * before.abs().max()
        # ... and it is the LoRA update: a copy with LoRA merged into plain Linears predicts the same
        merged = copy.deepcopy(obj)
        remove_lora(merged.decoder)
        assert type(merged.decoder.decoder_blocks[0].attn.qkv) is torch.nn.Linear
        torch.testing.assert_close(merged.predict(batch)[0], after, rtol=1e-4, atol=1e-5 * after.abs().max().item())


def test_decoder_lora_survives_a_state_dict_round_trip():
    obj = _objective(decoder_lora_rank=4)
    with torch.no_grad():
        for blk in obj.decoder.decoder_blocks:
            blk.attn.qkv.lora_B.normal_()
    state = copy.deepcopy(obj.state_dict())
    assert "decoder.decoder_blocks.1.attn.qkv.lora_B" in state
    torch.manual_seed(1)
    other = _objective(decoder_lora_rank=4)
    other.load_state_dict(state)
    batch = obj.batch_transform()(torch.rand(2, 3, 32, 32), torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(other.predict(batch)[0], obj.predict(batch)[0])


def test_decoder_lora_config_errors():
    with pytest.raises(ConfigError, match="train_decoder is false"):
        MAEConfig(decoder_lora_rank=8, train_decoder=False)
    with pytest.raises(ConfigError, match="decoder_lora_rank must be an integer >= 0"):
        MAEConfig(decoder_lora_rank=-1)
    with pytest.raises(ConfigError, match="mae.decoder_lora_targets: unknown LoRA target 'o'"):
        MAEConfig(decoder_lora_rank=8, decoder_lora_targets=("q", "o"))
    with pytest.raises(ConfigError, match="decoder_lora_alpha"):
        MAEConfig(decoder_lora_rank=8, decoder_lora_alpha=0.0)
    assert _objective(train_decoder=False).parameter_report().extra == {"decoder": 0}


def test_inject_lora_into_a_named_block_list():
    dec = MAEDecoder(64, (4, 4), 8, 3, dim=32, depth=3, heads=4)
    names = inject_lora(dec, (0, -1), ("q", "v", "fc2"), rank=2, blocks_attr="decoder_blocks")
    assert names == ["decoder_blocks.0.attn.qkv", "decoder_blocks.0.mlp.fc2",
                     "decoder_blocks.2.attn.qkv", "decoder_blocks.2.mlp.fc2"]
    assert type(dec.decoder_blocks[1].attn.qkv) is torch.nn.Linear
    with pytest.raises(ConfigError, match="already carries LoRA"):
        inject_lora(dec, (0,), ("q",), rank=2, blocks_attr="decoder_blocks")
    with pytest.raises(ConfigError, match="has no `blocks` block list"):
        inject_lora(dec, None, ("q",), rank=2)


# --- which targets the checkpoint's decoder was trained on ------------------------------------------------------


def _backbone_with_decoder(targets: str | None, absent: bool = False):
    backbone = build_backbone("test_mae")
    record_of(backbone).mae_decoder = MAEDecoder(64, (4, 4), 8, 3, **_DEC_ARGS).state_dict()
    record_of(backbone).source = "mae_fake_vit.pth"
    if not absent:
        record_of(backbone).mae_decoder_targets = targets
    return backbone


_DEC_ARGS = dict(dim=32, depth=2, heads=4)


@pytest.mark.parametrize(("targets", "norm_pix", "note"), [
    ("pixel", True, r"trained on raw pixels \(mae_visualize_\*\); this run continues it with norm-pix targets "
                    r"\(mae.norm_pix_loss=true\): the official ExPLoRA MAE recipe does exactly this"),
    ("norm_pix", False, r"trained on norm-pix targets \(mae_pretrain_\*_full\); this run continues it with raw "
                        r"pixels \(mae.norm_pix_loss=false\): set mae.norm_pix_loss=true"),
])
def test_decoder_targets_mismatch_is_noted_once(targets, norm_pix, note):
    with pytest.warns(UserWarning, match=note) as record:
        MAEObjective(_backbone_with_decoder(targets), MAEConfig(**SMALL, norm_pix_loss=norm_pix))
    notes = [w for w in record if "was trained on" in str(w.message)]
    assert len(notes) == 1 and "MAE decoder from mae_fake_vit.pth" in str(notes[0].message)


@pytest.mark.parametrize(("targets", "norm_pix", "absent"), [
    ("pixel", False, False), ("norm_pix", True, False), (None, True, False), (None, False, True),
])
def test_consistent_or_unknown_decoder_targets_say_nothing(targets, norm_pix, absent):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MAEObjective(_backbone_with_decoder(targets, absent), MAEConfig(**SMALL, norm_pix_loss=norm_pix))


def test_each_kind_has_its_class_and_mae_objective_refuses_another_kind():
    from explora.objectives.mae import GroupChannelMAEObjective, TemporalMAEObjective

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert type(_objective()) is MAEObjective
        assert type(_objective(kind="group_channel", group_dim=16, decoder_group_dim=8)) is GroupChannelMAEObjective
        assert type(_objective(kind="temporal", time_dim=16, decoder_time_dim=8)) is TemporalMAEObjective
        with pytest.raises(ConfigError, match="MAEObjective implements mae.kind='rgb'.*build_mae_objective"):
            MAEObjective(build_backbone("test_mae"), MAEConfig(kind="temporal", **SMALL))

