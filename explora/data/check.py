"""``explora data check``: read every sample of a dataset before a long run and report what is wrong.

The report lists counts per class (per split), band counts and dtypes, native image sizes, every unreadable
file with the reason, and per-band statistics of the readable samples. ``clean`` is true only when nothing was
unreadable, nothing was dropped while indexing, and all samples agree on bands and dtype. DICOM / NIfTI datasets
add ``medical`` (sizes, bit depths, photometric interpretations, transfer syntaxes, the intensity range before and
after windowing) and ``warnings`` (inconsistent sizes or bit depths), which also make the report not clean.

Dense (segmentation) datasets are checked pair by pair: a missing mask, an image/mask size mismatch or a label
outside the class range is an unreadable sample whose message names the files; ``counts`` are the chips in which
each class occurs, and a mask with no counted pixel (all ignore) is a warning. An empty pair set is an error of
the dataset itself (it names both folders).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from explora.core.errors import DataError
from explora.data.base import ExploraDataset
from explora.data.dense import IGNORE_INDEX
from explora.data.medical import medical_report
from explora.data.stats import BandMoments, spread_indices


@dataclass
class CheckReport:
    """What :func:`check_dataset` found in one split."""

    source: str
    split: str
    samples: int = 0
    checked: int = 0
    classes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # class name (or 'unlabeled') -> readable samples
    bands: dict[int, int] = field(default_factory=dict)  # band count -> samples
    dtypes: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # "HxW" -> samples
    unreadable: list[str] = field(default_factory=list)
    stats: dict[str, list[float]] = field(default_factory=dict)
    medical: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return (not self.unreadable and len(self.bands) <= 1 and len(self.dtypes) <= 1 and self.checked > 0
                and not self.warnings)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "clean": self.clean}


class _Probe(Dataset):
    """Loads samples without the skip policy and turns each into a small record (runs in workers)."""

    def __init__(self, dataset: ExploraDataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[str, Any]:
        index = self.indices[i]
        try:
            image, label = self.dataset.load(index)[:2]
            self.dataset._check_bands(image, self.dataset.describe(index))
        except DataError as e:
            return "error", str(e)
        if isinstance(label, torch.Tensor) and label.ndim > 0:  # a mask: the classes it holds
            present = sorted(set(label.unique().tolist()) - {IGNORE_INDEX})
            return "ok", (image, present or self.dataset.describe(index))
        return "ok", (image, int(label))


def _records(batch: list) -> list:
    return batch


def check_dataset(dataset: ExploraDataset, *, split: str = "", max_samples: int | None = None,
                  num_workers: int = 0, batch_size: int = 32) -> CheckReport:
    """Read up to ``max_samples`` samples (all by default) of ``dataset`` and report; never raises DataError."""
    report = CheckReport(source=dataset.source, split=split, samples=len(dataset), classes=list(dataset.classes))
    report.unreadable.extend(dataset.problems)
    counts: Counter[str] = Counter()
    bands: Counter[int] = Counter()
    dtypes: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    moments = BandMoments()
    indices = spread_indices(len(dataset), max_samples)
    loader = DataLoader(_Probe(dataset, indices), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_records)
    for batch in loader:
        for status, payload in batch:
            if status == "error":
                report.unreadable.append(payload)
                continue
            image, label = payload
            report.checked += 1
            if isinstance(label, str):  # a mask without a counted pixel
                report.warnings.append(f"{label}: mask has only ignored pixels ({IGNORE_INDEX})")
            for c in label if isinstance(label, list) else [] if isinstance(label, str) else [label]:
                counts[dataset.classes[c] if 0 <= c < len(dataset.classes) else "unlabeled"] += 1
            bands[int(image.shape[0])] += 1
            dtypes[str(image.dtype).replace("torch.", "")] += 1
            sizes[f"{image.shape[-2]}x{image.shape[-1]}"] += 1
            if len(bands) == 1:
                moments.update(image)
    report.counts, report.bands, report.dtypes, report.sizes = dict(counts), dict(bands), dict(dtypes), dict(sizes)
    report.stats = moments.result()
    report.medical, medical_warnings = medical_report(dataset, indices)
    report.warnings.extend(medical_warnings)
    return report


def format_report(report: CheckReport, max_listed: int = 50) -> str:
    """A human-readable summary of one split's report."""
    lines = [f"{report.source} [{report.split or '-'}]: {report.checked}/{report.samples} samples readable"]
    if report.classes:
        lines.append(f"  classes: {len(report.classes)}")
    for name, n in sorted(report.counts.items()):
        lines.append(f"    {name}: {n}")
    lines.append(f"  bands: {report.bands}  dtypes: {report.dtypes}")
    lines.append(f"  sizes: {dict(sorted(report.sizes.items(), key=lambda kv: -kv[1])[:10])}")
    if report.stats.get("mean"):
        fmt = ", ".join
        lines.append(f"  mean: [{fmt(f'{m:.4f}' for m in report.stats['mean'])}]")
        lines.append(f"  std:  [{fmt(f'{s:.4f}' for s in report.stats['std'])}]")
    if report.unreadable:
        lines.append(f"  unreadable ({len(report.unreadable)}):")
        lines += [f"    {msg}" for msg in report.unreadable[:max_listed]]
        if len(report.unreadable) > max_listed:
            lines.append(f"    ... and {len(report.unreadable) - max_listed} more")
    for key, value in report.medical.items():
        lines.append(f"  {key}: {value}")
    lines += [f"  warning: {w}" for w in report.warnings]
    if len(report.bands) > 1 or len(report.dtypes) > 1:
        lines.append("  inconsistent band counts or dtypes across samples")
    lines.append("  clean" if report.clean else "  NOT clean")
    return "\n".join(lines)


__all__ = ["CheckReport", "check_dataset", "format_report"]
