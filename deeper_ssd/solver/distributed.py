"""Data parallelism with Caffe's multi-GPU semantics over ``torch.distributed`` (docs/semantics.md,
"Multi-GPU").

``caffe train --gpu 0,1,…`` runs one solver per GPU, each with the prototxt's full
``batch_size`` and its own loss normalisation (MultiBoxLoss divides by *its* match count); the
gradients are summed and scaled by ``1/world_size`` (averaged), one update is applied and the
root's weights are what every GPU starts the next iteration with — including BatchNorm's
statistics (Caffe broadcasts every learnable blob, and those are learnable blobs with lr_mult 0).
Training records are dealt round-robin (record ``i`` to rank ``i % world_size``).

Here every rank applies the same update to the same averaged gradients, so the trained blobs
stay identical without a broadcast; only the blobs no gradient reaches (lr_mult 0: BatchNorm
statistics) are broadcast from rank 0 before each iteration. Rank 0 tests, logs and snapshots.

Launch: ``deeper-ssd train --gpus 0,1`` spawns one process per GPU (:func:`spawn`, NCCL), or
``torchrun --nproc_per_node N -m deeper_ssd.cli train …`` (:func:`from_environment`). On CPU the
same code runs with the gloo backend (the tests use two processes).
"""
from __future__ import annotations

import multiprocessing
import os
import socket
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Communicator", "spawn", "from_environment", "backend_for"]


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


class Communicator:
    """The collectives a :class:`deeper_ssd.solver.trainer.Solver` needs, for one rank of an
    initialised default process group. Tensors are moved to ``device`` for the collectives."""

    def __init__(self, rank: int, world_size: int, device):
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device)

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
        """The blobs no gradient updates (lr_mult 0: BatchNorm statistics) from rank 0."""
        self._broadcast([p.blob for p in params if not p.blob.requires_grad])

    def _broadcast(self, blobs: List[torch.Tensor]) -> None:
        if not blobs:
            return
        flat = torch.cat([b.detach().reshape(-1) for b in blobs])
        dist.broadcast(flat, 0)
        for blob, chunk in zip(blobs, flat.split([b.numel() for b in blobs])):
            blob.copy_(chunk.view_as(blob))

    @torch.no_grad()
    def average_gradients(self, params: Sequence) -> None:
        """Sum every trained blob's gradient over the ranks and scale by ``1/world_size``
        (float32, as Caffe's ``caffe_gpu_scal``); a missing gradient counts as zeros."""
        blobs = [p.blob for p in params if p.blob.requires_grad]
        for blob in blobs:
            if blob.grad is None:
                blob.grad = torch.zeros_like(blob)
        if not blobs:
            return
        flat = torch.cat([b.grad.reshape(-1) for b in blobs])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.mul_(float(np.float32(1.0 / self.world_size)))
        for blob, chunk in zip(blobs, flat.split([b.numel() for b in blobs])):
            blob.grad.copy_(chunk.view_as(blob.grad))

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (a non-finite loss or gradient)."""
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def agree(self, request: Optional[str]) -> Optional[str]:
        """The strongest signal request of any rank ("stop" over "snapshot"), so that all
        ranks stop or snapshot together."""
        flags = torch.tensor([float(request == "stop"), float(request == "snapshot")], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, snap = (bool(v) for v in flags.tolist())
        return "stop" if stop else ("snapshot" if snap else None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, devices: List[str], backend: str, port: int, args: tuple) -> None:
    # a spawned child inherits the "spawn" start method; the data layers' worker processes
    # need the platform's default (fork on Linux), as in a process started from the shell
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=len(devices))
    try:
        fn(Communicator(rank, len(devices), device), *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, devices: Sequence, args: tuple = (), backend: Optional[str] = None) -> None:
    """Run ``fn(communicator, *args)`` in one new process per entry of ``devices`` ("cuda:0",
    "cuda:1" … or "cpu"), joined in a process group (NCCL for CUDA, else gloo). ``fn`` must be
    importable by name (a module-level function). An exception in any rank is raised here."""
    devices = [str(torch.device(d)) for d in devices]
    if len(devices) < 1:
        raise ValueError("spawn needs at least one device")
    backend = backend or backend_for(torch.device(devices[0]))
    torch.multiprocessing.spawn(_worker, args=(fn, devices, backend, _free_port(), tuple(args)),
                                nprocs=len(devices), join=True)


def from_environment(device_type: str) -> Optional[Tuple[Communicator, torch.device]]:
    """When launched by torchrun (``WORLD_SIZE`` > 1 in the environment): initialise the
    process group and return this rank's communicator and device (``cuda:LOCAL_RANK`` for
    CUDA); else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return Communicator(rank, world, device), device
