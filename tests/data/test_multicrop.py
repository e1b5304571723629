"""Batched multi-crop: shapes, ordering, determinism, PIL-equivalent resampling, vectorised photometric ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from explora.core.errors import DataError
from explora.data.multicrop import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCrop,
    _ranges,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    crop_resize,
    gaussian_blur,
    random_resized_crop_boxes,
)


def _smooth_image(h: int = 48, w: int = 56) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([127 + 100 * np.sin(xx / 5 + yy / 7), 127 + 100 * np.cos(xx / 9), yy * 4], -1).astype(np.uint8)


def test_shapes_order_and_determinism():
    mc = MultiCrop(global_size=32, local_size=16, n_local=3)
    images = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8)
    out = mc(images, torch.Generator().manual_seed(0))
    assert out["global"].shape == (4, 3, 32, 32) and out["local"].shape == (6, 3, 16, 16)
    again = mc(images, torch.Generator().manual_seed(0))
    assert torch.equal(out["global"], again["global"]) and torch.equal(out["local"], again["local"])
    assert not torch.equal(out["global"], mc(images, torch.Generator().manual_seed(1))["global"])
    # numpy input gives the same result as the tensor
    np_out = mc(images.numpy(), torch.Generator().manual_seed(0))
    assert torch.equal(np_out["global"], out["global"])


def test_memory_layouts_and_offsets_give_the_same_crops():
    # windows are as_strided views of the input: strides and storage offsets of any layout must be honoured
    mc = MultiCrop(global_size=24, local_size=12, n_local=2)
    big = torch.randint(0, 256, (5, 3, 40, 48), dtype=torch.uint8)
    ref = mc(big[2:4].contiguous(), torch.Generator().manual_seed(0))
    cl = big.contiguous(memory_format=torch.channels_last)[2:4]  # channels-last slice with a storage offset
    for images in (cl, big[2:4]):
        got = mc(images, torch.Generator().manual_seed(0))
        assert torch.equal(got["global"], ref["global"]) and torch.equal(got["local"], ref["local"])
    flt = big.float() / 255
    ref = mc(flt[2:4].contiguous(), torch.Generator().manual_seed(0))
    got = mc(flt.transpose(2, 3).contiguous().transpose(2, 3)[2:4], torch.Generator().manual_seed(0))  # strided
    for k in ("global", "local"):
        assert torch.allclose(got[k], ref[k], atol=1e-5), k


def test_global_view_ordering_follows_samples():
    # no photometric ops, full-image crops: view-major ordering means global[b] and global[B + b] come from image b
    mc = MultiCrop(global_size=16, local_size=8, n_local=2, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0,
                   jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0, mean=(0, 0, 0),
                   std=(1, 1, 1))
    images = torch.stack([torch.full((3, 16, 16), v) for v in (0.1, 0.5, 0.9)])
    out = mc(images, torch.Generator().manual_seed(0))
    assert torch.allclose(out["global"][:3], images, atol=1e-6)
    assert torch.allclose(out["global"][3:], images, atol=1e-6)
    assert torch.allclose(out["local"][3:].mean((1, 2, 3)), torch.tensor([0.1, 0.5, 0.9]), atol=1e-6)


def test_crop_resize_matches_pil_bicubic_and_flip():
    a = _smooth_image()
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    for (top, left, h, w), size in [((5, 7, 30, 40), 24), ((0, 0, 48, 56), 80), ((2, 3, 20, 20), 40)]:
        ref = Image.fromarray(a).crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
        ref_t = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255
        box = torch.tensor([[top, left, h, w]], dtype=torch.float32)
        got = crop_resize(x, box, torch.tensor([False]), size).clamp(0, 1)[0]
        assert (got - ref_t).abs().max() <= 1.5 / 255  # PIL rounds to 8 bit between passes
        flipped = crop_resize(x, box, torch.tensor([True]), size)[0]
        assert torch.allclose(flipped.flip(-1), crop_resize(x, box, torch.tensor([False]), size)[0], atol=1e-6)


def test_random_resized_crop_boxes_within_bounds_and_scale():
    g = torch.Generator().manual_seed(0)
    boxes = random_resized_crop_boxes(500, 60, 80, (0.2, 0.5), (3 / 4, 4 / 3), g)
    top, left, h, w = boxes.unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= 60).all() and (left + w <= 80).all())
    area = h * w / (60 * 80)
    assert float(area.min()) > 0.17 and float(area.max()) < 0.55  # rounding only


@pytest.mark.parametrize("name", ["hue", "contrast", "saturation", "blur"])
def test_photometric_ops_match_torchvision(name):
    x = torch.rand(4, 3, 12, 12)
    f = torch.tensor([0.6, 0.9, 1.2, 1.4])
    for i in range(4):
        if name == "hue":
            got, ref = adjust_hue(x, (f - 1) / 4)[i], TF.adjust_hue(x[i], float(f[i] - 1) / 4)
        elif name == "contrast":
            got, ref = adjust_contrast(x, f)[i], TF.adjust_contrast(x[i], float(f[i]))
        elif name == "saturation":
            got, ref = adjust_saturation(x, f)[i], TF.adjust_saturation(x[i], float(f[i]))
        else:
            got, ref = gaussian_blur(x, f)[i], TF.gaussian_blur(x[i], [9, 9], [float(f[i])] * 2)
        assert torch.allclose(got, ref, atol=1e-5), name


def test_hue_matches_torchvision_over_the_full_factor_range():
    # the closed form handles rotations beyond one sextant (whole thirds permute channels), grey pixels and ties
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 6, 6, generator=g)
    x[0, :, :2] = 0.5  # grey
    x[1, 0], x[2, 1] = x[1, 1], x[2, 2]  # ties between max / min channels
    x[3] = x[3].round()  # saturated primaries and secondaries
    f = torch.rand(64, generator=g) - 0.5
    f[:8] = torch.tensor([0.0, 0.5, -0.5, 1 / 6, -1 / 6, 1 / 3, -1 / 3, 1 / 12])
    got = adjust_hue(x, f)
    for i in range(64):
        assert torch.allclose(got[i], TF.adjust_hue(x[i], float(f[i])), atol=1e-5), i
    y = x.clone()
    assert torch.equal(adjust_hue(y, f, out=y), got)  # in place


def test_multispectral_and_errors():
    mc = MultiCrop(global_size=16, local_size=8, n_local=2, photometric="multispectral", mean=(0.5,) * 6,
                   std=(0.2,) * 6, band_dropout_p=0.5)
    out = mc(torch.rand(3, 6, 24, 24), torch.Generator().manual_seed(0))
    assert out["global"].shape == (6, 6, 16, 16) and out["local"].shape == (6, 6, 8, 8)
    with pytest.raises(DataError, match="3 bands"):
        MultiCrop(mean=(0.5,) * 6, std=(0.2,) * 6)(torch.rand(1, 6, 24, 24), torch.Generator())
    with pytest.raises(DataError, match="mean/std"):
        MultiCrop()(torch.rand(1, 4, 24, 24), torch.Generator())


def test_uint8_resample_matches_pil_within_one_level():
    a = _smooth_image(64, 72)
    x = torch.from_numpy(a).permute(2, 0, 1)[None]  # uint8, NCHW
    box = torch.tensor([[3.0, 5.0, 50.0, 60.0]])
    got = crop_resize(x, box, torch.tensor([False]), 24)[0]
    ref = torch.from_numpy(np.array(Image.fromarray(a).crop((5, 3, 65, 53)).resize((24, 24), Image.BICUBIC)))
    assert got.dtype == torch.uint8
    assert (got.permute(1, 2, 0).int() - ref.int()).abs().max() <= 1  # fixed point vs PIL's fixed point


def test_uint8_and_float_inputs_agree():
    images = torch.from_numpy(np.stack([_smooth_image(40, 40)] * 2)).permute(0, 3, 1, 2).contiguous()
    mc = MultiCrop(global_size=24, local_size=12, n_local=2)
    a = mc(images, torch.Generator().manual_seed(3))
    b = mc(images.float() / 255, torch.Generator().manual_seed(3))
    for k in ("global", "local"):
        diff = (a[k] - b[k]).abs()  # uint8 rounding after the resample only (normalised units, std ~0.22)
        assert float(diff.max()) < 0.06 and float(diff.mean()) < 0.005, k


def test_colour_jitter_follows_each_crops_order_like_torchvision():
    mc = MultiCrop(jitter_p=1.0)
    n = 8
    x = torch.rand(n, 3, 10, 10)
    p = mc._draw_rgb(n, torch.Generator().manual_seed(0))
    key = 5 + p["hue_pos"]  # not blurred
    perm = torch.argsort(key, stable=True)
    p = {k: v[perm] for k, v in p.items()}
    runs = _ranges(key[perm], 10)
    got = mc._jitter_rgb(x[perm].clone(), p, runs, 1.0)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(n):
        ref = x[perm[i]]
        for k in p["order"][i].tolist():
            ref = ops[k](ref, float(p["factors"][i, k]))
        assert torch.allclose(got[i], ref, atol=1e-5), i


def test_grayscale_solarize_and_normalisation_paths():
    # identity crops (input already at the crop size, full scale, square): only the photometric tail acts
    mc = MultiCrop(global_size=16, local_size=8, n_local=1, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0,
                   jitter_p=0.0, grayscale_p=1.0, blur_p=(0.0, 0.0, 0.0), solarize_p=1.0)
    x = torch.rand(3, 3, 16, 16)
    out = mc(x, torch.Generator().manual_seed(0))["global"]
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    gray = TF.rgb_to_grayscale(x, num_output_channels=3)
    assert torch.allclose(out[:3] * std + mean, gray, atol=1e-5)  # view 1: grayscale, no solarize
    assert torch.allclose(out[3:] * std + mean, TF.solarize(gray, 128 / 255), atol=1e-5)  # view 2: solarized


def test_blur_runs_only_on_selected_crops():
    mc = MultiCrop(global_size=16, local_size=8, n_local=4, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0,
                   jitter_p=0.0, grayscale_p=0.0, blur_p=(1.0, 0.0, 0.5), solarize_p=0.0, mean=(0, 0, 0),
                   std=(1, 1, 1))
    x = torch.rand(4, 3, 16, 16)
    out = mc(x, torch.Generator().manual_seed(0))["global"]
    assert not torch.allclose(out[:4], x, atol=1e-3)  # view 1 always blurred (sigma >= 0.1 changes pixels)
    assert torch.allclose(out[4:], x, atol=1e-6)  # view 2 never
