"""Run logs a person reads: a CSV of every logged step, TensorBoard scalars, and a tqdm bar with ETA; optionally
Weights & Biases (the official ExPLoRA scripts' tracker) and MLflow (``train.loggers``).

The CSV is always written and is the source every report and model card reads; the trackers get the same rows.
On resume the CSV is cut back to the resume step and TensorBoard purges later events, so the curves of a resumed
run are the curves of an uninterrupted one; W&B and MLflow continue the same run (its id is kept in the run
directory) from the resume step. :class:`StepLog` decides what the trainer logs each step: every
``log_every`` steps and at the last, the loss and terms, the schedules, the gradient norm and the throughput.
"""

from __future__ import annotations

import csv
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from explora.core import distributed as D
from explora.core.errors import ConfigError

_log = logging.getLogger(__name__)

LOGGERS = ("tensorboard", "wandb", "mlflow", "csv")  # train.loggers; csv is always written
TRACKER_EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # logger -> pip extra that installs it


def _import_tracker(name: str) -> Any:
    """The tracker's module; ConfigError naming the extra to install when it is missing."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(f"train.loggers: {name} is not installed; pip install 'explora[{TRACKER_EXTRAS[name]}]' "
                          f"or remove {name} from train.loggers") from err


def _run_id(out_dir: Path, name: str, make: Any) -> str:
    """The tracker run id kept in ``<out_dir>/<name>_run_id`` (so a resumed run continues it), created once."""
    path = out_dir / f"{name}_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = str(make())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


class WandbTracker:
    """Weights & Biases: one run per run directory (id in ``wandb_run_id``), files under ``<out_dir>/wandb``.
    ``WANDB_MODE=offline`` (or ``disabled``) is wandb's own switch; ``WANDB_PROJECT`` names the project
    (default ``explora``)."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        import os

        wandb = _import_tracker("wandb")
        run_id = _run_id(out_dir, "wandb", lambda: secrets.token_hex(4))  # wandb ids: short, alphanumeric
        (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "explora"), name=out_dir.name, id=run_id,
                              dir=str(out_dir), config=config, resume="allow")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    """MLflow: the tracking server of ``MLFLOW_TRACKING_URI``, else a local SQLite store ``<out_dir>/mlflow.db``
    (MLflow 3 refuses its old ``./mlruns`` file store by default);
    one run per run directory (id in ``mlflow_run_id``); ``MLFLOW_EXPERIMENT_NAME`` names the experiment
    (default ``explora``)."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        import os

        mlflow = _import_tracker("mlflow")
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{(out_dir / 'mlflow.db').resolve()}")
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "explora"))
        known = out_dir / "mlflow_run_id"
        if known.is_file():
            self.run = mlflow.start_run(run_id=known.read_text().strip())
        else:
            self.run = mlflow.start_run(run_name=out_dir.name)
            known.parent.mkdir(parents=True, exist_ok=True)
            known.write_text(self.run.info.run_id + "\n")
            flat = {k: str(v)[:500] for k, v in config.items()}  # MLflow params are short strings
            if flat:
                mlflow.log_params(flat)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({k: v for k, v in values.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS = {"wandb": WandbTracker, "mlflow": MLflowTracker}


class MetricLogger:
    """Every logged row to ``metrics.csv``, TensorBoard (``tensorboard``) and the ``trackers`` (``wandb``,
    ``mlflow``; ``config`` is the run settings they record); on the main process only (``enabled``)."""

    def __init__(
        self, out_dir: str | Path, start_step: int, total_steps: int, enabled: bool = True, tensorboard: bool = True,
        trackers: tuple[str, ...] | list[str] = (), config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.csv_path = Path(out_dir) / "metrics.csv"
        self.rows: list[dict[str, float]] = []
        self._writer = None
        self._bar = None
        self._trackers: list[Any] = []
        unknown = sorted(set(trackers) - set(TRACKERS))
        if unknown:
            raise ConfigError(f"train.loggers: unknown tracker(s) {unknown}; expected some of {list(LOGGERS)}")
        if not enabled:
            return
        self._trackers = [TRACKERS[name](Path(out_dir), dict(config or {})) for name in trackers]
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
        for tracker in self._trackers:
            tracker.log(step, {k: float(v) for k, v in values.items()})
        if self._bar is not None and "loss" in values:
            self._bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        for tracker in self._trackers:
            tracker.close()
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
