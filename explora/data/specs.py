"""One selection syntax for every command: ``name:path[:key=value,...]`` -> a dataset.

Examples::

    fmow:/data/fmow/train_62classes.csv            fmow_sentinel:/data/train.csv:drop=0,9,10
    fmow_temporal:/data/train.csv:frames=3         imagefolder:/data/imgs
    csv:/data/list.csv                             folder:/data/scenes:chip=64,stride=32
    fashion_mnist:/usr/share/datasets/fashion-mnist:rgb=1
    eurosat:/data/EuroSAT                          resisc45:/data/NWPU-RESISC45
    wilds:camelyon17:train:/data/wilds             torchgeo:EuroSAT:/data/eurosat
    dicom:/data/ct:window=lung,frame=all           nifti:/data/vols:axis=2,skip_empty=1,window=brain
    seg_folder:/data/water:classes=2               seg_csv:/data/pairs.csv:class_map=classes.json
    spacenet:/data/AOI_2_Vegas_Train               (dense: (image, mask) pairs, explora.data.dense)

Any spec also takes ``by=<group>,val_fraction=0.2`` for a patient-level split (:mod:`explora.data.splits`).

Options come after the path as ``key=value`` pairs separated by commas (a value may itself be a comma list, as
``drop=0,9,10``); ExPLoRA's bare band list ``fmow_sentinel:<csv>:0,9,10`` means ``drop=0,9,10``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from explora.core.errors import ConfigError
from explora.data.base import ExploraDataset
from explora.data.dense import SegCsv, SegFolder, SpaceNet
from explora.data.dicom import DicomDataset
from explora.data.external import WrappedDataset, torchgeo_dataset, wilds_dataset
from explora.data.fmow import FMoWRGB, FMoWSentinel, FMoWTemporal
from explora.data.folders import RESISC45, EuroSAT, ImageFolderDataset, UnlabeledFolder
from explora.data.idx import IdxDataset
from explora.data.lists import CsvDataset
from explora.data.nifti import NiftiSlices
from explora.data.splits import OPTIONS as GROUP_OPTIONS
from explora.data.splits import grouped_split

_BAND_LIST = re.compile(r"^\d+(,\d+)*$")
_INT_KEYS = {"chip", "stride", "frames", "image_size", "channels", "axis", "seed"}
_LIST_KEYS = {"drop"}
_BOOL_KEYS = {"rgb", "download", "skip_empty"}


def parse_spec(spec: str) -> tuple[str, list[str], dict[str, Any]]:
    """Split ``name:a:b[:k=v,...]`` into ``(name, positional parts, options)`` with typed option values."""
    if ":" not in spec:
        raise ConfigError(f"dataset spec {spec!r}: expected 'name:path[:key=value,...]', e.g. 'imagefolder:/data'")
    name, rest = spec.split(":", 1)
    parts = rest.split(":")
    raw_opts: list[str] = []
    while len(parts) > 1 and ("=" in parts[-1] or (name == "fmow_sentinel" and _BAND_LIST.match(parts[-1]))):
        last = parts.pop()
        raw_opts.insert(0, last if "=" in last else f"drop={last}")
    opts: dict[str, Any] = {}
    for chunk in ",".join(raw_opts).split(","):
        if not chunk:
            continue
        if "=" in chunk:
            key, value = chunk.split("=", 1)
            opts[key.strip()] = value.strip()
        elif opts:
            key = list(opts)[-1]  # continuation of a comma list value: drop=0,9,10
            opts[key] = f"{opts[key]},{chunk.strip()}"
        else:
            raise ConfigError(f"dataset spec {spec!r}: option {chunk!r} is not key=value")
    for key, value in list(opts.items()):
        try:
            if key in _INT_KEYS:
                opts[key] = int(value)
            elif key in _LIST_KEYS:
                opts[key] = [int(v) for v in value.split(",") if v]
            elif key in _BOOL_KEYS:
                opts[key] = value.lower() in ("1", "true", "yes", "on")
        except ValueError:
            raise ConfigError(f"dataset spec {spec!r}: option {key}={value!r} is not a valid value") from None
    return name, parts, opts


def _path(name: str, parts: list[str]) -> Path:
    path = ":".join(parts)
    if not path:
        raise ConfigError(f"dataset spec '{name}:': a path is required")
    return Path(path).expanduser()


def _idx(kind: str) -> Callable[..., ExploraDataset]:
    return lambda parts, split, **kw: IdxDataset(_path(kind, parts), kind=kind, split=split, **kw)


def _wilds(parts: list[str], split: str, **kw: Any) -> ExploraDataset:
    if len(parts) < 2:
        raise ConfigError(f"wilds spec 'wilds:{':'.join(parts)}': expected wilds:<name>:<split>:<root> "
                          "or wilds:<name>:<root>")
    name, *middle, root = parts
    return wilds_dataset(name, middle[0] if middle else split, root, **kw)


def _torchgeo(parts: list[str], split: str, **kw: Any) -> ExploraDataset:
    if len(parts) < 2:
        raise ConfigError("torchgeo spec: expected torchgeo:<ClassName>:<root>")
    return torchgeo_dataset(parts[0], ":".join(parts[1:]), split=split, **kw)


BUILDERS: dict[str, Callable[..., ExploraDataset]] = {
    "fmow": lambda parts, split, **kw: FMoWRGB(_path("fmow", parts), **kw),
    "fmow_sentinel": lambda parts, split, **kw: FMoWSentinel(_path("fmow_sentinel", parts), **kw),
    "fmow_temporal": lambda parts, split, **kw: FMoWTemporal(_path("fmow_temporal", parts), **kw),
    "resisc45": lambda parts, split, **kw: RESISC45(_path("resisc45", parts), split=split, **kw),
    "eurosat": lambda parts, split, **kw: EuroSAT(_path("eurosat", parts), split=split, **kw),
    "imagefolder": lambda parts, split, **kw: ImageFolderDataset(_path("imagefolder", parts), **kw),
    "csv": lambda parts, split, **kw: CsvDataset(_path("csv", parts), **kw),
    "folder": lambda parts, split, **kw: UnlabeledFolder(_path("folder", parts), **kw),
    "fashion_mnist": _idx("fashion_mnist"),
    "mnist": _idx("mnist"),
    "wilds": _wilds,
    "torchgeo": _torchgeo,
    "dicom": lambda parts, split, **kw: DicomDataset(_path("dicom", parts), **kw),
    "nifti": lambda parts, split, **kw: NiftiSlices(_path("nifti", parts), **kw),
    "seg_folder": lambda parts, split, **kw: SegFolder(_path("seg_folder", parts), **kw),
    "seg_csv": lambda parts, split, **kw: SegCsv(_path("seg_csv", parts), **kw),
    "spacenet": lambda parts, split, **kw: SpaceNet(_path("spacenet", parts), **kw),
}


def build_dataset(spec: str | Dataset, *, split: str = "train", image_size: int | None = None,
                  on_error: str = "raise", **kw: Any) -> ExploraDataset:
    """Build the dataset a spec names. ``image_size`` resizes (shorter side) and center-crops each sample to a
    square in the worker; ``on_error`` is ``'raise'`` or ``'skip'``; extra keywords go to the dataset class and
    are overridden by options written in the spec. A non-string ``spec`` (e.g. a torchgeo dataset object) is
    wrapped as it is."""
    if isinstance(spec, ExploraDataset):
        return spec
    if not isinstance(spec, str):
        return WrappedDataset(spec, image_size=image_size, on_error=on_error)
    name, parts, opts = parse_spec(spec)
    builder = BUILDERS.get(name.lower())
    if builder is None:
        close = difflib.get_close_matches(name.lower(), BUILDERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"dataset spec {spec!r}: unknown dataset {name!r}{hint} (known: {', '.join(BUILDERS)})")
    kwargs: dict[str, Any] = {"image_size": image_size, "on_error": on_error, **kw, **opts}
    grouping = {k: kwargs.pop(k) for k in GROUP_OPTIONS if k in kwargs}
    split = kwargs.pop("split", split)
    try:
        dataset = builder(parts, split, **kwargs)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise ConfigError(f"dataset spec {spec!r}: {e}") from e
        raise
    return grouped_split(dataset, split, grouping) if grouping else dataset
