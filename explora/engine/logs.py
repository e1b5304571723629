"""Run logs a person reads: a CSV of every logged step, TensorBoard scalars, and a tqdm bar with ETA.

On resume the CSV is cut back to the resume step and TensorBoard purges later events, so the curves of a resumed
run are the curves of an uninterrupted one.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from tqdm.auto import tqdm


class MetricLogger:
    def __init__(
        self, out_dir: str | Path, start_step: int, total_steps: int, enabled: bool = True, tensorboard: bool = True
    ) -> None:
        self.enabled = enabled
        self.csv_path = Path(out_dir) / "metrics.csv"
        self.rows: list[dict[str, float]] = []
        self._writer = None
        self._bar = None
        if not enabled:
            return
        if start_step > 0 and self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                self.rows = [
                    {k: float(v) for k, v in row.items() if v not in ("", None)}
                    for row in csv.DictReader(f)
                    if float(row["step"]) < start_step
                ]
        else:
            self.csv_path.unlink(missing_ok=True)
        self._rewrite_csv()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(
                    str(Path(out_dir) / "tb"), purge_step=start_step if start_step > 0 else None
                )
            except Exception:  # noqa: BLE001 - TensorBoard is a convenience; CSV is the record
                self._writer = None
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, smoothing=0.1)

    def _columns(self) -> list[str]:
        cols: list[str] = ["step"]
        for row in self.rows:
            cols.extend(k for k in row if k not in cols)
        return cols

    def _rewrite_csv(self) -> None:
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._columns())
            w.writeheader()
            w.writerows(self.rows)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": float(step), **{k: float(v) for k, v in values.items()}}
        new_cols = [k for k in row if k not in self._columns()]
        self.rows.append(row)
        if new_cols or not self.csv_path.is_file():
            self._rewrite_csv()
        else:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._columns()).writerow(row)
        if self._writer is not None:
            for k, v in values.items():
                if math.isfinite(float(v)):
                    self._writer.add_scalar(k, float(v), step)
        if self._bar is not None and "loss" in values:
            self._bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        if self._bar is not None:
            self._bar.close()
