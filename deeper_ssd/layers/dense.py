"""Fully connected layers: InnerProduct and Embed (Caffe semantics)."""
from __future__ import annotations

import torch.nn.functional as F

from .base import Layer, canonical_axis, count, format_shape
from .registry import register

__all__ = ["InnerProduct", "Embed"]


@register
class InnerProduct(Layer):
    """``y = x W^T + b`` over the flattened axes ``axis..`` of the bottom: ``[M, K] -> [M, N]`` with
    ``M = count(0, axis)``, ``K = count(axis)``, ``N = num_output``; top shape
    ``bottom[:axis] + (N,)``. Weights ``[N, K]``, or ``[K, N]`` with ``transpose: true`` (then
    ``y = x W``); bias ``[N]`` when ``bias_term``."""

    caffe_type = "InnerProduct"

    def setup(self, bottoms):
        shape = bottoms[0]
        p = self.lp.inner_product_param
        if p.num_output == 0:
            raise ValueError("num_output must be set and positive")
        self.axis = canonical_axis(p.axis, len(shape), "inner product axis")
        k = count(shape, self.axis)
        if k <= 0:
            raise ValueError(f"axes {self.axis}.. of bottom {format_shape(shape)} must have known sizes")
        self.transpose = p.transpose
        self.add_blob((k, p.num_output) if self.transpose else (p.num_output, k),
                      p.weight_filler if p.HasField("weight_filler") else None)
        if p.bias_term:
            self.add_blob((p.num_output,), p.bias_filler if p.HasField("bias_filler") else None)
        return [tuple(shape[:self.axis]) + (p.num_output,)]

    def macs(self) -> int:
        return count(self.bottom_shapes[0]) * self.lp.inner_product_param.num_output

    def forward(self, x):
        weight = self.blobs[0].t() if self.transpose else self.blobs[0]
        return F.linear(x.flatten(self.axis), weight, self.blobs[1] if len(self.blobs) > 1 else None)


@register
class Embed(Layer):
    """Look up row ``x`` of a learned ``[input_dim, num_output]`` table for every bottom value
    (integers stored as floats, ``0 <= x < input_dim``), plus a ``[num_output]`` bias: top
    ``bottom + (num_output,)``. No gradient reaches the bottom (Caffe refuses to back-propagate
    to it; give ``propagate_down: false``)."""

    caffe_type = "Embed"

    def setup(self, bottoms):
        p = self.lp.embed_param
        if p.num_output == 0 or p.input_dim == 0:
            raise ValueError(f"num_output ({p.num_output}) and input_dim ({p.input_dim}) must be positive")
        self.input_dim = p.input_dim
        self.add_blob((p.input_dim, p.num_output), p.weight_filler if p.HasField("weight_filler") else None)
        if p.bias_term:
            self.add_blob((p.num_output,), p.bias_filler if p.HasField("bias_filler") else None)
        return [tuple(bottoms[0]) + (p.num_output,)]

    def forward(self, x):
        index = x.detach().long()
        if bool(((index < 0) | (index >= self.input_dim) | (index != x.detach())).any()):
            raise self.error(f"bottom values must be integers in [0, {self.input_dim})")
        y = F.embedding(index, self.blobs[0])
        return y + self.blobs[1] if len(self.blobs) > 1 else y
