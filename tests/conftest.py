"""Shared fixtures: tiny timm ViTs with the real DinoV2/MAE module layouts, and paths to real material."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# shared helpers (data_fixtures, tolerances, ...) import by name from any test folder
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
SHARED = Path(os.environ.get("EXPLORA_SHARED", REPO.parent / "shared"))
DINOV2_VITS14 = SHARED / "weights" / "dinov2_vits14_pretrain.pth"
LANDSAT_SCENE = SHARED / "data" / "landsat7_etm_olinda_6band.tif"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_dinov2():
    """A 4-block, 64-wide DinoV2-layout ViT (LayerScale, patch 8, 32-px input), random weights."""
    from explora.models.backbone import build_backbone

    return build_backbone("test_dinov2")


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> Path:
    """A Fashion-MNIST-layout IDX directory (64 train, 16 test images), made once per test module."""
    from data_fixtures import idx_files

    root = tmp_path_factory.mktemp("fm")
    idx_files(root, n=64, prefix="train")
    idx_files(root, n=16, prefix="t10k")
    return root


@pytest.fixture
def tiny_mae():
    """A 4-block, 64-wide MAE-layout ViT (no LayerScale, patch 8, 32-px input), random weights."""
    from explora.models.backbone import build_backbone

    return build_backbone("test_mae")


def require(path: Path) -> Path:
    """Skip the calling test cleanly when a piece of real material is absent."""
    if not path.exists():
        pytest.skip(f"{path} not present on this machine")
    return path


def simulate_disk_full(monkeypatch, writes_that_fit: int = 0) -> None:
    """Every atomic write after the first ``writes_that_fit`` fails with ENOSPC, as on a full disk."""
    import errno

    import explora.core.io as atomic

    real_fdopen, opened = atomic.os.fdopen, []

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, mode):
        opened.append(fd)
        return real_fdopen(fd, mode) if len(opened) <= writes_that_fit else Full(real_fdopen(fd, mode))

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)
