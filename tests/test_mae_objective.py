"""MAE objective: masking, loss, decoder loading, training on a fixed batch."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch

from explora.models.backbone import build_backbone
from explora.objectives.mae import (
    MAEConfig,
    MAEObjective,
    build_feature_extractor,
    draw_noise,
    random_masking,
    shared_masking,
)
from explora.objectives.mae.decoder import MAEDecoder, load_decoder_state
from explora.objectives.mae.loss import masked_mse, normalize_patches, patchify, unpatchify

SMALL = dict(decoder_dim=32, decoder_depth=2, decoder_heads=4)


def _objective(**kw) -> MAEObjective:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MAEObjective(build_backbone("test_mae"), MAEConfig(**{**SMALL, **kw}))


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


def test_shared_masking_same_positions_every_slice():
    noise = draw_noise(3, 16, torch.Generator().manual_seed(2))
    m = shared_masking(noise, 3, 0.75)
    assert m.mask.shape == (3, 48) and m.ids_keep.shape == (3, 12)
    per_slice = m.mask.reshape(3, 3, 16)
    assert torch.equal(per_slice[:, 0], per_slice[:, 1]) and torch.equal(per_slice[:, 0], per_slice[:, 2])
    assert (per_slice.sum(-1) == 12).all()
    shuffle = torch.argsort(m.ids_restore, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, m.ids_restore), torch.arange(48).expand(3, -1))


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


def test_grad_checkpointing_matches():
    obj = _objective()
    batch = obj.batch_transform()(torch.rand(2, 3, 32, 32), torch.Generator().manual_seed(0))
    ref = obj(batch, 0).loss
    obj.encoder.set_grad_checkpointing(True)
    out = obj(batch, 0).loss
    out.backward()
    assert torch.allclose(ref, out) and obj.encoder.blocks[0].attn.qkv.weight.grad is not None


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
    backbone.explora_extras["mae_decoder"] = {k: v for k, v in model_state.items()
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
    dst = MAEDecoder(64, (6, 6), 8, 3, dim=32, depth=1, heads=4)
    assert load_decoder_state(dst, src.state_dict()) == []
    assert dst.decoder_pos_embed.shape == (1, 37, 32)


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
