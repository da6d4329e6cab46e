"""Local normalisation layers of BVLC Caffe: LRN and MVN."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .base import Layer, format_shape
from .registry import register

__all__ = ["LRN", "MVN"]

_LRN = caffe_pb2.LRNParameter


@register
class LRN(Layer):
    """Local response normalisation of ``N x C x H x W``, ``local_size`` n odd, ``y = x s^-beta``.

    ACROSS_CHANNELS: ``s = k + alpha / n * sum(x^2)`` over channels ``c - (n-1)/2 .. c + (n-1)/2``
    (zero outside). WITHIN_CHANNEL (Caffe's split/square/pool/power/product subnet):
    ``s = 1 + alpha * avg(x^2)`` over the ``n x n`` window centred on the pixel, zero-padded,
    always divided by ``n^2``; ``k`` is not used there."""

    caffe_type = "LRN"

    def setup(self, bottoms):
        shape = bottoms[0]
        if len(shape) != 4:
            raise ValueError(f"input must have 4 axes (N x C x H x W), got {format_shape(shape)}")
        p = self.lp.lrn_param
        if p.local_size % 2 != 1:
            raise ValueError(f"local_size {p.local_size} must be odd")
        self.size, self.alpha, self.beta, self.k = p.local_size, p.alpha, p.beta, p.k
        self.within = p.norm_region == _LRN.WITHIN_CHANNEL
        return [shape]

    def forward(self, x):
        pad = (self.size - 1) // 2
        if self.within:
            mean = F.avg_pool2d(x * x, self.size, 1, pad, count_include_pad=True)
            scale = 1 + self.alpha * mean
        else:
            mean = F.avg_pool3d((x * x).unsqueeze(1), (self.size, 1, 1), 1, (pad, 0, 0),
                                count_include_pad=True).squeeze(1)
            scale = self.k + self.alpha * mean
        return x * scale.pow(-self.beta)


class _CaffeMVNFunction(torch.autograd.Function):
    """Variance normalisation of ``[num, dim]`` rows with Caffe's backward.

    Forward ``y = (x - mean) / (std + eps)`` (biased std, eps added after the square root).
    Caffe back-propagates ``dx = (g - mean(g) - y * mean(y g)) / (std + eps)``; the exact
    derivative scales the last term by ``(std + eps) / std`` (equal when eps is 0)."""

    @staticmethod
    def forward(ctx, x, eps):
        centred = x - x.mean(1, keepdim=True)
        denominator = centred.pow(2).mean(1, keepdim=True).sqrt() + eps
        y = centred / denominator
        ctx.save_for_backward(y, denominator)
        return y

    @staticmethod
    def backward(ctx, g):
        y, denominator = ctx.saved_tensors
        grad = g - g.mean(1, keepdim=True) - y * (y * g).mean(1, keepdim=True)
        return grad / denominator, None


@register
class MVN(Layer):
    """Mean (and variance) normalisation over each item's values (``across_channels``) or each
    channel's ``H x W`` values: ``y = x - mean``, or with ``normalize_variance`` (default)
    ``(x - mean) / (std + eps)``, std biased, eps (default 1e-9) added after the square root as
    Caffe does. The top is 4-D as Caffe's (``N x C x H x W``, missing axes 1). Backward is
    Caffe's (``_CaffeMVNFunction``)."""

    caffe_type = "MVN"

    def setup(self, bottoms):
        shape = bottoms[0]
        if not 1 <= len(shape) <= 4:
            raise ValueError(f"bottom must have 1 to 4 axes (Caffe's num/channels view), got {format_shape(shape)}")
        p = self.lp.mvn_param
        self.normalize_variance, self.eps = p.normalize_variance, p.eps
        self.top_shape = tuple(shape) + (1,) * (4 - len(shape))       # Caffe reshapes the top to 4-D
        self.leading = 1 if p.across_channels else 2
        return [self.top_shape]

    def forward(self, x):
        rows = x.reshape(-1, math.prod(self.top_shape[self.leading:]))
        if self.normalize_variance:
            y = _CaffeMVNFunction.apply(rows, self.eps)
        else:
            y = rows - rows.mean(1, keepdim=True)
        return y.reshape((x.shape[0],) + self.top_shape[1:])
