"""fMoW (Functional Map of the World) in the layouts ExPLoRA and SatMAE read: RGB, Sentinel-2, temporal.

Sources (re-implemented from their descriptions, no code copied): ExPLoRA ``linprobe/util/datasets.py``
(``CustomDatasetFromImages``, ``SentinelIndividualImageDataset``), SatMAE ``util/datasets.py`` (Cong et al.,
NeurIPS 2022) for the Sentinel normalisation, the 2000-2020 year filter and the temporal triplets.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from explora.core.errors import ConfigError, DataError
from explora.data.base import ExploraDataset, located
from explora.data.io import read_image, read_tiff_array
from explora.data.lists import CsvDataset, column, parse_label, read_csv

CATEGORIES = [
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture", "archaeological_site",
    "barn", "border_checkpoint", "burial_site", "car_dealership", "construction_site", "crop_field", "dam",
    "debris_or_rubble", "educational_institution", "electric_substation", "factory_or_powerplant",
    "fire_station", "flooded_road", "fountain", "gas_station", "golf_course", "ground_transportation_station",
    "helipad", "hospital", "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse",
    "military_facility", "multi-unit_residential", "nuclear_powerplant", "office_building",
    "oil_or_gas_facility", "park", "parking_lot_or_garage", "place_of_worship", "police_station", "port",
    "prison", "race_track", "railway_bridge", "recreational_facility", "road_bridge", "runway", "shipyard",
    "shopping_mall", "single-unit_residential", "smokestack", "solar_farm", "space_facility", "stadium",
    "storage_tank", "surface_mine", "swimming_pool", "toll_booth", "tower", "tunnel_opening", "waste_disposal",
    "water_treatment_facility", "wind_farm", "zoo",
]  # fmt: skip
assert len(CATEGORIES) == 62

# fMoW-RGB statistics as defined upstream (SatMAE/ExPLoRA); ExPLoRA's linear probe normalises with ImageNet's.
FMOW_RGB_MEAN = (0.4182007312774658, 0.4214799106121063, 0.3991275727748871)
FMOW_RGB_STD = (0.28774282336235046, 0.27541765570640564, 0.2764017581939697)

# Per-band statistics of fMoW-Sentinel digital numbers (SatMAE ``SentinelIndividualImageDataset``), bands B1..B12
# including B8A and B10, in file order.
SENTINEL_MEAN = (
    1370.19151926, 1184.3824625, 1120.77120066, 1136.26026392, 1263.73947144, 1645.40315151, 1846.87040806,
    1762.59530783, 1972.62420416, 582.72633433, 14.77112979, 1732.16362238, 1247.91870117,
)  # fmt: skip
SENTINEL_STD = (
    633.15169573, 650.2842772, 712.12507725, 965.23119807, 948.9819932, 1108.06650639, 1258.36394548,
    1233.1492281, 1364.38688993, 472.37967789, 14.3114637, 1310.36996126, 1087.6020813,
)  # fmt: skip
SENTINEL_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
SATMAE_DROPPED_BANDS = (0, 9, 10)  # B1, B9, B10: the atmospheric bands SatMAE drops -> 10 bands
YEARS = range(2000, 2021)  # SatMAE's default year filter


class FMoWRGB(CsvDataset):
    """``fmow:/path/train_62classes.csv`` — fMoW-RGB jpgs listed in an upstream CSV, 62 classes.

    ``stats='imagenet'`` (default, as ExPLoRA's linear probe) or ``'fmow'`` (the fMoW statistics SatMAE uses).
    """

    def __init__(self, csv_path: str | Path, *, stats: str = "imagenet", root: str | Path | None = None,
                 image_size: int | None = None, on_error: str = "raise") -> None:
        super().__init__(csv_path, classes=CATEGORIES, root=root, upstream=True, image_size=image_size,
                         on_error=on_error, in_chans=3)
        if stats not in ("imagenet", "fmow"):
            raise ConfigError(f"fmow stats={stats!r}; expected 'imagenet' or 'fmow'")
        if stats == "fmow":
            self.set_stats(FMOW_RGB_MEAN, FMOW_RGB_STD)


def sentinel_normalize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """SatMAE's SentinelNormalize: ``(x - (mean - 2 std)) / (4 std)`` clipped to [0, 1]; x is (C, H, W)."""
    lo = (mean - 2 * std)[:, None, None]  # (C, 1, 1)
    return np.clip((x.astype(np.float32) - lo) / (4 * std)[:, None, None], 0.0, 1.0).astype(np.float32)


def parse_timestamp(text: str, where: str) -> datetime:
    """fMoW timestamps are ISO 8601, e.g. ``2015-06-27T08:24:31Z``."""
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise DataError(f"{where}: timestamp {text!r} is not ISO 8601 (expected e.g. 2015-06-27T08:24:31Z)") from None


class _MetadataCsv(ExploraDataset):
    """Shared indexing of SatMAE metadata CSVs: columns ``category, location_id, timestamp, image_path``."""

    def _index(self, csv_path: Path, root: Path | None, years: Sequence[int] | None) -> list[dict]:
        header, rows = read_csv(csv_path)
        if header is None:
            raise DataError(f"{csv_path}: no header; expected columns category, location_id, timestamp, image_path")
        missing = [c for c in ("category", "location_id", "timestamp", "image_path") if c not in header]
        if missing:
            raise DataError(f"{csv_path}: header {header} lacks {missing}; expected category, location_id, "
                            "timestamp, image_path")
        cols = {c: column(header, [c], 0) for c in ("category", "location_id", "timestamp", "image_path")}
        base = root if root is not None else csv_path.parent
        out = []
        for row_no, cells in rows:
            where = f"{csv_path} row {row_no}"
            try:
                if len(cells) < len(header):
                    raise DataError(f"{where}: malformed row with {len(cells)} cells; expected {len(header)}")
                label = parse_label(cells[cols["category"]], CATEGORIES, where)
                ts = parse_timestamp(cells[cols["timestamp"]], where)
            except DataError as e:
                self._index_problem(str(e))
                continue
            if years is not None and ts.year not in years:
                continue  # SatMAE's year filter: not an error
            path = Path(cells[cols["image_path"]])
            path = path if path.is_absolute() else base / path
            out.append({"path": path, "label": label, "location": (label, cells[cols["location_id"]]),
                        "time": ts, "where": f"{where} ({path})"})
        return out


class FMoWSentinel(_MetadataCsv):
    """``fmow_sentinel:/path/train.csv[:drop=0,9,10]`` — 13-band Sentinel-2 GeoTIFFs, 62 classes.

    Each image is read with tifffile, normalised per band with SatMAE's hard-coded statistics to float32 in
    [0, 1] (:func:`sentinel_normalize`), then the ``drop`` bands are removed (SatMAE drops 0, 9, 10). Because that
    scaling already standardises the bands, ``mean``/``std`` for the engine's batched normalisation are 0 and 1
    (as SatMAE, which applies no further normalisation); ``stats='standard'`` gives 0.5/0.25 instead, which maps
    the band mean to 0 and one band std to 1.
    """

    def __init__(self, csv_path: str | Path, *, drop: Sequence[int] = (), root: str | Path | None = None,
                 years: Sequence[int] | None = YEARS, stats: str = "none", image_size: int | None = None,
                 on_error: str = "raise") -> None:
        super().__init__(image_size=image_size, on_error=on_error)
        self.source = str(csv_path)
        self.classes = list(CATEGORIES)
        bad = [b for b in drop if not 0 <= b < 13]
        if bad:
            raise ConfigError(f"fmow_sentinel drop={list(drop)}: bands {bad} outside 0..12")
        self.keep = [b for b in range(13) if b not in set(drop)]
        self.band_names = [SENTINEL_BANDS[b] for b in self.keep]
        self.in_chans = len(self.keep)
        self.rows = self._index(Path(csv_path), Path(root) if root else None, years)
        self._require_nonempty("13-band GeoTIFF rows")
        self._norm = (np.asarray(SENTINEL_MEAN), np.asarray(SENTINEL_STD))
        if stats == "none":
            self.set_stats((0.0,) * self.in_chans, (1.0,) * self.in_chans)
        elif stats == "standard":
            self.set_stats((0.5,) * self.in_chans, (0.25,) * self.in_chans)
        else:
            raise ConfigError(f"fmow_sentinel stats={stats!r}; expected 'none' or 'standard'")

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, index: int) -> str:
        return self.rows[index]["where"]

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.rows[index]
        try:
            arr = read_tiff_array(row["path"])  # (C, H, W)
        except DataError as e:
            raise located(row["where"], row["path"], e) from e
        if arr.shape[0] != 13:
            raise DataError(f"{row['where']}: GeoTIFF has {arr.shape[0]} bands; expected 13 Sentinel-2 bands")
        x = sentinel_normalize(arr, *self._norm)[self.keep]  # (13, H, W) -> (len(keep), H, W)
        return torch.from_numpy(np.ascontiguousarray(x)), row["label"]


class FMoWTemporal(_MetadataCsv):
    """``fmow_temporal:/path/train.csv[:frames=3]`` — T images of one location stacked on the channel axis.

    Item ``i`` is ``(image (T*C, H, W), label, timestamps (T, 3) int64)``: row ``i`` of the CSV first, then the
    next T-1 rows of the same ``(category, location_id)`` in time order (cyclically; a location with fewer than T
    images repeats its frames). Frames are ordered by time. ``timestamps[t] = (year, month 1-12, hour 0-23)`` raw
    calendar values; SatMAE's temporal encoder takes ``(year - 2002, month - 1, hour)``, which the objective
    derives. SatMAE picks the other frames at random; we pick them deterministically so epochs are reproducible
    without RNG state. All frames are resized to the first frame's size when ``image_size`` is unset.
    """

    def __init__(self, csv_path: str | Path, *, frames: int = 3, root: str | Path | None = None,
                 years: Sequence[int] | None = YEARS, image_size: int | None = None,
                 on_error: str = "raise") -> None:
        super().__init__(image_size=image_size, on_error=on_error)
        if frames < 1:
            raise ConfigError(f"fmow_temporal frames={frames}; expected >= 1")
        self.source = str(csv_path)
        self.classes = list(CATEGORIES)
        self.frames = frames
        self.rows = self._index(Path(csv_path), Path(root) if root else None, years)
        self._require_nonempty("image rows")
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(self.rows):
            groups[r["location"]].append(i)
        self.groups = {k: sorted(v, key=lambda i: self.rows[i]["time"]) for k, v in groups.items()}
        self.in_chans = 3 * frames

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, index: int) -> str:
        return self.rows[index]["where"]

    def frame_indices(self, index: int) -> list[int]:
        """Row indices of the T frames of item ``index``, in time order."""
        group = self.groups[self.rows[index]["location"]]
        start = group.index(index)
        picked = [group[(start + k) % len(group)] for k in range(self.frames)]
        return sorted(picked, key=lambda i: (self.rows[i]["time"], i))

    def load(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        images, stamps = [], []
        for i in self.frame_indices(index):
            row = self.rows[i]
            try:
                img = read_image(row["path"])
            except DataError as e:
                raise located(row["where"], row["path"], e) from e
            if img.shape[0] != 3:
                raise DataError(f"{row['where']}: frame has {img.shape[0]} bands; expected 3 (RGB)")
            if images and img.shape != images[0].shape:
                img = TF.resize(img, list(images[0].shape[-2:]), antialias=True)  # frames must stack
            images.append(img)
            t = row["time"]
            stamps.append((t.year, t.month, t.hour))
        # T x (3, H, W) -> (3T, H, W)
        return torch.cat(images, dim=0), self.rows[index]["label"], torch.tensor(stamps, dtype=torch.int64)
