"""Which device a training process uses, said in one log line.

    device = training_device(param, requested=None)   # solver_mode GPU -> cuda:device_id
    use_device(device)                                 # cuda:N becomes the current device
    describe(device)                                   # "cuda:0 (NVIDIA H100 80GB HBM3, 79.1 GiB)"

The rule (docs/decisions.md, "Devices"): a device the user names (``--device``) is used as
named, and must exist; without one the solver's ``solver_mode`` decides — GPU means
``cuda:device_id`` and is an error where CUDA is not available (``--device cpu`` is the
explicit, logged fallback); CPU means the CPU. Under torchrun rank r uses ``cuda:LOCAL_RANK``
(:func:`deeper_ssd.solver.distributed.from_environment`), with ``--gpus`` rank r the r-th GPU
listed.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..proto import caffe_pb2

__all__ = ["DeviceError", "parse_device", "training_device", "use_device", "describe", "wants_gpu"]


class DeviceError(ValueError):
    """A device that cannot be used here; one line saying why and what to give instead."""


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_device(spec) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device (``cuda`` is ``cuda:0``); DeviceError
    for a malformed name or a CUDA device this machine does not have."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device {spec!r}: give cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {spec!r}: give cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = _cuda_count()
        index = device.index or 0
        if index >= count:
            raise DeviceError(f"device {spec!r}: " + (
                f"this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})" if count
                else "CUDA is not available here (no GPU visible, or torch built without CUDA); "
                     "give --device cpu to train on the CPU"))
        device = torch.device("cuda", index)
    return device


def wants_gpu(param: caffe_pb2.SolverParameter) -> bool:
    """Whether the solver asks for a GPU (``solver_mode: GPU``, Caffe's default)."""
    return param.solver_mode == caffe_pb2.SolverParameter.GPU


def training_device(param: caffe_pb2.SolverParameter, requested=None) -> torch.device:
    """The device a single training process uses: ``requested`` when given (checked by
    :func:`parse_device`), else ``cuda:device_id`` for ``solver_mode: GPU`` (DeviceError
    without CUDA) and the CPU for ``solver_mode: CPU``."""
    if requested is not None:
        return parse_device(requested)
    if not wants_gpu(param):
        return torch.device("cpu")
    if not _cuda_count():
        raise DeviceError("solver_mode is GPU but CUDA is not available here (no GPU visible, or torch built "
                          "without CUDA); give --device cpu to train on the CPU, or set solver_mode: CPU")
    return parse_device(f"cuda:{param.device_id}")


def use_device(device: torch.device) -> None:
    """Make a CUDA ``device`` the current one (kernels, caches and NCCL of this process go there;
    plain ``cuda`` means cuda:0, as :func:`parse_device` reads it)."""
    if device.type == "cuda":
        torch.cuda.set_device(torch.device("cuda", device.index or 0))


def describe(device: torch.device) -> str:
    """``device`` with its name and memory (CUDA) or thread count (CPU), for the log."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2 ** 30:.1f} GiB)"
    return f"{device} ({torch.get_num_threads()} threads)"


def requested_fallback(param: caffe_pb2.SolverParameter, requested: Optional[torch.device]) -> bool:
    """Whether the user asked for the CPU although the solver asks for a GPU."""
    return requested is not None and requested.type == "cpu" and wants_gpu(param)
