"""Caffe's weight fillers (``include/caffe/filler.hpp``), on torch tensors, seeded by a Generator.

Distributions and fan rules are Caffe's (its xavier is ``U(-sqrt(3/n), +sqrt(3/n))`` with
``n = fan_in = count/shape[0]`` by default, not Glorot's); the random streams are torch's, so
values are reproducible under a seed but not bit-equal to Caffe's own draws.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..proto import caffe_pb2

__all__ = ["fill", "FILLER_TYPES"]

_VARIANCE_NORM = caffe_pb2.FillerParameter


def _fan(shape, variance_norm: int) -> float:
    numel = math.prod(shape)
    fan_in = numel / shape[0]
    fan_out = numel / shape[1] if len(shape) > 1 else numel
    if variance_norm == _VARIANCE_NORM.FAN_OUT:
        return fan_out
    if variance_norm == _VARIANCE_NORM.AVERAGE:
        return (fan_in + fan_out) / 2.0
    return fan_in


def _uniform(out: torch.Tensor, low: float, high: float, gen) -> None:
    out.uniform_(low, high, generator=gen)


def _fill_constant(out, p, gen):
    out.fill_(p.value)


def _fill_uniform(out, p, gen):
    _uniform(out, p.min, p.max, gen)


def _fill_gaussian(out, p, gen):
    out.normal_(p.mean, p.std, generator=gen)
    if p.sparse >= 0:
        if out.dim() < 1 or out.numel() == 0:
            raise ValueError("sparse gaussian filler needs a blob with at least one axis")
        keep = p.sparse / out.shape[0]
        mask = torch.empty_like(out).uniform_(0, 1, generator=gen) < keep
        out.mul_(mask.to(out.dtype))


def _fill_positive_unitball(out, p, gen):
    _uniform(out, 0.0, 1.0, gen)
    rows = out.view(out.shape[0], -1) if out.dim() else out.view(1, -1)
    rows.div_(rows.sum(dim=1, keepdim=True))


def _fill_xavier(out, p, gen):
    scale = math.sqrt(3.0 / _fan(out.shape, p.variance_norm))
    _uniform(out, -scale, scale, gen)


def _fill_msra(out, p, gen):
    out.normal_(0.0, math.sqrt(2.0 / _fan(out.shape, p.variance_norm)), generator=gen)


def _fill_bilinear(out, p, gen):
    if out.dim() != 4 or out.shape[2] != out.shape[3]:
        raise ValueError(f"bilinear filler needs a 4-axis blob with square kernels, got {tuple(out.shape)}")
    size = out.shape[3]
    f = math.ceil(size / 2.0)
    c = torch.tensor((2 * f - 1 - f % 2) / (2.0 * f), dtype=torch.float32)
    ramp = 1 - (torch.arange(size, dtype=torch.float32) / f - c).abs()      # float32, as Caffe
    out.copy_((ramp[:, None] * ramp[None, :]).expand_as(out))


FILLER_TYPES = {
    "constant": _fill_constant,
    "uniform": _fill_uniform,
    "gaussian": _fill_gaussian,
    "positive_unitball": _fill_positive_unitball,
    "xavier": _fill_xavier,
    "msra": _fill_msra,
    "bilinear": _fill_bilinear,
}


@torch.no_grad()
def fill(tensor: torch.Tensor, filler: Optional[caffe_pb2.FillerParameter],
         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fill ``tensor`` in place as Caffe's filler ``filler`` would (None = constant 0).

    The draw happens on the CPU in float32 and is copied to the tensor's device and dtype,
    so a seed gives the same values on CPU and CUDA.
    """
    filler = filler if filler is not None else caffe_pb2.FillerParameter()
    rule = FILLER_TYPES.get(filler.type)
    if rule is None:
        raise ValueError(f"unknown filler type {filler.type!r}; known: {', '.join(FILLER_TYPES)}")
    if tensor.numel() == 0:
        return tensor
    host = torch.empty(tensor.shape, dtype=torch.float32)
    rule(host, filler, generator)
    tensor.copy_(host)
    return tensor
