"""Frozen-backbone features for the linear probe and kNN, computed once and cached on disk.

Upstream (ExPLoRA ``linprobe/linear.py``, following DinoV2 ``eval/linear.py``) runs the frozen backbone in eval mode
under autocast and calls ``get_intermediate_layers(x, n=4, return_class_token=True)`` with every output through the
final norm. On a timm ViT the same thing is ``forward_intermediates(indices=n, norm=True, return_prefix_tokens=True)``.
We keep the CLS token of each of the last ``n`` blocks and the mean of the *last* block's patch tokens: that is all any
of the probe heads reads, so a whole lr x n x avgpool sweep (and kNN) costs one forward pass over the data.

Any registered encoder (:func:`explora.models.encoder.as_encoder`) gives its own probe features
(:meth:`~explora.models.encoder.Encoder.probe_features`: the group-channel / temporal encoders give their all-token
mean as a single "CLS" feature with no patch mean). Backbones may also be plain callables ``images (B, C, H, W) ->
(B, D)``, stored the same way. A sample's third element (the frame timestamps of temporal datasets) is passed on as
the encoder's ``timestamps`` or the callable's second argument.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MethodType

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from explora.core.errors import ConfigError, DataError
from explora.data.windowing import require_unit_range
from explora.models.encoder import as_encoder, is_encoder

_log = logging.getLogger(__name__)

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


class EvalTransform:
    """Batched eval transform: resize the short side to ``image_size / crop_pct`` (bicubic, antialiased), centre
    crop ``image_size``, scale uint8 to [0, 1] and normalise per band.

    Upstream eval transform: Resize 256 + CenterCrop 224 (``crop_pct = 224/256``), the default here. ``mean``/``std``
    are in [0, 1] units, one value per band. Picklable, so it can run in data-loader workers.
    """

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], crop_pct: float = 224 / 256):
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_pct = float(crop_pct)

    def __repr__(self) -> str:
        return (
            f"EvalTransform(image_size={self.image_size}, mean={self.mean}, std={self.std}, crop_pct={self.crop_pct})"
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        require_unit_range(images, "evaluation transform")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()  # (B, C, H, W) in [0, 1]
        if x.shape[1] != len(self.mean):
            raise DataError(f"images have {x.shape[1]} bands but the transform has {len(self.mean)} mean values")
        h, w = x.shape[-2:]
        short = round(self.image_size / self.crop_pct)
        if min(h, w) != short:
            scale = short / min(h, w)
            x = F.interpolate(
                x,
                size=(max(short, round(h * scale)), max(short, round(w * scale))),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            )
        h, w = x.shape[-2:]
        top, left = (h - self.image_size) // 2, (w - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]  # (B, C, S, S)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def eval_transform_for(dataset, image_size: int, crop_pct: float = 224 / 256) -> EvalTransform:
    """The eval transform for a dataset exposing ``mean``/``std`` (the data contract)."""
    for attr in ("mean", "std"):
        if not hasattr(dataset, attr):
            raise DataError(f"dataset {type(dataset).__name__} has no `{attr}`; expected per-band statistics")
    return EvalTransform(image_size, tuple(dataset.mean), tuple(dataset.std), crop_pct)


@dataclass
class FeatureSet:
    """Cached features of one dataset split.

    ``cls``: (N, n_blocks, D) CLS tokens of the last ``n_blocks`` blocks (oldest first), each through the final norm;
    ``patch_mean``: (N, D) mean of the last block's normed patch tokens, or ``None`` for callable backbones;
    ``labels``: (N,) int64.
    """

    cls: torch.Tensor
    patch_mean: torch.Tensor | None
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.cls.shape[1]

    def linear_input(self, n_blocks: int, avgpool: bool) -> torch.Tensor:
        """Upstream ``create_linear_input``: CLS of the last ``n_blocks`` blocks (+ patch mean if ``avgpool``)."""
        if n_blocks > self.n_blocks:
            raise ConfigError(f"linear head wants the last {n_blocks} blocks but features hold only {self.n_blocks}")
        parts = [self.cls[:, -n_blocks:].flatten(1)]  # (N, n*D)
        if avgpool:
            if self.patch_mean is None:
                raise ConfigError("avgpool=True needs patch tokens; this backbone is a feature function without them")
            parts.append(self.patch_mean)  # (N, D)
        return torch.cat(parts, dim=1)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        tensors = {"cls": self.cls.contiguous(), "labels": self.labels.contiguous()}
        if self.patch_mean is not None:
            tensors["patch_mean"] = self.patch_mean.contiguous()
        save_file(tensors, str(path), metadata=metadata or {})

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        t = load_file(str(path))
        return cls(cls=t["cls"], patch_mean=t.get("patch_mean"), labels=t["labels"])


def module_fingerprint(module: nn.Module) -> str:
    """SHA-256 over parameter/buffer names, dtypes, shapes and bytes: a cache key that changes with any weight."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def vit_features(model: nn.Module, images: torch.Tensor, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS of the last ``n_blocks`` blocks (B, n, D) and last-block patch mean (B, D), all through the final norm."""
    return as_encoder(model).probe_features(images, n_blocks)


def _feature_source_key(model: nn.Module | FeatureFn, model_key: str | None) -> str:
    if model_key is not None:
        return model_key
    owner = model if isinstance(model, nn.Module) else model.__self__ if isinstance(model, MethodType) else None
    if isinstance(owner, nn.Module):
        return f"{type(owner).__name__}:{module_fingerprint(owner)}"
    raise ConfigError("feature caching needs `model_key` for a plain feature function (its weights cannot be hashed)")


def _dataset_key(dataset, dataset_key: str | None) -> str:
    if dataset_key is not None:
        return dataset_key
    spec = getattr(dataset, "spec", None)
    if spec is None:
        raise ConfigError(
            f"feature caching needs `dataset_key` for {type(dataset).__name__} (it has no `spec` attribute)"
        )
    return f"{spec}|split={getattr(dataset, 'split', '')}|n={len(dataset)}"


@torch.no_grad()
def extract_features(
    model: nn.Module | FeatureFn,
    dataset,
    transform: Callable[[torch.Tensor], torch.Tensor],
    *,
    n_blocks: int = 4,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    model_key: str | None = None,
    dataset_key: str | None = None,
    progress: bool = True,
) -> FeatureSet:
    """Run the frozen backbone over ``dataset`` (items ``(image, label)``) once, in eval mode without gradients.

    With ``cache_dir`` the result is stored as ``<sha256>.safetensors`` keyed by the backbone weights (or
    ``model_key``), the dataset identity (``dataset_key`` or ``dataset.spec``), the transform's ``repr``, ``n_blocks``
    and the autocast dtype; a second call with the same key reads the file instead of running the model.
    """
    path = None
    if cache_dir is not None:
        key_src = "|".join(
            [
                _feature_source_key(model, model_key),
                _dataset_key(dataset, dataset_key),
                repr(transform),
                f"n={n_blocks}",
                str(autocast_dtype),
            ]
        )
        key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
        path = Path(cache_dir) / f"{key}.safetensors"
        if path.is_file():
            _log.info("features: cache hit %s", path)
            return FeatureSet.load(path)

    encoder = as_encoder(model) if is_encoder(model) else None
    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=False
    )
    cls_parts, patch_parts, label_parts = [], [], []
    try:
        for batch in tqdm(loader, desc="features", disable=not progress, leave=False):
            images, labels, extra = batch[0], batch[1], [t.to(device) for t in batch[2:]]  # extra: timestamps
            x = transform(images.to(device))  # (B, C, S, S) float, normalised
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if encoder is not None:  # what the probes read, as the encoder defines it
                    cls, patch_mean = encoder.probe_features(x, n_blocks, *extra[:1])
                    if patch_mean is not None:
                        patch_parts.append(patch_mean.float().cpu())
                else:
                    pooled = model(x, *extra)  # (B, D); temporal encoders also take timestamps (B, T, 3)
                    if pooled.ndim != 2:
                        raise DataError(f"feature function returned shape {tuple(pooled.shape)}; expected (batch, dim)")
                    cls = pooled[:, None]  # (B, 1, D)
            cls_parts.append(cls.float().cpu())
            label_parts.append(torch.as_tensor(labels).long().cpu())
    finally:
        if was_training:
            model.train()
    if not cls_parts:
        raise DataError(f"dataset {type(dataset).__name__} is empty; nothing to extract features from")
    feats = FeatureSet(torch.cat(cls_parts), torch.cat(patch_parts) if patch_parts else None, torch.cat(label_parts))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        feats.save(tmp, metadata={"key": key_src[:4000]})
        tmp.replace(path)
    return feats
