"""Adapters for datasets from other libraries: WILDS (optional ``wilds`` package) and any torchgeo-style dataset.

torchgeo segmentation datasets (items ``{"image", "mask"}``, e.g. ``LandCoverAI``, ``LoveDA``, ``Potsdam2D``) become
dense datasets (:class:`WrappedDenseDataset`: ``(image, mask)`` pairs checked like :mod:`explora.data.dense`'s);
their class list is the dataset's ``classes`` or ``classes=K`` in the spec.

Both are lazy: the packages are imported only when such a spec is built, and a missing package is a ConfigError
telling how to install it (they are optional extras, too heavy to require).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from explora.core.errors import ConfigError, DataError
from explora.data.base import ExploraDataset
from explora.data.dense import check_pair, resize_pair


def to_chw_tensor(image: Any, where: str) -> torch.Tensor:
    """PIL image, numpy array (H, W[, C]) or tensor (C, H, W) -> (C, H, W) tensor (uint8 kept, else float32)."""
    if isinstance(image, torch.Tensor):
        t = image
    elif isinstance(image, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(image))
        if t.ndim == 3:
            t = t.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    elif hasattr(image, "convert"):  # PIL
        arr = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
        t = torch.from_numpy(arr.copy())
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    else:
        raise DataError(f"{where}: sample image of type {type(image).__name__}; expected a tensor, array or PIL image")
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise DataError(f"{where}: sample image has shape {tuple(t.shape)}; expected (C, H, W)")
    return t if t.dtype == torch.uint8 else t.float()


def to_label(label: Any) -> int:
    if label is None:
        return -1
    if isinstance(label, torch.Tensor):
        return int(label.reshape(-1)[0]) if label.numel() else -1
    return int(label)


class WrappedDataset(ExploraDataset):
    """Any map-style dataset whose items are an image, ``(image, label, ...)`` or a dict with ``image``
    (and optionally ``label``) — torchgeo's non-geo datasets return the latter."""

    def __init__(self, inner: Dataset, *, classes: list[str] | None = None, source: str = "",
                 image_size: int | None = None, on_error: str = "raise") -> None:
        super().__init__(image_size=image_size, on_error=on_error)
        self.inner = inner
        self.source = source or type(inner).__name__
        self.classes = list(classes if classes is not None else getattr(inner, "classes", []) or [])
        n = getattr(inner, "n_classes", None)
        if not self.classes and isinstance(n, int):
            self.classes = [str(i) for i in range(n)]
        self._require_nonempty("samples")
        self.in_chans = self._probe_bands()

    def _probe_bands(self) -> int:
        """Band count of the first sample that loads (in skip mode bad leading samples are passed over)."""
        for i in range(len(self)):
            try:
                return int(self.load(i)[0].shape[0])
            except DataError:
                if self.on_error == "raise":
                    raise
        raise DataError(f"{self.source}: none of the {len(self)} samples could be read")

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        where = f"{self.source}[{index}]"
        try:
            item = self.inner[index]
        except DataError:
            raise
        except Exception as e:  # foreign loaders raise anything; name the sample
            raise DataError(f"{where}: the wrapped dataset failed ({type(e).__name__}: {e})") from e
        if isinstance(item, dict):
            if "image" not in item:
                raise DataError(f"{where}: sample dict has keys {sorted(item)}; expected 'image'")
            return to_chw_tensor(item["image"], where), to_label(item.get("label"))
        if isinstance(item, (tuple, list)):
            return to_chw_tensor(item[0], where), to_label(item[1]) if len(item) > 1 else -1
        return to_chw_tensor(item, where), -1


class WrappedDenseDataset(WrappedDataset):
    """A wrapped dataset whose dict items carry a per-pixel ``mask``: samples ``(image (C, H, W), mask (H, W))``."""

    dense = True

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        where = f"{self.source}[{index}]"
        try:
            item = self.inner[index]
        except Exception as e:
            raise DataError(f"{where}: the wrapped dataset failed ({type(e).__name__}: {e})") from e
        if not isinstance(item, dict) or "image" not in item or "mask" not in item:
            raise DataError(f"{where}: expected a dict with 'image' and 'mask' (a segmentation dataset)")
        image = to_chw_tensor(item["image"], where)
        mask = torch.as_tensor(np.asarray(item["mask"]) if not isinstance(item["mask"], torch.Tensor) else item["mask"])
        return image, check_pair(image, mask, len(self.classes), where, f"{where} mask")

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        self._check_bands(image, self.describe(index))
        return resize_pair(image, mask, self.image_size) if self.image_size is not None else (image, mask)


def _is_segmentation(inner: Dataset) -> bool:
    try:
        item = inner[0]
    except Exception:
        return False
    return isinstance(item, dict) and "mask" in item and "image" in item


def _import(name: str, extra: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(f"the {name!r} package is needed for this dataset spec but is not installed; "
                          f"install it with `pip install {extra}`") from e


class _WildsItems(Dataset):
    """A WILDS subset as ``(x, y)`` (y = -1 for unlabeled splits); module level so workers can unpickle it."""

    def __init__(self, subset: Any, unlabeled: bool) -> None:
        self.subset, self.unlabeled = subset, unlabeled

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, i: int) -> tuple:
        item = self.subset[i]
        return (item[0], -1) if self.unlabeled else (item[0], item[1])


def wilds_dataset(name: str, split: str, root: str, *, image_size: int | None = None,
                  on_error: str = "raise", download: bool = False) -> WrappedDataset:
    """``wilds:<name>:<split>:<root>`` (as ExPLoRA's linprobe): ``wilds.get_dataset(...).get_subset(split)``.

    Splits containing ``unlabeled`` (e.g. ``train_unlabeled``, ``extra_unlabeled``) open the unlabeled variant;
    their items are ``(x, metadata)`` and get label -1; labeled items are ``(x, y, metadata)``.
    """
    wilds = _import("wilds", "wilds")
    unlabeled = "unlabeled" in split
    try:
        ds = wilds.get_dataset(dataset=name, root_dir=root, unlabeled=unlabeled, download=download)
        subset = ds.get_subset(split)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"wilds:{name}:{split}:{root}: could not open ({e})") from e
    n = getattr(ds, "n_classes", None)
    classes = [str(i) for i in range(n)] if isinstance(n, int) and not unlabeled else []

    return WrappedDataset(_WildsItems(subset, unlabeled), classes=classes, source=f"wilds:{name}:{split}:{root}",
                          image_size=image_size, on_error=on_error)


def torchgeo_dataset(name: str, root: str, *, split: str = "train", image_size: int | None = None,
                     on_error: str = "raise", **kwargs: Any) -> WrappedDataset:
    """``torchgeo:<ClassName>:<root>`` — ``torchgeo.datasets.<ClassName>(root=..., split=..., **kw)`` wrapped."""
    tg = _import("torchgeo.datasets", "torchgeo")
    n_classes = kwargs.pop("classes", None)
    cls = getattr(tg, name, None)
    if cls is None:
        raise ConfigError(f"torchgeo.datasets has no {name!r}")
    try:
        inner = cls(root=root, split=split, **kwargs)
    except TypeError:
        inner = cls(root=root, **kwargs)  # datasets without splits
    except Exception as e:
        raise DataError(f"torchgeo:{name}:{root}: could not open ({type(e).__name__}: {e})") from e
    source = f"torchgeo:{name}:{root}"
    try:
        classes = [str(i) for i in range(int(n_classes))] if n_classes is not None else None
    except ValueError:
        raise ConfigError(f"{source}: option classes={n_classes!r}; expected the number of classes") from None
    if _is_segmentation(inner):
        if classes is None and not getattr(inner, "classes", None):
            raise ConfigError(f"{source}: a segmentation dataset without a 'classes' list; add classes=K to the spec")
        return WrappedDenseDataset(inner, classes=classes, source=source, image_size=image_size, on_error=on_error)
    return WrappedDataset(inner, classes=classes, source=source, image_size=image_size, on_error=on_error)
