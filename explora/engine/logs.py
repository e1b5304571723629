"""Run logs a person reads: a CSV of every logged step, TensorBoard scalars, and a tqdm bar with ETA.

On resume the CSV is cut back to the resume step and TensorBoard purges later events, so the curves of a resumed
run are the curves of an uninterrupted one. :class:`StepLog` decides what the trainer logs each step: every
``log_every`` steps and at the last, the loss and terms, the schedules, the gradient norm and the throughput.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from explora.core import distributed as D

_log = logging.getLogger(__name__)


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


class SkippedSamples:
    """Unreadable samples the dataset replaced (``data.on_error=skip``), counted over the whole run.

    ``before``: the count saved in the checkpoint resumed from. :meth:`total` is None for a dataset that does not
    count them (only the readers with an ``on_error`` policy keep an int ``skipped``).
    """

    def __init__(self, dataset: Any, before: int = 0) -> None:
        self.dataset, self.before = dataset, before

    def total(self) -> int | None:
        count = getattr(self.dataset, "skipped", None)
        return self.before + count if isinstance(count, int) else None


class StepLog:
    """The trainer's per-step logging into a :class:`MetricLogger`: a row every ``log_every`` steps and at
    ``total_steps``, with images/s over the steps since the previous row (all processes), and a message whenever
    more samples were skipped since the last one."""

    def __init__(self, logger: MetricLogger, *, log_every: int, total_steps: int, world_size: int,
                 samples: SkippedSamples) -> None:
        self.logger, self.log_every, self.total_steps, self.world = logger, log_every, total_steps, world_size
        self.samples, self.reported_skips = samples, samples.before
        self.last_terms: dict[str, float] = {}
        self._t_last, self._images = time.perf_counter(), 0

    def step(self, step: int, loss: Any, terms: dict[str, Any], grad_norm: Any, lr: float, wd: float,
             images: int) -> None:
        """Record optimiser step ``step`` (0-based) of ``images`` images; advance the progress bar."""
        self._images += images
        done = step + 1
        if done % self.log_every == 0 or done == self.total_steps:
            elapsed = time.perf_counter() - self._t_last
            self.last_terms = {k: float(v) for k, v in terms.items()}
            n_skipped = self.samples.total()
            extra = {} if n_skipped is None else {"skipped_samples": n_skipped}
            if n_skipped is not None and n_skipped > self.reported_skips and D.is_main():
                _log.info("step %d: %d samples skipped so far (data.on_error=skip)", step, n_skipped)
                self.reported_skips = n_skipped
            self.logger.log(step, {
                "loss": float(loss), **self.last_terms, "lr": lr, "wd": wd, "grad_norm": float(grad_norm),
                "images_per_s": self._images * self.world / max(elapsed, 1e-9), **extra,
            })
            self._t_last, self._images = time.perf_counter(), 0
        self.logger.advance()

    def close(self) -> None:
        self.logger.close()
