"""Data parallelism with Caffe's multi-GPU semantics over ``torch.distributed`` (docs/semantics.md,
"Multi-GPU").

``caffe train --gpu 0,1,…`` runs one solver per GPU, each with the prototxt's full
``batch_size`` and its own loss normalisation (MultiBoxLoss divides by *its* match count); the
gradients are summed and scaled by ``1/world_size`` (averaged), one update is applied and the
root's weights are what every GPU starts the next iteration with — including BatchNorm's
statistics (Caffe broadcasts every learnable blob, and those are learnable blobs with lr_mult 0).
Training records are dealt round-robin (record ``i`` to rank ``i % world_size``).

Here every rank applies the same update to the same averaged gradients, so the trained blobs
stay identical without a broadcast; only the blobs a forward pass changes (BatchNorm
statistics) are broadcast from rank 0 before each iteration, frozen weights once at the start.
Gradients are all-reduced in buckets while backward runs (:class:`GradientAverager`). Rank 0
tests, logs and snapshots.

Launch: ``deeper-ssd train --gpus 0,1`` spawns one process per GPU (:func:`spawn`, NCCL), or
``torchrun --nproc_per_node N -m deeper_ssd.cli train …`` (:func:`from_environment`; rank r on
``cuda:LOCAL_RANK``). On CPU the same code runs with the gloo backend (the tests use two processes).

Stopping together: the decisions that end or pause a run (a signal, a non-finite loss, an
exception on one rank, rank 0's test or snapshot) travel over a second, gloo group on the host
(:attr:`Communicator.control`) whose timeout is long (:data:`CONTROL_TIMEOUT_S`): ranks waiting
for rank 0's test phase wait there, not in a GPU collective whose watchdog
(``collective_timeout``) would fire. A rank that fails reports its message through that group;
rank 0 snapshots while the others wait in a barrier, then every rank leaves together
(docs/decisions.md, "Multi-process stops").
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Communicator", "GradientAverager", "spawn", "from_environment", "backend_for", "launched_by_torchrun",
           "DEFAULT_COLLECTIVE_TIMEOUT_S", "CONTROL_TIMEOUT_S"]

#: timeout of the gradient/broadcast collectives (``--collective-timeout``), torch's gloo default
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0
#: timeout of the host-side control group: ranks wait there for rank 0's test phase and snapshots
CONTROL_TIMEOUT_S = 24 * 3600.0


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


class Communicator:
    """The collectives a :class:`deeper_ssd.solver.trainer.Solver` needs, for one rank of an
    initialised default process group. Tensors are moved to ``device`` for the collectives;
    the control messages (:meth:`any`, :meth:`agree`, :meth:`failures`, :meth:`barrier`,
    :meth:`gather_text`) go over :attr:`control`, a gloo group on the host with
    ``control_timeout`` seconds (None: the default group, in tests that build no group)."""

    def __init__(self, rank: int, world_size: int, device, control_timeout: Optional[float] = CONTROL_TIMEOUT_S):
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device)
        self.backend = dist.get_backend() if dist.is_initialized() else None
        self.control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=control_timeout)) \
            if control_timeout is not None and dist.is_initialized() else None

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (the training seed)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, 0)
        return int(t.item())

    @torch.no_grad()
    def broadcast_parameters(self, params: Sequence) -> None:
        """Every learnable blob from rank 0 (after construction, restore or loading weights)."""
        self._broadcast([p.blob for p in params])

    @torch.no_grad()
    def broadcast_statistics(self, params: Sequence) -> None:
        """The blobs a forward pass changes without a gradient (BatchNorm statistics:
        ``LearnableParam.statistics``) from rank 0. Frozen weights (lr_mult 0, e.g. a
        distillation teacher) are not among them: no rank changes them, so the broadcast of
        every blob at the start (:meth:`broadcast_parameters`) is enough."""
        self._broadcast([p.blob for p in params if p.statistics])

    def _broadcast(self, blobs: List[torch.Tensor]) -> None:
        if not blobs:
            return
        flat = torch.cat([b.detach().reshape(-1) for b in blobs])
        dist.broadcast(flat, 0)
        for blob, chunk in zip(blobs, flat.split([b.numel() for b in blobs])):
            blob.copy_(chunk.view_as(blob))

    def gradient_averager(self, params: Sequence, bucket_bytes: int = 25 << 20) -> "GradientAverager":
        """A :class:`GradientAverager` of the trained blobs of ``params`` over this group."""
        return GradientAverager([p.blob for p in params if p.blob.requires_grad], self.world_size,
                                bucket_bytes)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (a non-finite loss or gradient)."""
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def agree(self, request: Optional[str]) -> Optional[str]:
        """The strongest signal request of any rank ("stop" over "snapshot"), so that all
        ranks stop or snapshot together."""
        flags = torch.tensor([float(request == "stop"), float(request == "snapshot")])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control)
        stop, snap = (bool(v) for v in flags.tolist())
        return "stop" if stop else ("snapshot" if snap else None)

    def failures(self, failure: Any = None) -> Optional[List[Any]]:
        """Every rank's ``failure`` (None where a rank has none; any picklable value) when at
        least one rank has one, else None. One small host collective when no rank failed."""
        if not self.any(failure is not None):
            return None
        return self.gather(failure)

    def gather(self, value: Any) -> List[Any]:
        """Every rank's picklable ``value``, in rank order."""
        values: List[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.control)
        return values

    def gather_text(self, text: str) -> List[str]:
        """Every rank's ``text`` (its device, for the log), in rank order."""
        return [str(t) for t in self.gather(text)]

    def barrier(self) -> None:
        """Wait until every rank is here (over the control group: rank 0's snapshot or test
        may take long)."""
        dist.barrier(group=self.control)


class GradientAverager:
    """Gradients summed over the ranks and scaled by ``1/world_size`` while backward still runs.

    The blobs are cut into buckets of about ``bucket_bytes`` in reverse order (the order
    backward finishes them); a hook after each blob's gradient accumulation launches a bucket's
    asynchronous all-reduce as soon as all its gradients are final, buckets strictly in order
    (every rank issues the same collectives in the same order). :meth:`arm` before the last
    backward of an iteration (earlier ones of ``iter_size`` only accumulate); :meth:`finish`
    launches what is left (a blob without a gradient counts as zeros), waits, scales by the
    float32 ``1/world_size`` and writes the averages back: the same arithmetic as one
    all-reduce after backward (the sum of two ranks is the same in any order; with more ranks
    the collective's own summation order applies, as for any all-reduce)."""

    def __init__(self, blobs: Sequence[torch.Tensor], world_size: int, bucket_bytes: int = 25 << 20):
        self.scale = float(np.float32(1.0 / world_size))
        self.buckets: List[List[torch.Tensor]] = []
        size = bucket_bytes
        for blob in reversed(list(blobs)):
            if size + blob.numel() * blob.element_size() > bucket_bytes and (not self.buckets or self.buckets[-1]):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(blob)
            size += blob.numel() * blob.element_size()
        self._where = {id(b): i for i, bucket in enumerate(self.buckets) for b in bucket}
        self._handles = [blob.register_post_accumulate_grad_hook(self._ready) for blob in blobs]
        self.armed = False
        self._pending: List[int] = []
        self._launched: List[Tuple[torch.Tensor, Any]] = []

    def arm(self) -> None:
        """Reduce during the next backward pass."""
        self.armed = True
        self._pending = [len(bucket) for bucket in self.buckets]
        self._launched = []

    def _ready(self, blob: torch.Tensor) -> None:
        if not self.armed:
            return
        self._pending[self._where[id(blob)]] -= 1
        while len(self._launched) < len(self.buckets) and self._pending[len(self._launched)] == 0:
            self._launch(len(self._launched))

    def _launch(self, index: int) -> None:
        bucket = self.buckets[index]
        for blob in bucket:
            if blob.grad is None:
                blob.grad = torch.zeros_like(blob)
        flat = torch.cat([b.grad.reshape(-1) for b in bucket])
        self._launched.append((flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))

    @torch.no_grad()
    def finish(self) -> None:
        """Launch the buckets not launched yet, wait for all, store the averaged gradients."""
        if not self.armed:
            self.arm()
        while len(self._launched) < len(self.buckets):
            self._launch(len(self._launched))
        for bucket, (flat, work) in zip(self.buckets, self._launched):
            work.wait()
            flat.mul_(self.scale)
            for blob, chunk in zip(bucket, flat.split([b.numel() for b in bucket])):
                blob.grad.copy_(chunk.view_as(blob.grad))
        self.armed = False
        self._launched = []

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timeout(seconds: Optional[float]) -> datetime.timedelta:
    return datetime.timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S if seconds is None else float(seconds))


def _worker(rank: int, fn: Callable, devices: List[str], backend: str, port: int, args: tuple,
            results, timeout: Optional[float]) -> None:
    # a spawned child inherits the "spawn" start method; the data layers' worker processes
    # need the platform's default (fork on Linux), as in a process started from the shell
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=len(devices), timeout=_timeout(timeout))
    try:
        results.put((rank, fn(Communicator(rank, len(devices), device), *args)))
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, devices: Sequence, args: tuple = (), backend: Optional[str] = None,
          timeout: Optional[float] = None) -> List[Any]:
    """Run ``fn(communicator, *args)`` in one new process per entry of ``devices`` ("cuda:0",
    "cuda:1" … or "cpu"), joined in a process group (NCCL for CUDA, else gloo) whose
    collectives time out after ``timeout`` seconds (default :data:`DEFAULT_COLLECTIVE_TIMEOUT_S`).
    ``fn`` must be importable by name (a module-level function) and return something picklable.
    Returns the ranks' return values in rank order. An exception that leaves a rank is raised
    here (torch then ends the other ranks: a failure the ranks agreed on should be returned,
    after the ranks' last barrier, not raised)."""
    devices = [str(torch.device(d)) for d in devices]
    if len(devices) < 1:
        raise ValueError("spawn needs at least one device")
    backend = backend or backend_for(torch.device(devices[0]))
    results = torch.multiprocessing.get_context("spawn").SimpleQueue()
    torch.multiprocessing.spawn(_worker, args=(fn, devices, backend, _free_port(), tuple(args), results, timeout),
                                nprocs=len(devices), join=True)
    returned = dict(results.get() for _ in devices)
    return [returned[rank] for rank in range(len(devices))]


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a torchrun launch (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_environment(device_type: str, timeout: Optional[float] = None) -> Optional[Tuple[Communicator, torch.device]]:
    """When launched by torchrun (``WORLD_SIZE`` > 1 in the environment): set this rank's
    device (``cuda:LOCAL_RANK`` for CUDA, the current device from then on), initialise the
    process group (NCCL for CUDA, else gloo; collectives time out after ``timeout`` seconds)
    and return this rank's communicator and device; else None."""
    if not launched_by_torchrun():
        return None
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=_timeout(timeout))
    return Communicator(rank, world, device), device
