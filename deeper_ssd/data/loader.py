"""Batches from an annotated LMDB, decoded and augmented in torch DataLoader worker processes.

Reading order is the fork's DataReader: records in key order, wrapping around at the end; with
``world_size`` consumers (one per GPU) record ``i`` goes to consumer ``i % world_size``. Batch
``b`` of consumer ``rank`` holds its items ``b*batch_size .. b*batch_size + batch_size - 1``.

Determinism: every item draws its augmentation from its own ``numpy`` Generator seeded with
``(seed, rank, item index)``, so the batches depend only on the seed and the batch index, not on
the number of workers or on timing. Workers prefetch ``prefetch`` batches each (Caffe prefetches
3 batches in one thread).

Worker count: :func:`default_workers` (the rule is in docs/decisions.md, "Data workers").

Timing: :class:`DataTiming` records how long the consumer waited for each batch (the data time
a trainer reports) and how long a worker spent producing it.
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from .annoset import AnnosetError, AnnotatedDB, parse_record
from .transforms import SSDTransformer, TransformError, sample_from_datum

__all__ = ["DataTiming", "AnnotatedBatches", "BatchLoader", "label_rows", "default_workers",
           "usable_cores"]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers(world_size: int = 1, cores: Optional[int] = None) -> int:
    """Data worker processes per data layer when none are asked for: the usable cores shared
    by the ``world_size`` training processes of this machine, at most 8 and at least 1."""
    cores = usable_cores() if cores is None else int(cores)
    return max(1, min(8, cores // max(1, int(world_size))))


def label_rows(per_item: Sequence) -> np.ndarray:
    """The SSD label blob rows ``[item, label, instance, xmin, ymin, xmax, ymax, difficult]``
    (float32, G x 8) for the Objects of each item; one row of -1 when the batch has none."""
    rows = [np.column_stack([np.full(len(o), item, np.float32), o.labels, o.instances, o.boxes,
                             o.difficult]).astype(np.float32)
            for item, o in enumerate(per_item) if len(o)]
    if not rows:
        return np.full((1, 8), -1, np.float32)
    return np.concatenate(rows)


class AnnotatedBatches(torch.utils.data.Dataset):
    """Map-style dataset: batch index -> ``(data N x C x H x W, label 1 x 1 x G x 8 or None,
    seconds the worker spent)``, all CPU float32.

    With ``uint8`` the data are the transformed pixels before ``(pixel - mean) * scale``
    (uint8, 4 times fewer bytes to move) whenever every image of the batch is 8-bit; the
    consumer applies :meth:`SSDTransformer.normalize_tensor` (equal float32 values).

    ``shape`` is the static (C, H, W) of one image (-1 = decided by the data); every image of a
    batch must match it and each other. ``anno_type_override`` mirrors
    ``annotated_data_param.anno_type`` (records without a type are then taken as BBOX).
    """

    def __init__(self, db_path: str, keys: Sequence[bytes], batch_size: int,
                 transformer: SSDTransformer, shape: Tuple[int, int, int], seed: int,
                 output_labels: bool = True, anno_type_override: bool = False,
                 rank: int = 0, world_size: int = 1, where: str = "AnnotatedData",
                 uint8: bool = False):
        self.db_path = db_path
        self.uint8 = bool(uint8) and transformer.uint8_capable
        self.keys = list(keys)
        self.batch_size = batch_size
        self.transformer = transformer
        self.shape = tuple(shape)
        self.seed = int(seed)
        self.output_labels = output_labels
        self.anno_type_override = anno_type_override
        self.rank, self.world_size = rank, world_size
        self.where = where
        self._db: Optional[AnnotatedDB] = None
        self._pid = -1

    def __getstate__(self):
        """Workers start from a fresh process (forkserver), so the database handle stays here."""
        state = dict(self.__dict__)
        state["_db"], state["_pid"] = None, -1
        return state

    def release(self) -> None:
        """Close this process's handle on the database (reopened on the next read)."""
        if self._db is not None and self._pid == os.getpid():
            self._db.close()
        self._db, self._pid = None, -1

    def _database(self) -> AnnotatedDB:
        if self._pid != os.getpid():       # an LMDB environment must not cross a fork
            self._db = AnnotatedDB(self.db_path, f"{self.where}: LMDB")
            self._pid = os.getpid()
        return self._db

    def item(self, index: int):
        """(C x H x W float32 image, or uint8 pixels in :attr:`uint8` mode, Objects, key) of
        item ``index`` of this consumer."""
        db = self._database()
        key = self.keys[(index * self.world_size + self.rank) % len(self.keys)]
        name = key.decode(errors="replace")
        anno_datum = parse_record(db.get(key), f"{self.db_path}: record {name!r}")
        sample = sample_from_datum(anno_datum, name)
        if self.output_labels and not (sample.has_type or self.anno_type_override):
            raise TransformError(f"record {name}: no annotation type (a classification record); "
                                 "the AnnotatedData layer here reads BBOX records")
        rng = np.random.default_rng([self.seed, self.rank, index])
        image, objects = self.transformer.process(sample, rng, uint8=self.uint8)
        return image, objects, name

    def __getitem__(self, batch: int):
        try:
            return self._batch(batch)
        except (AnnosetError, TransformError) as err:   # re-raised cleanly by BatchLoader.next
            return _Failure(str(err))

    def _batch(self, batch: int):
        start = time.perf_counter()
        images, objects = [], []
        for i in range(self.batch_size):
            image, objs, name = self.item(batch * self.batch_size + i)
            expected = images[0].shape if images else self.shape
            if any(e >= 0 and e != s for e, s in zip(expected, image.shape)) or len(image.shape) != 3:
                raise TransformError(
                    f"{self.where}: record {name} transforms to {'x'.join(map(str, image.shape))}, "
                    f"the batch needs {'x'.join('?' if e < 0 else str(e) for e in expected)} (CxHxW); "
                    "use resize_param or crop_size to give every image one size, force_color or "
                    "force_gray to fix the channels")
            images.append(image)
            objects.append(objs)
        if any(i.dtype == np.uint8 for i in images) and not all(i.dtype == np.uint8 for i in images):
            images = [self.transformer.normalize(i) if i.dtype == np.uint8 else i for i in images]
        data = torch.from_numpy(np.stack(images))
        label = torch.from_numpy(label_rows(objects)).view(1, 1, -1, 8) if self.output_labels else None
        return data, label, time.perf_counter() - start


@dataclass
class _Failure:
    """A worker's bad-input error, carried back as a value so its message stays one line."""
    message: str


def _as_is(batch):
    return batch


class _BatchIndices(torch.utils.data.Sampler):
    """0-based batch indices from ``start`` on, forever."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _init_worker(_worker_id: int) -> None:
    cv2.setNumThreads(1)            # one worker process = one core's worth of decoding


def _worker_context():
    """Workers start from the forkserver (a clean process with no thread pools of its own): a
    plain fork of a trainer whose torch/OpenCV threads hold locks can deadlock in the child."""
    import multiprocessing
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


@dataclass
class DataTiming:
    """Per-batch timing: ``last_wait_s`` the consumer waited for the latest batch,
    ``last_work_s`` the worker needed to build it; totals since the last :meth:`reset`."""
    last_wait_s: float = 0.0
    last_work_s: float = 0.0
    total_wait_s: float = 0.0
    total_work_s: float = 0.0
    batches: int = 0
    hooks: List[Callable[["DataTiming"], None]] = field(default_factory=list, repr=False)

    def record(self, wait_s: float, work_s: float) -> None:
        self.last_wait_s, self.last_work_s = wait_s, work_s
        self.total_wait_s += wait_s
        self.total_work_s += work_s
        self.batches += 1
        for hook in self.hooks:
            hook(self)


class BatchLoader:
    """Iterates an :class:`AnnotatedBatches` from batch ``start`` with ``num_workers`` worker
    processes (0 = in this process) each prefetching ``prefetch`` batches.

    A worker process that dies (killed, out of memory) is replaced: the workers restart at the
    next batch to return, which they rebuild identically (every batch depends only on the seed
    and its index), and ``warn`` gets one line. After :data:`RESTARTS` deaths in a row without
    a batch delivered, :meth:`next` raises TransformError instead."""

    #: consecutive worker deaths (no batch delivered in between) tolerated
    RESTARTS = 3

    def __init__(self, dataset: AnnotatedBatches, start: int = 0, num_workers: int = 1,
                 prefetch: int = 3, pin_memory: bool = False, timing: Optional[DataTiming] = None,
                 warn: Optional[Callable[[str], None]] = None):
        self.dataset = dataset
        self.timing = timing if timing is not None else DataTiming()
        self.warn = warn or _warn
        self._kwargs = dict(batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                            collate_fn=_as_is)
        if num_workers > 0:
            self._kwargs.update(prefetch_factor=prefetch, worker_init_fn=_init_worker,
                                multiprocessing_context=_worker_context())
        self._iter = None
        self.next_batch = start
        self.restarts = 0

    def _start(self) -> None:
        """Workers (if any) reading from :attr:`next_batch` on. Their deaths are found when a
        batch is awaited (torch's SIGCHLD check, which raises wherever the trainer happens to
        be, is switched off for them)."""
        loader = torch.utils.data.DataLoader(self.dataset, sampler=_BatchIndices(self.next_batch),
                                             **self._kwargs)
        self._iter = iter(loader)
        if getattr(self._iter, "_worker_pids_set", False):
            from torch.utils.data._utils import signal_handling
            signal_handling._remove_worker_pids(id(self._iter))
            self._iter._worker_pids_set = False

    def _worker_died(self, err: BaseException) -> bool:
        if "exited unexpectedly" in str(err) or "killed by signal" in str(err):
            return True
        workers = getattr(self._iter, "_workers", None) or []
        if isinstance(err, (ConnectionError, EOFError)) and workers:
            # a batch handed over by a worker that died mid-way: its exit may not be known yet
            # (the forkserver reports it), so wait a moment for it
            import multiprocessing.connection
            multiprocessing.connection.wait([w.sentinel for w in workers], timeout=5.0)
        return any(not w.is_alive() for w in workers)

    def _fetch(self):
        failures = 0
        while True:
            if self._iter is None:
                self._start()
            try:
                return next(self._iter)
            except (RuntimeError, ConnectionError, EOFError) as err:
                if not self._worker_died(err):
                    raise
                detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                self._shutdown()
                failures += 1
                self.restarts += 1
                if failures > self.RESTARTS:
                    raise TransformError(f"{self.dataset.where}: the data worker processes died {failures} "
                                         f"times in a row at batch {self.next_batch} ({detail}); "
                                         "out of memory?") from None
                self.warn(f"{self.dataset.where}: a data worker process died ({detail}); workers "
                          f"restarted at batch {self.next_batch}")

    def next(self):
        """The next batch ``(data, label)``; the wait is recorded in :attr:`timing`. A record
        that cannot be read or transformed raises TransformError naming it."""
        start = time.perf_counter()
        batch = self._fetch()
        if isinstance(batch, _Failure):
            raise TransformError(batch.message)
        data, label, work_s = batch
        self.timing.record(time.perf_counter() - start, work_s)
        self.next_batch += 1
        return data, label

    def _shutdown(self) -> None:
        iterator, self._iter = self._iter, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def close(self) -> None:
        """Stop the workers (the loader cannot be used afterwards)."""
        self._shutdown()
        self.dataset.release()
