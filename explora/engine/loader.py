"""A data order that is a pure function of (seed, step, micro-batch, rank), so resuming needs no loader state.

Optimiser step ``s`` takes slice ``s % steps_per_epoch`` (one effective batch) of a permutation drawn from
``(seed, epoch)``; that slice is split into ``accum_steps`` micro-batches, each split across ranks. Each
micro-batch also carries a seed derived from ``(seed, s, micro, rank)``; the collate function turns it into a
``torch.Generator`` for the objective's augmentation and masking, inside the worker. A run resumed at step ``s``
therefore loads and augments exactly what the uninterrupted run would have, whatever the number of workers; and
the samples of a step are the same whether its effective batch is split over processes, micro-batches or neither.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from explora.core.errors import DataError, ExploraError


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across Python runs unlike ``hash``."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x ^= (v + 0x9E3779B97F4A7C15 + ((x << 6) & 0xFFFFFFFFFFFFFFFF) + (x >> 2)) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


def batch_seed(seed: int, step: int, rank: int, micro: int = 0) -> int:
    """The augmentation seed of micro-batch ``micro`` of optimiser step ``step`` on ``rank``.

    Micro-batch 0 keeps the seed of a step without accumulation, so ``accum_steps: 1`` runs draw what they always
    drew.
    """
    return _mix(seed, step, rank, 1) if micro == 0 else _mix(seed, step, rank, 1, micro)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for steps ``start_step .. total_steps-1`` and each of their ``accum_steps`` micro-batches, this
    rank's micro-batch as ``[(index, batch_seed), ...]``; ``start_micro`` skips the first micro-batches of
    ``start_step`` (a loader rebuilt in the middle of a step)."""

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        total_steps: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        shuffle: bool = True,
        accum_steps: int = 1,
        start_micro: int = 0,
    ) -> None:
        effective = batch_size * world_size * accum_steps
        if dataset_len < effective:
            raise DataError(
                f"the dataset has {dataset_len} samples but one step needs {effective} "
                f"(batch_size {batch_size} x {world_size} processes x {accum_steps} accumulation steps); lower "
                "train.batch_size / train.accum_steps or add data."
            )
        self.n, self.bs, self.total, self.seed = dataset_len, batch_size, total_steps, seed
        self.rank, self.world, self.start, self.shuffle = rank, world_size, start_step, shuffle
        self.accum, self.start_micro = accum_steps, start_micro
        self.steps_per_epoch = dataset_len // effective

    def _perm(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, perm = -1, None
        for step in range(self.start, self.total):
            e, b = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            for micro in range(self.start_micro if step == self.start else 0, self.accum):
                lo = ((b * self.accum + micro) * self.world + self.rank) * self.bs
                seed = batch_seed(self.seed, step, self.rank, micro)
                yield [(int(i), seed) for i in perm[lo : lo + self.bs]]

    def __len__(self) -> int:
        return max(0, (self.total - self.start) * self.accum - self.start_micro)


class _Indexed(Dataset):
    """Passes the batch seed through the worker next to each sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, int]:
        index, seed = item
        return self.dataset[index], seed


def _extras(sample: tuple) -> dict[str, Any]:
    """A sample's third element: a dict of named tensors, or a bare tensor of frame timestamps (fMoW-temporal)."""
    extra = sample[2]
    return extra if isinstance(extra, dict) else {"timestamps": extra}


class SeededCollate:
    """Stack samples, then run the objective's batch transform with the batch's own generator."""

    def __init__(self, transform: Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]) -> None:
        self.transform = transform

    def __call__(self, items: list[tuple[Any, int]]) -> dict[str, torch.Tensor]:
        seed = items[0][1]
        samples = [s for s, _ in items]
        images, labels = zip(*[(s[0], s[1]) if isinstance(s, (tuple, list)) else (s, -1) for s in samples])
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) != 1:
            raise DataError(
                f"samples in one batch have different shapes {sorted(shapes)}; set data.image_size so every image "
                "is resized to one size before batching."
            )
        batch_images = torch.stack([torch.as_tensor(im) for im in images])
        # Optional third element of a sample: a dict of per-sample tensors (e.g. timestamps of temporal frames),
        # stacked and handed to the transform by name.
        extras = [_extras(s) for s in samples if isinstance(s, (tuple, list)) and len(s) > 2]
        stacked = {}
        if extras and len(extras) == len(samples):
            stacked = {k: torch.stack([torch.as_tensor(e[k]) for e in extras]) for k in extras[0]}
        # Dense samples (image, mask (H, W)): the masks go through the transform with the images (paired
        # augmentation) as ``masks``.
        dense = isinstance(labels[0], torch.Tensor) and labels[0].ndim > 0
        if dense:
            stacked["masks"] = torch.stack([torch.as_tensor(m) for m in labels])
        g = torch.Generator().manual_seed(seed)
        batch = self.transform(batch_images, g, **stacked)
        for k, v in stacked.items():
            batch.setdefault(k, v)
        if not dense:
            batch.setdefault("labels", torch.as_tensor([int(x) for x in labels], dtype=torch.long))
        return batch


def make_loader(
    dataset: Dataset,
    transform: Callable,
    *,
    batch_size: int,
    total_steps: int,
    seed: int,
    start_step: int,
    rank: int,
    world_size: int,
    num_workers: int,
    pin_memory: bool,
    accum_steps: int = 1,
    start_micro: int = 0,
) -> tuple[DataLoader, StepBatchSampler]:
    """A loader of this rank's micro-batches from (``start_step``, ``start_micro``) to the end of the run."""
    sampler = StepBatchSampler(
        len(dataset),
        batch_size,
        total_steps,
        seed=seed,
        rank=rank,  # type: ignore[arg-type]
        world_size=world_size,
        start_step=start_step,
        accum_steps=accum_steps,
        start_micro=start_micro,
    )
    loader = DataLoader(
        _Indexed(dataset),
        batch_sampler=sampler,
        collate_fn=SeededCollate(transform),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
        # Its own generator: creating the iterator must not draw from the global RNG that dropout/drop-path use,
        # or a resumed run would diverge from the uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def is_worker_crash(err: BaseException, with_workers: bool = True) -> bool:
    """True when a data-loader worker process died: the RuntimeError torch raises (exit code != 0, signal), or,
    when the worker dies while the main process receives a batch's shared memory from it, the ConnectionError of
    that hand-over. An error the dataset raised in a worker (re-raised with its "Original Traceback") is not one."""
    msg = str(err)
    if isinstance(err, ConnectionError):
        return with_workers and "Original Traceback" not in msg
    return isinstance(err, RuntimeError) and "DataLoader worker" in msg and (
        "exited unexpectedly" in msg or "killed by signal" in msg
    )


def unwrap_worker_error(err: ExploraError) -> ExploraError:
    """An ExploraError re-raised by torch from a worker carries the worker's whole traceback in its message;
    keep only the original message, so the CLI prints one readable paragraph."""
    msg = str(err)
    if "Original Traceback" not in msg:
        return err
    tail = msg.rsplit(f"{type(err).__module__}.{type(err).__qualname__}: ", 1)[-1].strip()
    return type(err)(tail)


class _DeferredWorkerErrors:
    """Record worker crashes reported by torch's SIGCHLD handler instead of raising them mid-step.

    torch installs a SIGCHLD handler that raises the crash RuntimeError wherever the main thread happens to be —
    usually inside the forward/backward/optimizer step, which would leave the step half done. Wrapping it turns the
    crash into a flag that :func:`resilient_batches` raises at the next batch fetch, between steps. POSIX main
    thread only; elsewhere torch's polling (every 5 s) still detects the dead worker at the next fetch.
    """

    def __init__(self) -> None:
        self.pending: BaseException | None = None
        self._inner: Callable | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        try:
            if self._inner is not None:
                self._inner(signum, frame)
        except RuntimeError as e:
            if self.pending is None:
                self.pending = e

    def install(self) -> None:
        """Call after creating a loader iterator (torch installs its handler on the first one)."""
        if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGCHLD)
        if current == self._handler or not callable(current):
            return
        self._inner = current
        signal.signal(signal.SIGCHLD, self._handler)

    def close(self) -> None:
        if self._inner is None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGCHLD) == self._handler:
            signal.signal(signal.SIGCHLD, self._inner)
        self._inner = None


def resilient_batches(
    build: Callable[[int, int], Iterable[Any]],
    start_step: int,
    total_steps: int,
    *,
    max_restarts: int,
    on_restart: Callable[[int, int, BaseException], None] | None = None,
    accum_steps: int = 1,
) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(step, micro, batch)`` for steps ``start_step .. total_steps-1`` and micro-batches
    ``0 .. accum_steps-1`` of each, rebuilding the loader when a worker dies.

    ``build(step, micro)`` returns a loader whose first batch is micro-batch ``micro`` of ``step``. Because the
    data order and augmentation are functions of (seed, step, micro-batch), a loader rebuilt at the current
    position yields exactly the batches the dead one would have: a run with a crashed worker ends with the same
    weights as an uninterrupted one. After ``max_restarts`` crashes the run stops with a DataError (the last
    checkpoint is intact; ``--resume`` continues).
    """
    position, end, restarts = start_step * accum_steps, total_steps * accum_steps, 0
    guard = _DeferredWorkerErrors()
    try:
        while position < end:
            it = iter(build(*divmod(position, accum_steps)))
            guard.install()
            try:
                while position < end:
                    if guard.pending is not None:
                        raise guard.pending
                    try:
                        batch = next(it)
                    except StopIteration:
                        return
                    yield (*divmod(position, accum_steps), batch)
                    position += 1
            except (RuntimeError, ConnectionError) as e:
                if not is_worker_crash(e, with_workers=getattr(it, "_num_workers", 0) > 0):
                    raise
                restarts += 1
                step = position // accum_steps
                if restarts > max_restarts:
                    raise DataError(
                        f"a data-loader worker died {restarts} times (last at step {step}: {e}); giving up after "
                        f"train.max_loader_restarts={max_restarts}. The last checkpoint is intact: look for the cause "
                        "with train.num_workers=0 (errors then show in full), then --resume."
                    ) from None
                if on_restart is not None:
                    on_restart(step, restarts, e)
            except ExploraError as e:
                raise unwrap_worker_error(e) from None
            finally:
                shutdown = getattr(it, "_shutdown_workers", None)
                if callable(shutdown):
                    shutdown()
                guard.pending = None  # a late report of this loader's dead worker: already handled (or raised)
    finally:
        guard.close()
