"""``explora predict``: class maps of whole scenes from a model trained by ``explora segment``, by sliding windows.

The model is rebuilt from the run directory: ``config.yaml`` (backbone name and weights, or an explora export),
``segmenter.json`` (classes, head, blocks, normalisation statistics, training size) and ``best/model.safetensors``
(LoRA merged, so it loads into the plain backbone). Each input scene is read window by window
(:class:`explora.eval.sliding.SceneReader`), predicted with overlap and blending
(:func:`explora.eval.sliding.sliding_window_probs`) under a progress bar, and written as
``<stem>_classes.tif`` (GeoTIFF inputs: uint8 class indices carrying the input's georeferencing tags, so GIS tools
place it where the scene is) or ``<stem>_classes.png`` (other inputs), plus ``<stem>_probs.tif`` (per-class
probability x 255, uint8, one band per class, same tags) when asked.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from explora.core.config import from_dict, load_yaml
from explora.core.errors import CheckpointError, ConfigError
from explora.core.io import atomic_write, atomic_write_bytes
from explora.eval.sliding import SceneReader, num_windows, sliding_window_probs
from explora.models.seg_heads import SegmentationModel
from explora.objectives.segmentation import normalise
from explora.recipes.evaluate import eval_backbone
from explora.recipes.segment import SEGMENTER_FILE
from explora.recipes.segment_config import PredictConfig, SegmentConfig

# GeoTIFF georeferencing tags (GeoTIFF 1.0 spec: ModelPixelScale, ModelTiepoint, ModelTransformation,
# GeoKeyDirectory, GeoDoubleParams, GeoAsciiParams): copied from a scene to its class map.
GEO_TAGS = (33550, 33922, 34264, 34735, 34736, 34737)


def load_segmenter(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The best model of an ``explora segment`` run (eval mode) and its ``segmenter.json``."""
    run = Path(run_dir)
    for name in ("config.yaml", SEGMENTER_FILE, "best/model.safetensors"):
        if not (run / name).is_file():
            raise CheckpointError(f"{run / name}: not found; expected the directory of an `explora segment` run")
    cfg = from_dict(SegmentConfig, load_yaml(run / "config.yaml"), str(run / "config.yaml"))
    info = json.loads((run / SEGMENTER_FILE).read_text())
    backbone = eval_backbone(cfg, int(info["in_chans"]))
    model = SegmentationModel(backbone, int(info["num_classes"]), head=info["head"], blocks=tuple(info["blocks"]),
                              channels=int(info["channels"]))
    state = load_file(run / "best" / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{run / 'best/model.safetensors'}: does not fit the model of {run / 'config.yaml'} "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.to(device).eval(), info


def geo_tags(path: Path) -> list[tuple[int, int, int, Any, bool]]:
    """The georeferencing tags of a TIFF as tifffile ``extratags`` (empty for other files or plain TIFFs)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return []
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        return [(t.code, int(t.dtype), t.count, t.value, True) for t in tags.values() if t.code in GEO_TAGS]


def _write_tiff(path: Path, array: np.ndarray, tags: list, planar: bool = False) -> None:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, photometric="minisblack", extratags=tags, planarconfig="separate" if planar else None)
    atomic_write_bytes(path, buf.getvalue())


def predict_scene(model: nn.Module, info: dict[str, Any], path: str | Path, out_dir: str | Path, *,
                  window: int | None = None, overlap: int | None = None, blend: str = "hann", batch_size: int = 8,
                  probs: bool = False, scratch: str | None = None, device: str | torch.device = "cpu"
                  ) -> dict[str, Any]:
    """Predict one scene; returns the paths written and the window count."""
    path, out_dir = Path(path), Path(out_dir)
    window = int(window or info["image_size"])
    patch = int(info.get("patch_size", 1))
    if window % patch:
        raise ConfigError(f"window={window}: expected a multiple of the patch size {patch}")
    overlap = window // 4 if overlap is None else int(overlap)
    reader = SceneReader(path)
    c, h, w = reader.shape
    if c != int(info["in_chans"]):
        raise ConfigError(f"{path}: {c} band(s) but the model was trained on {info['in_chans']}")
    mean, std = tuple(info["mean"]), tuple(info["std"])

    def forward(tiles: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(normalise(tiles.to(device), mean, std))

    total = num_windows(h, w, window, overlap)
    bar = tqdm(total=total, desc=f"predict {path.name}", unit="window", dynamic_ncols=True)
    try:
        p = sliding_window_probs(forward, reader.read, h, w, int(info["num_classes"]), window=window,
                                 overlap=overlap, blend=blend, batch_size=batch_size, scratch=scratch,
                                 progress=lambda done, _: bar.update(done - bar.n))
    finally:
        bar.close()
        reader.close()
    classes = np.empty((h, w), dtype=np.uint8 if info["num_classes"] <= 256 else np.uint16)  # (H, W)
    for r in range(0, h, 512):  # row blocks: a memory-mapped probability array is never loaded whole
        classes[r : r + 512] = p[:, r : r + 512].argmax(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    tags = geo_tags(path)
    written: dict[str, Any] = {"input": str(path), "windows": total, "size": [h, w]}
    if path.suffix.lower() in (".tif", ".tiff"):
        written["classes"] = out_dir / f"{path.stem}_classes.tif"
        _write_tiff(written["classes"], classes, tags)
    else:
        written["classes"] = out_dir / f"{path.stem}_classes.png"
        atomic_write(written["classes"], lambda f: Image.fromarray(classes).save(f, format="PNG"))
    if probs:
        written["probs"] = out_dir / f"{path.stem}_probs.tif"
        scaled = np.empty(p.shape, dtype=np.uint8)
        for r in range(0, h, 512):
            scaled[:, r : r + 512] = np.rint(np.clip(p[:, r : r + 512], 0, 1) * 255)
        _write_tiff(written["probs"], scaled, tags, planar=True)
    return written


def run_predict(cfg: PredictConfig) -> list[dict[str, Any]]:
    """Predict every input scene of ``cfg``."""
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else (
        "cpu" if cfg.device == "auto" else cfg.device)
    model, info = load_segmenter(cfg.run, device)
    return [predict_scene(model, info, p, cfg.out, window=cfg.window, overlap=cfg.overlap, blend=cfg.blend,
                          batch_size=cfg.batch_size, probs=cfg.probs, scratch=cfg.scratch, device=device)
            for p in cfg.input]


__all__ = ["GEO_TAGS", "geo_tags", "load_segmenter", "predict_scene", "run_predict"]
