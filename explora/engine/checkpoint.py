"""Crash-safe training checkpoints.

A checkpoint is written to a temporary file in the same directory, flushed and fsync'ed, then renamed over its final
name (rename is atomic on POSIX), and only then is its manifest (size + sha256) written the same way. A checkpoint
without a manifest, or whose bytes do not match it, is ignored on resume with a warning and the previous good one is
used. So a run killed at any moment — even inside a write — leaves the last complete checkpoint intact.

Checkpoints hold only what training changes: trainable tensors, buffers and the EMA teacher's trainable copies. The
frozen pre-trained weights are rebuilt from the source checkpoint on resume (for ViT-L that is 18.7M instead of
300M+ parameters per file). They are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from explora.core.io import atomic_write_bytes, sha256_file

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def atomic_torch_save(obj: Any, path: str | Path) -> str:
    """``torch.save`` atomically; returns the sha256 of the bytes written."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


class CheckpointManager:
    """Numbered checkpoints ``ckpt-<step>.pt`` with ``.json`` manifests in one directory, keeping the last K."""

    def __init__(self, directory: str | Path, keep_last: int = 2) -> None:
        self.directory = Path(directory)
        self.keep_last = max(1, keep_last)

    def path_for(self, step: int) -> Path:
        return self.directory / f"ckpt-{step:08d}.pt"

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = self.path_for(step)
        digest = atomic_torch_save(state, path)
        manifest = {"step": step, "file": path.name, "bytes": path.stat().st_size, "sha256": digest}
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(manifest, indent=1).encode())
        self._prune()
        return path

    def _steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _NAME.match(p.name)))

    def _prune(self) -> None:
        for step in self._steps()[: -self.keep_last]:
            for p in (self.path_for(step), self.path_for(step).with_suffix(".json")):
                p.unlink(missing_ok=True)

    def verify(self, step: int) -> str | None:
        """None when checkpoint ``step`` is complete and intact, else the reason it is not."""
        path = self.path_for(step)
        manifest_path = path.with_suffix(".json")
        if not manifest_path.is_file():
            return "no manifest (the write did not finish)"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            return f"unreadable manifest ({e})"
        if not path.is_file():
            return "checkpoint file missing"
        if path.stat().st_size != manifest.get("bytes"):
            return f"size {path.stat().st_size} bytes, manifest says {manifest.get('bytes')} (truncated)"
        if sha256_file(path) != manifest.get("sha256"):
            return "sha256 does not match the manifest (corrupt)"
        return None

    def load_latest(self) -> dict[str, Any] | None:
        """The newest intact checkpoint (warning about each broken newer one), or None when there is none."""
        found = self.latest()
        return None if found is None else found[1]

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest intact checkpoint's path and contents (warning about each broken newer one), or None."""
        for step in reversed(self._steps()):
            problem = self.verify(step)
            if problem is not None:
                warnings.warn(
                    f"skipping checkpoint {self.path_for(step)}: {problem}; trying the previous one.", stacklevel=2
                )
                continue
            try:
                return self.path_for(step), torch.load(self.path_for(step), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure means this file is unusable
                warnings.warn(f"skipping checkpoint {self.path_for(step)}: cannot be read ({e}).", stacklevel=2)
        return None
