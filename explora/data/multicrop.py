"""Batched DinoV2 multi-crop augmentation.

The recipe is DinoV2's ``DataAugmentationDINO`` (``dinov2/data/augmentations.py``): 2 global crops
(random-resized-crop, scale (0.32, 1.0), bicubic) and ``n_local`` local crops (scale (0.05, 0.32)), horizontal flip,
colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur (kernel 9, sigma in [0.1, 2.0]) with
p=1.0 on global crop 1, p=0.1 on global crop 2 and p=0.5 on local crops, solarize (threshold 128/255) p=0.2 on global
crop 2, then mean/std normalisation.

Upstream applies it image by image on PIL images. Here it runs on a whole batch with tensor ops: each crop set is
ONE ``affine_grid``/``grid_sample`` call (crop box + flip encoded in the affine matrix), and every photometric op is
vectorised with per-sample random parameters, so there is no Python loop over samples or pixels.

Output ordering (documented contract): ``global`` is ``(2B, C, G, G)`` with all first-view crops (index ``b``) then
all second-view crops (index ``B + b``); ``local`` is ``(n_local * B, C, L, L)`` with local crop ``i`` of sample
``b`` at ``i * B + b``.

Deliberate differences from upstream (all configurable):
- Upstream DinoV2's ``GaussianBlur(p)`` wraps torchvision's ``RandomApply`` with ``1 - p`` (its code comment says
  torchvision applies ``1 - p``, which is not true), so it effectively blurs global crop 1 never, global crop 2 with
  p=0.9 and locals with p=0.5. We default to the documented recipe (1.0 / 0.1 / 0.5); pass
  ``blur_p=(0.0, 0.9, 0.5)`` to reproduce upstream's effective behaviour.
- ``grid_sample`` does not antialias when it shrinks; crops are sampled directly from the input at the output size.
- Multispectral inputs (``photometric='multispectral'``) get only geometric ops, per-band brightness/contrast jitter,
  blur and optional band dropout: hue, saturation, grayscale and solarize are defined for RGB only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from explora.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def _rand(n: int, generator: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def random_resized_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float],
                              ratio: tuple[float, float], generator: torch.Generator,
                              attempts: int = 10) -> torch.Tensor:
    """Crop boxes ``(n, 4)`` as ``(top, left, h, w)`` in pixels, sampled as torchvision's RandomResizedCrop does.

    Each sample tries ``attempts`` (area, log-aspect) draws and keeps the first that fits; samples with none fall back
    to the central crop with the aspect ratio clamped to ``ratio`` (torchvision's fallback).
    """
    area = height * width
    target = area * _rand(n * attempts, generator, *scale).view(n, attempts)
    log_r = _rand(n * attempts, generator, math.log(ratio[0]), math.log(ratio[1])).view(n, attempts)
    aspect = torch.exp(log_r)
    w = torch.sqrt(target * aspect).round()  # (n, attempts)
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(n, dtype=torch.long))
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    # fallback: central crop at the clamped aspect ratio
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    any_ok = ok.any(1)
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    u = _rand(2 * n, generator).view(2, n)
    top = torch.where(any_ok, torch.floor(u[0] * (height - h + 1)), (height - h) // 2)
    left = torch.where(any_ok, torch.floor(u[1] * (width - w + 1)), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def _filter(d: torch.Tensor, mode: str) -> torch.Tensor:
    """Resampling kernels of PIL: Keys cubic with a=-0.5 (``bicubic``) or the triangle (``bilinear``)."""
    d = d.abs()
    if mode == "bilinear":
        return (1 - d).clamp_min(0)
    a = -0.5
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return torch.where(d < 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def resample_taps(start: torch.Tensor, length: torch.Tensor, size: int, n_in: int,
                  mode: str = "bicubic") -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse 1-D resampling of input pixels ``[start, start+length)`` to ``size`` outputs, per sample.

    Returns tap indices and weights, both (B, size, K). Same filter as PIL's ``Image.resize`` (which torchvision
    uses for PIL crops): the kernel is stretched by the downscale factor (antialiasing), clipped to the crop box and
    renormalised.
    """
    radius = 2.0 if mode == "bicubic" else 1.0
    scale = length / size  # (B,)
    stretch = scale.clamp_min(1.0)  # (B,)
    n_taps = int(math.ceil(2 * radius * float(stretch.max()))) + 2 if len(scale) else 1
    centre = start[:, None] + (torch.arange(size, dtype=scale.dtype) + 0.5) * scale[:, None]  # (B, S)
    first = torch.floor(centre - radius * stretch[:, None])  # (B, S)
    idx = first[..., None] + torch.arange(n_taps, dtype=scale.dtype)  # (B, S, K)
    w = _filter((idx + 0.5 - centre[..., None]) / stretch[:, None, None], mode)  # (B, S, K)
    inside = (idx >= start[:, None, None]) & (idx < (start + length)[:, None, None])
    w = w * inside
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    return idx.clamp(0, n_in - 1).long(), w


def _resample_rows(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` (B, C, H, W) along H with per-sample taps ``idx``/``w`` (B, S, K) -> (B, C, S, W).

    Each tap is one ``index_select`` of whole contiguous rows (a memcpy), weighted and accumulated.
    """
    b, c, h, wd = x.shape
    flat = x.reshape(b * c * h, wd)
    base = torch.arange(b * c).view(b, c, 1) * h  # (B, C, 1) first row of each (sample, band)
    out = None
    for k in range(idx.shape[-1]):
        rows = flat.index_select(0, (base + idx[:, None, :, k]).flatten()).view(b, c, -1, wd)  # (B, C, S, W)
        term = rows.mul_(w[:, None, :, k, None])
        out = term if out is None else out.add_(term)
    return out


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int,
                mode: str = "bicubic") -> torch.Tensor:
    """Crop ``boxes`` (B, 4) out of ``images`` (B, C, H, W), resize to ``size`` and flip where ``flip`` (B,) is set.

    An axis-aligned crop-and-resize is separable: one pass over rows, one over columns, each a few gathered taps
    per output pixel with per-sample weights (no per-sample Python loop); a horizontal flip reverses the column taps.
    """
    _, _, height, width = images.shape
    top, left, h, w = boxes.to(images.dtype).unbind(1)
    iy, wy = resample_taps(top, h, size, height, mode)  # (B, S, K)
    ix, wx = resample_taps(left, w, size, width, mode)
    f = flip[:, None, None]
    ix, wx = torch.where(f, ix.flip(1), ix), torch.where(f, wx.flip(1), wx)
    rows = _resample_rows(images, iy, wy)  # (B, C, S, W)
    cols = _resample_rows(rows.transpose(2, 3).contiguous(), ix, wx)  # (B, C, S_x, S_y)
    return cols.transpose(2, 3).contiguous()  # (B, C, S, S)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels (n, k) for per-sample ``sigma`` (n,), as torchvision builds them."""
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size)  # (k,)
    k = torch.exp(-0.5 * (x[None] / sigma[:, None]) ** 2)  # (n, k)
    return k / k.sum(1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 9) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image: x (n, C, H, W), sigma (n,); reflect padding."""
    n, c, h, w = x.shape
    k = gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(c, 0)  # (n*C, k)
    pad = kernel_size // 2
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)  # along W
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), k[:, None, :, None], groups=n * c)  # along H
    return y.reshape(n, c, h, w)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (n, 1, H, W) of RGB images (n, 3, H, W)."""
    wts = torch.tensor(_GRAY, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * wts).sum(1, keepdim=True)


def _bcast(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, *([1] * 3))  # (n,) -> (n, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _bcast(f)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (n, 1, 1, 1)
    return (_bcast(f) * x + (1 - _bcast(f)) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (_bcast(f) * x + (1 - _bcast(f)) * grayscale(x)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``f`` (n,) turns in HSV space; matches torchvision's adjust_hue with a per-sample factor.

    HSV -> RGB uses the closed form ``c_k = v - v*s*clamp(min(k, 4 - k), 0, 1)``, ``k = (n_c + 6h) mod 6`` with
    ``n_c = 5, 3, 1`` for R, G, B, which avoids a per-sextant table.
    """
    r, g, b = x.unbind(1)  # each (n, H, W)
    maxc, argmax = x.max(1)
    minc = x.min(1).values
    delta = maxc - minc
    s = delta / maxc.clamp_min(1e-12)
    d = torch.where(delta == 0, torch.ones_like(delta), delta)
    hue = torch.where(argmax == 0, (g - b) / d, torch.where(argmax == 1, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    hue = torch.where(delta == 0, torch.zeros_like(hue), hue)
    h6 = torch.remainder(hue + 6.0 * f.view(-1, 1, 1), 6.0)  # (n, H, W), hue in sextants, rotated
    vs = maxc * s
    out = []
    for n_c in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n_c, 6.0)
        out.append(maxc - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, 1)  # (n, 3, H, W)


def solarize(x: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def _apply(x: torch.Tensor, sel: torch.Tensor, fn, *params: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to the rows selected by the bool mask ``sel`` (n,), in place on a copy when needed."""
    idx = sel.nonzero().squeeze(1)
    if idx.numel():
        x[idx] = fn(x[idx], *(p[idx] for p in params))
    return x


def to_float_batch(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(B, C, H, W) or (C, H, W) uint8 / float, torch or numpy -> float32 (B, C, H, W) nominally in [0, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise DataError(f"MultiCrop expects a tensor or numpy array of images, got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise DataError(f"MultiCrop expects images shaped (B, C, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


class MultiCrop:
    """DinoV2 multi-crop on a batch: ``(images (B,C,H,W), generator) -> {'global': (2B,C,G,G), 'local': ...}``.

    Picklable (numbers and tuples only), so it runs inside data-loader workers. ``blur_p`` is the blur probability
    for (global crop 1, global crop 2, local crops). ``photometric`` is ``'rgb'`` (DinoV2's recipe; needs C=3) or
    ``'multispectral'`` (per-band brightness/contrast jitter, blur, ``band_dropout_p`` per band).
    """

    def __init__(self, global_size: int = 224, local_size: int = 98, n_local: int = 8,
                 global_scale: tuple[float, float] = (0.32, 1.0), local_scale: tuple[float, float] = (0.05, 0.32),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 photometric: str = "rgb", interpolation: str = "bicubic",
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                 jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1), jitter_p: float = 0.8,
                 grayscale_p: float = 0.2, blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
                 blur_sigma: tuple[float, float] = (0.1, 2.0), blur_kernel: int = 9, solarize_p: float = 0.2,
                 band_dropout_p: float = 0.0) -> None:
        if photometric not in ("rgb", "multispectral"):
            raise ConfigError(f"MultiCrop photometric must be 'rgb' or 'multispectral', got {photometric!r}")
        if interpolation not in ("bilinear", "bicubic"):
            raise ConfigError(f"MultiCrop interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
        if len(mean) != len(std):
            raise ConfigError(f"MultiCrop mean ({len(mean)} values) and std ({len(std)} values) differ in length")
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.photometric, self.interpolation, self.ratio, self.flip_p = photometric, interpolation, ratio, flip_p
        self.jitter, self.jitter_p, self.grayscale_p = tuple(jitter), jitter_p, grayscale_p
        self.blur_p, self.blur_sigma, self.blur_kernel = tuple(blur_p), tuple(blur_sigma), blur_kernel
        self.solarize_p, self.band_dropout_p = solarize_p, band_dropout_p

    # -- geometric -------------------------------------------------------------------------------------------
    def _crops(self, images: torch.Tensor, size: int, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
        b, _, h, w = images.shape
        boxes = random_resized_crop_boxes(b, h, w, scale, self.ratio, g)
        flip = torch.rand(b, generator=g) < self.flip_p
        out = crop_resize(images, boxes, flip, size, self.interpolation)
        return out.clamp_(0, 1) if self.photometric == "rgb" else out  # bicubic overshoot

    # -- photometric -----------------------------------------------------------------------------------------
    def _color_jitter_rgb(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        bri, con, sat, hue = self.jitter
        apply = torch.rand(n, generator=g) < self.jitter_p
        factors = [_rand(n, g, max(0.0, 1 - bri), 1 + bri), _rand(n, g, max(0.0, 1 - con), 1 + con),
                   _rand(n, g, max(0.0, 1 - sat), 1 + sat), _rand(n, g, -hue, hue)]
        ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
        order = torch.rand(n, 4, generator=g).argsort(1)  # a random permutation of the 4 ops per sample
        for pos in range(4):
            for k, op in enumerate(ops):
                x = _apply(x, apply & (order[:, pos] == k), op, factors[k])
        gray = torch.rand(n, generator=g) < self.grayscale_p
        return _apply(x, gray, lambda y: grayscale(y).expand_as(y).contiguous())

    def _color_jitter_bands(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, c = x.shape[:2]
        bri, con = self.jitter[0], self.jitter[1]
        apply = (torch.rand(n, generator=g) < self.jitter_p).view(n, 1, 1, 1)
        fb = _rand(n * c, g, max(0.0, 1 - bri), 1 + bri).view(n, c, 1, 1)  # per-band factors
        fc = _rand(n * c, g, max(0.0, 1 - con), 1 + con).view(n, c, 1, 1)
        y = x * fb
        mean = y.mean(dim=(2, 3), keepdim=True)  # (n, C, 1, 1)
        y = fc * y + (1 - fc) * mean
        x = torch.where(apply, y, x)
        if self.band_dropout_p > 0:
            keep = (torch.rand(n, c, generator=g) >= self.band_dropout_p).to(x.dtype).view(n, c, 1, 1)
            x = x * keep
        return x

    def _photometric(self, x: torch.Tensor, blur_p: float, solarize_p: float, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        if self.photometric == "rgb":
            x = self._color_jitter_rgb(x, g)
        else:
            x = self._color_jitter_bands(x, g)
        blur = torch.rand(n, generator=g) < blur_p
        sigma = _rand(n, g, *self.blur_sigma)
        x = _apply(x, blur, lambda y, s: gaussian_blur(y, s, self.blur_kernel), sigma)
        if self.photometric == "rgb" and solarize_p > 0:
            x = _apply(x, torch.rand(n, generator=g) < solarize_p, solarize)
        return x

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def __call__(self, images: torch.Tensor | np.ndarray, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = to_float_batch(images)
        c = x.shape[1]
        if len(self.mean) != c:
            raise DataError(f"MultiCrop got {c}-band images but mean/std have {len(self.mean)} values")
        if self.photometric == "rgb" and c != 3:
            raise DataError(f"MultiCrop photometric='rgb' needs 3 bands, got {c}; use photometric='multispectral'")
        g = generator
        g1 = self._photometric(self._crops(x, self.global_size, self.global_scale, g), self.blur_p[0], 0.0, g)
        g2 = self._photometric(self._crops(x, self.global_size, self.global_scale, g), self.blur_p[1],
                               self.solarize_p, g)
        out = {"global": self._normalize(torch.cat([g1, g2]))}  # (2B, C, G, G): view 1 then view 2
        if self.n_local > 0:
            locs = [self._photometric(self._crops(x, self.local_size, self.local_scale, g), self.blur_p[2], 0.0, g)
                    for _ in range(self.n_local)]
            out["local"] = self._normalize(torch.cat(locs))  # (n_local*B, C, L, L), crop-major
        else:
            out["local"] = x.new_zeros(0, c, self.local_size, self.local_size)
        return out
