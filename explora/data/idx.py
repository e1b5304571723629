"""MNIST / Fashion-MNIST from their IDX files (LeCun's format), e.g. ``/usr/share/datasets/fashion-mnist``.

IDX layout: big-endian magic ``0x00000803`` (uint8, 3 dims) for images, ``0x00000801`` for labels, then one
uint32 per dimension, then the raw bytes. Files may be gzipped. Decoded once at construction (60000 28x28
images are 47 MB), so workers only index into an array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from explora.core.errors import ConfigError, DataError
from explora.data.base import ExploraDataset
from explora.data.io import open_maybe_gzip

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes with ``ndim`` dimensions into an array."""
    raw = open_maybe_gzip(path)
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX file of {len(raw)} bytes is truncated; expected a {4 + 4 * ndim}-byte header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + ndim:
        raise DataError(f"{path}: IDX magic {magic:#010x}; expected {0x800 + ndim:#010x} (uint8, {ndim} dims)")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: IDX body has {body.size} bytes; expected {int(np.prod(dims))} for shape {dims}")
    return body.reshape(dims)


def find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        for d in (root, root / "raw", *sorted(p for p in root.glob("*/raw"))):
            if (d / name).is_file():
                return d / name
    return None


class IdxDataset(ExploraDataset):
    """``fashion_mnist:/dir`` or ``mnist:/dir`` (``split='train'`` 60000 / ``'test'`` 10000 images).

    Images are ``(1, 28, 28)`` uint8, or ``(3, 28, 28)`` with ``rgb=True`` (grayscale replicated, for RGB
    backbones). When the files are absent and ``download=True``, torchvision downloads them into ``dir``.
    """

    def __init__(self, root: str | Path, *, kind: str = "fashion_mnist", split: str = "train", rgb: bool = False,
                 download: bool = False, image_size: int | None = None, on_error: str = "raise") -> None:
        super().__init__(image_size=image_size, on_error=on_error)
        if split not in PREFIX:
            raise ConfigError(f"{kind} split={split!r}; expected one of {list(PREFIX)}")
        root = Path(root)
        self.source = str(root)
        self.classes = FASHION_CLASSES if kind == "fashion_mnist" else MNIST_CLASSES
        stems = (f"{PREFIX[split]}-images-idx3-ubyte", f"{PREFIX[split]}-labels-idx1-ubyte")
        paths = [find_idx(root, s) for s in stems]
        if None in paths and download:
            import torchvision.datasets as tvd

            cls = tvd.FashionMNIST if kind == "fashion_mnist" else tvd.MNIST
            try:
                cls(str(root), train=split == "train", download=True)
            except Exception as e:  # network errors come in many types
                raise DataError(f"{root}: IDX files absent and the torchvision download failed ({e})") from e
            paths = [find_idx(root, s) for s in stems]
        if None in paths:
            raise DataError(f"{root}: {stems[0]}(.gz) and {stems[1]}(.gz) not found; expected the IDX files "
                            f"(or pass download=True when online)")
        self.images = read_idx(paths[0], 3)  # (N, 28, 28)
        self.labels = read_idx(paths[1], 1)  # (N,)
        if len(self.images) != len(self.labels):
            raise DataError(f"{paths[0]}: {len(self.images)} images but {paths[1]} has {len(self.labels)} labels")
        if self.labels.size and int(self.labels.max()) >= len(self.classes):
            raise DataError(f"{paths[1]}: label {int(self.labels.max())} outside the {len(self.classes)} classes")
        self.rgb = rgb
        self.in_chans = 3 if rgb else 1
        self._require_nonempty("images")

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.images[index].copy())[None]  # (1, 28, 28)
        if self.rgb:
            image = image.expand(3, -1, -1).contiguous()  # (3, 28, 28)
        return image, int(self.labels[index])

    def _fill_stats(self) -> None:
        # Grayscale: estimate the single band once (cheap: the whole array is in memory), replicate for rgb.
        sample = self.images[:: max(1, len(self.images) // 10000)].astype(np.float64) / 255.0
        m, s = float(sample.mean()), float(sample.std())
        self.set_stats((m,) * self.in_chans, (s,) * self.in_chans)
