"""Element-wise BVLC "neuron" layers with Caffe's forward and backward.

AbsVal, BNLL, ELU, Exp, Log, Power, PReLU, Threshold. Every top has its bottom's shape.
Backward is autograd's derivative of the forward, which is Caffe's own backward except at the
singular points noted per class (docs/decisions.md, "BVLC layers").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .base import Layer, format_shape
from .registry import register

__all__ = ["AbsVal", "BNLL", "ELU", "Exp", "Log", "Power", "PReLU", "Threshold"]


class _Neuron(Layer):
    """Shape rule of element-wise layers: the top has the bottom's shape."""

    def setup(self, bottoms):
        self.parse()
        return [bottoms[0]]

    def parse(self) -> None:
        """Read this type's parameters (none by default)."""


@register
class AbsVal(_Neuron):
    """``y = |x|``; ``dx = sign(x) dy`` with ``sign(0) = 0``. Caffe refuses it in place."""

    caffe_type = "AbsVal"

    def parse(self):
        if list(self.lp.top) == list(self.lp.bottom):
            raise ValueError("does not allow in-place computation (top and bottom are the same blob)")

    def forward(self, x):
        return torch.abs(x)


@register
class BNLL(_Neuron):
    """Binomial normal log likelihood ``y = log(1 + exp(x))`` (computed as ``x + log(1 + exp(-x))``
    for ``x > 0``); ``dx = dy * e / (1 + e)`` with ``e = exp(min(x, 50))``."""

    caffe_type = "BNLL"

    def forward(self, x):
        # softplus above the threshold returns x, where Caffe's form already rounds to x
        # (log(1 + exp(-50)) is 0 in float64); its gradient there is 1, Caffe's sigmoid(50)
        return F.softplus(x, beta=1.0, threshold=50.0)


@register
class ELU(_Neuron):
    """``y = x`` for ``x > 0``, else ``alpha (exp(x) - 1)``; ``dx = dy (alpha + y)`` for ``x <= 0``."""

    caffe_type = "ELU"

    def parse(self):
        self.alpha = self.lp.elu_param.alpha

    def forward(self, x):
        return F.elu(x, self.alpha)


@register
class Exp(_Neuron):
    """``y = base ^ (shift + scale x)``; ``base: -1`` (default) means e; other bases must be > 0."""

    caffe_type = "Exp"

    def parse(self):
        p = self.lp.exp_param
        if p.base != -1 and p.base <= 0:
            raise ValueError(f"base {p.base} must be strictly positive (or -1 for e)")
        log_base = 1.0 if p.base == -1 else math.log(p.base)
        self.inner_scale = log_base * p.scale
        self.outer_scale = 1.0 if p.shift == 0 else math.exp(log_base * p.shift)

    def forward(self, x):
        y = torch.exp(x if self.inner_scale == 1 else x * self.inner_scale)
        return y if self.outer_scale == 1 else y * self.outer_scale


@register
class Log(_Neuron):
    """``y = log_base(shift + scale x)``; ``base: -1`` (default) means e; other bases must be > 0."""

    caffe_type = "Log"

    def parse(self):
        p = self.lp.log_param
        if p.base != -1 and p.base <= 0:
            raise ValueError(f"base {p.base} must be strictly positive (or -1 for e)")
        self.base_scale = 1.0 if p.base == -1 else 1.0 / math.log(p.base)
        self.scale, self.shift = p.scale, p.shift

    def forward(self, x):
        if self.scale != 1:
            x = x * self.scale
        if self.shift != 0:
            x = x + self.shift
        y = torch.log(x)
        return y if self.base_scale == 1 else y * self.base_scale


@register
class Power(_Neuron):
    """``y = (shift + scale x) ^ power``. With ``power * scale == 0`` the top is the constant
    ``shift ^ power`` (1 when ``power`` is 0) and carries no gradient, as in Caffe. Caffe's
    backward divides ``power * y`` by ``x`` (``shift == 0``) or by ``shift + scale x``; where that
    is 0 Caffe gives NaN/inf, autograd the limit of the derivative."""

    caffe_type = "Power"

    def parse(self):
        p = self.lp.power_param
        self.power, self.scale, self.shift = p.power, p.scale, p.shift
        self.constant = None
        if self.power * self.scale == 0:
            self.constant = 1.0 if self.power == 0 else self.shift ** self.power

    def forward(self, x):
        if self.constant is not None:
            return torch.full_like(x, self.constant)
        if self.scale != 1:
            x = x * self.scale
        if self.shift != 0:
            x = x + self.shift
        return x if self.power == 1 else torch.pow(x, self.power)


@register
class PReLU(Layer):
    """``y = max(x, 0) + a_c min(x, 0)`` over channel axis 1, ``a`` one learned value per channel
    (blob ``[C]``) or one shared (``channel_shared``, a 0-axis blob); default filler constant 0.25.
    ``dx = dy`` for ``x > 0``, ``a_c dy`` for ``x <= 0``."""

    caffe_type = "PReLU"

    def setup(self, bottoms):
        shape = bottoms[0]
        if len(shape) < 2:
            raise ValueError(f"bottom needs at least 2 axes, has {format_shape(shape)}")
        p = self.lp.prelu_param
        filler = p.filler if p.HasField("filler") else caffe_pb2.FillerParameter(type="constant", value=0.25)
        self.channel_shared = p.channel_shared
        self.add_blob(() if self.channel_shared else (shape[1],), filler)
        self.view = (1,) * len(shape) if self.channel_shared else (1, shape[1]) + (1,) * (len(shape) - 2)
        return [shape]

    def forward(self, x):
        return torch.where(x > 0, x, x * self.blobs[0].reshape(self.view))


@register
class Threshold(_Neuron):
    """``y = 1`` where ``x > threshold``, else 0. No gradient (Caffe's backward is not implemented)."""

    caffe_type = "Threshold"

    def parse(self):
        self.threshold = self.lp.threshold_param.threshold

    def forward(self, x):
        return (x > self.threshold).to(x.dtype)

