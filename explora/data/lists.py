"""Datasets defined by a list of image files: CSV tables (upstream linprobe layout and plain ``path,label``).

The upstream CSV layout (ExPLoRA ``linprobe/util/datasets.py`` ``CustomDatasetFromImages``, itself following
SatMAE's fMoW-RGB loader): a header row, column 0 the label, column 1 the image path. Where the header names the
columns (``category``/``label`` and ``image_path``/``path``) those names win, so SatMAE metadata CSVs with more
columns load too. Labels may be class indices or class names. Relative paths resolve against the CSV's folder
(or ``root=``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch

from explora.core.errors import DataError
from explora.data.base import ExploraDataset, located
from explora.data.io import DEFAULT_INT_SCALE, image_shape, read_image

LABEL_COLUMNS = ("category", "label", "class", "target")
PATH_COLUMNS = ("image_path", "path", "file", "filename", "image")


def read_csv(path: Path) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """Rows of a CSV as ``(row number (1-based, header = 1), cells)``; the header is detected by column names."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(i + 1, [c.strip() for c in r]) for i, r in enumerate(csv.reader(f)) if any(c.strip() for c in r)]
    except FileNotFoundError as e:
        raise DataError(f"{path}: CSV file not found") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: unreadable CSV ({e})") from e
    if not rows:
        raise DataError(f"{path}: CSV is empty; expected rows of image path and label")
    first = [c.lower() for c in rows[0][1]]
    if any(c in LABEL_COLUMNS + PATH_COLUMNS for c in first):
        return first, rows[1:]
    return None, rows


def column(header: list[str] | None, names: Sequence[str], default: int) -> int:
    if header is not None:
        for n in names:
            if n in header:
                return header.index(n)
    return default


def parse_label(cell: str, classes: Sequence[str], where: str) -> int:
    """A label cell is a class index or a class name; anything outside the class list is a DataError."""
    if cell.lstrip("-").isdigit():
        label = int(cell)
        if not 0 <= label < len(classes):
            raise DataError(f"{where}: label {label} outside the class list; expected 0..{len(classes) - 1}")
        return label
    try:
        return list(classes).index(cell)
    except ValueError:
        raise DataError(f"{where}: label {cell!r} is not one of the {len(classes)} classes") from None


def _raise(message: str) -> None:
    raise DataError(message)


class ImageListDataset(ExploraDataset):
    """Samples given as ``(path, label, description)`` triples; decoding through :func:`read_image`."""

    def __init__(
        self,
        items: Sequence[tuple[Path, int, str]],
        classes: Sequence[str],
        *,
        source: str,
        in_chans: int | None = None,
        image_size: int | None = None,
        on_error: str = "raise",
        int_scale: float = DEFAULT_INT_SCALE,
    ) -> None:
        super().__init__(image_size=image_size, on_error=on_error)
        self.items = list(items)
        self.classes = list(classes)
        self.source = source
        self.int_scale = int_scale
        self._require_nonempty("image files")
        self.in_chans = in_chans if in_chans is not None else self._probe_bands()

    def _probe_bands(self) -> int:
        """Band count from the first readable file's header (later files must match it)."""
        for path, _, where in self.items:
            try:
                return image_shape(path)[0]
            except DataError as e:
                if self.on_error == "raise":
                    raise DataError(f"{where}: {e}") from e
        raise DataError(f"{self.source}: none of the {len(self.items)} files could be read")

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, index: int) -> str:
        return self.items[index][2]

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        path, label, where = self.items[index]
        try:
            image = read_image(path, self.int_scale, min_side=self.image_size)  # resized to image_size next
        except DataError as e:
            raise located(where, path, e) from e
        return image, label


def csv_items(
    csv_path: Path,
    classes: Sequence[str] | None,
    *,
    root: Path | None = None,
    upstream: bool = True,
    on_problem=None,
) -> tuple[list[tuple[Path, int, str]], list[str]]:
    """Parse a CSV into ``(path, label, 'file.csv row N (image)')`` items and the class list.

    ``upstream=True``: label in column 0, path in column 1 (ExPLoRA/SatMAE); else ``path,label`` (column 0 path).
    With ``classes=None`` the class list is inferred: sorted names, or ``'0'..'max'`` for integer labels.
    """
    header, rows = read_csv(csv_path)
    lab_col = column(header, LABEL_COLUMNS, 0 if upstream else 1)
    path_col = column(header, PATH_COLUMNS, 1 if upstream else 0)
    base = root if root is not None else csv_path.parent
    report = on_problem or _raise
    if classes is None:
        cells = [r[lab_col] for _, r in rows if len(r) > max(lab_col, path_col)]
        if cells and all(c.lstrip("-").isdigit() for c in cells):
            classes = [str(i) for i in range(max(int(c) for c in cells) + 1)]
        else:
            classes = sorted(set(cells))
    items: list[tuple[Path, int, str]] = []
    for row_no, cells in rows:
        where = f"{csv_path} row {row_no}"
        if len(cells) <= max(lab_col, path_col) or not cells[path_col]:
            report(f"{where}: malformed row {cells!r}; expected an image path in column {path_col} "
                   f"and a label in column {lab_col}")
            continue
        try:
            label = parse_label(cells[lab_col], classes, where)
        except DataError as e:
            report(str(e))
            continue
        path = Path(cells[path_col])
        path = path if path.is_absolute() else base / path
        items.append((path, label, f"{where} ({path})"))
    return items, list(classes)


class CsvDataset(ImageListDataset):
    """``csv:/file.csv`` — rows of ``path,label`` (header optional; labels as indices or names).

    Also the base of the upstream-layout fMoW-RGB / RESISC-45 CSV loaders (``upstream=True``).
    """

    def __init__(
        self,
        csv_path: str | Path,
        *,
        classes: Sequence[str] | None = None,
        root: str | Path | None = None,
        upstream: bool = False,
        image_size: int | None = None,
        on_error: str = "raise",
        in_chans: int | None = None,
    ) -> None:
        ExploraDataset.__init__(self, image_size=image_size, on_error=on_error)
        csv_path = Path(csv_path)
        items, cls = csv_items(csv_path, classes, root=Path(root) if root else None, upstream=upstream,
                               on_problem=self._index_problem)
        problems, skips = self.problems, self._skips
        super().__init__(items, cls, source=str(csv_path), in_chans=in_chans, image_size=image_size,
                         on_error=on_error)
        self.problems, self._skips = problems, skips  # keep what indexing found
