"""BVLC loss and accuracy layers: SoftmaxWithLoss, SigmoidCrossEntropyLoss, EuclideanLoss,
Accuracy (Caffe semantics; labels are floats cast to int toward zero and get no gradient)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .base import Layer, canonical_axis, count, format_shape
from .registry import register

__all__ = ["SoftmaxWithLoss", "SigmoidCrossEntropyLoss", "EuclideanLoss", "Accuracy"]

_NORM = caffe_pb2.LossParameter
_LOG_FLT_MIN = math.log(float(np.finfo(np.float32).tiny))


class _LossBase(Layer):
    """Caffe's LossLayer: prediction and target with equal first dimensions, a scalar top 0
    weighted 1 by default."""

    num_bottoms = (2, 2)
    is_loss = True

    def check_first_dims(self, bottoms):
        tops = len(self.lp.top)
        if tops > 1 and len(self.lp.loss_weight) != tops:
            raise ValueError(f"with {tops} tops give one loss_weight per top (Caffe's loss layers add "
                             "a single default weight and then refuse the count)")
        if bottoms[0][:1] != bottoms[1][:1]:
            raise ValueError(f"the data and label should have the same first dimension: "
                             f"{format_shape(bottoms[0])} vs {format_shape(bottoms[1])}")


def _class_view(bottoms, axis_field: int):
    """``(axis, outer, classes, inner)`` of a per-class prediction whose labels are bottom 1."""
    shape = bottoms[0]
    axis = canonical_axis(axis_field, len(shape), "class axis")
    outer, inner = count(shape, 0, axis), count(shape, axis + 1)
    if outer * inner != count(bottoms[1]):
        raise ValueError(f"number of labels ({count(bottoms[1])}, bottom {format_shape(bottoms[1])}) must "
                         f"match number of predictions ({outer * inner} for {format_shape(shape)}, "
                         f"class axis {axis})")
    return axis, outer, shape[axis], inner


@register
class SoftmaxWithLoss(_LossBase):
    """``-sum log(max(p[label], FLT_MIN)) / normalizer`` with ``p`` the softmax over
    ``softmax_param.axis``; positions whose label is ``loss_param.ignore_label`` are skipped.
    normalizer (at least 1): FULL all positions, VALID (default) the non-ignored ones,
    BATCH_SIZE ``count(0, axis)``, NONE 1; legacy ``normalize: false`` means BATCH_SIZE.
    Optional top 1: the probabilities (no gradient). Gradient ``(p - onehot) / normalizer``."""

    caffe_type = "SoftmaxWithLoss"
    num_tops = (1, 2)

    def setup(self, bottoms):
        self.check_first_dims(bottoms)
        self.axis, self.outer, self.classes, self.inner = _class_view(bottoms, self.lp.softmax_param.axis)
        p = self.lp.loss_param
        self.ignore = p.ignore_label if p.HasField("ignore_label") else None
        if not p.HasField("normalization") and p.HasField("normalize"):
            self.normalization = _NORM.VALID if p.normalize else _NORM.BATCH_SIZE
        else:
            self.normalization = p.normalization
        return [()] + [bottoms[0]] * (len(self.lp.top) - 1)

    def forward(self, x, label):
        log_p = torch.log_softmax(x, self.axis).reshape(self.outer, self.classes, self.inner)
        label = label.detach().reshape(self.outer, 1, self.inner).long()
        valid = torch.ones_like(label, dtype=torch.bool) if self.ignore is None else label != self.ignore
        picked = log_p.gather(1, torch.where(valid, label, torch.zeros_like(label)))
        # Caffe's forward clamps p at FLT_MIN; its gradient stays p - 1 there
        picked = picked + (picked.clamp(min=_LOG_FLT_MIN) - picked).detach()
        total = -(picked * valid).sum()
        if self.normalization == _NORM.VALID and self.ignore is not None:
            normalizer = valid.sum().clamp(min=1).to(x.dtype)
        else:
            normalizer = max(1, {_NORM.FULL: self.outer * self.inner, _NORM.VALID: self.outer * self.inner,
                                 _NORM.BATCH_SIZE: self.outer, _NORM.NONE: 1}[self.normalization])
        loss = total / normalizer
        if len(self.lp.top) == 1:
            return loss
        return loss, torch.softmax(x.detach(), self.axis)


@register
class SigmoidCrossEntropyLoss(_LossBase):
    """``-sum(t log s(x) + (1 - t) log(1 - s(x))) / N`` (N the first dimension), computed in the
    overflow-safe form; gradient ``(s(x) - t) / N``."""

    caffe_type = "SigmoidCrossEntropyLoss"

    def setup(self, bottoms):
        self.check_first_dims(bottoms)
        if count(bottoms[0]) != count(bottoms[1]):
            raise ValueError(f"inputs must have the same count: {format_shape(bottoms[0])} vs "
                             f"{format_shape(bottoms[1])}")
        return [()]

    def forward(self, x, target):
        loss = F.binary_cross_entropy_with_logits(x, target.detach().reshape(x.shape), reduction="sum")
        return loss / x.shape[0]


@register
class EuclideanLoss(_LossBase):
    """``sum((a - b)^2) / N / 2`` with N the first dimension; both bottoms get gradients."""

    caffe_type = "EuclideanLoss"

    def setup(self, bottoms):
        self.check_first_dims(bottoms)
        if count(bottoms[0], 1) != count(bottoms[1], 1):
            raise ValueError(f"inputs must have the same dimension: {format_shape(bottoms[0])} vs "
                             f"{format_shape(bottoms[1])}")
        return [()]

    def forward(self, a, b):
        diff = a - b.reshape(a.shape)
        return (diff * diff).sum() / a.shape[0] / 2


@register
class Accuracy(Layer):
    """Fraction of (non-ignored) positions whose label is among the ``top_k`` highest scores
    along ``axis`` (equal scores rank the higher class index first, as Caffe's sort of
    (score, index) pairs); 0/0 gives NaN as in Caffe. Optional top 1: per-class accuracy
    ``[C]`` (0 for a class without positions). No gradient."""

    caffe_type = "Accuracy"
    num_bottoms = (2, 2)
    num_tops = (1, 2)

    def setup(self, bottoms):
        p = self.lp.accuracy_param
        self.top_k = p.top_k
        if count(bottoms[1]) and self.top_k > count(bottoms[0]) // count(bottoms[1]):
            raise ValueError(f"top_k {self.top_k} must be less than or equal to the number of classes")
        self.axis, self.outer, self.classes, self.inner = _class_view(bottoms, p.axis)
        self.ignore = p.ignore_label if p.HasField("ignore_label") else None
        return [()] + [(self.classes,)] * (len(self.lp.top) - 1)

    def forward(self, x, label):
        scores = x.detach().reshape(self.outer, self.classes, self.inner)
        label = label.detach().reshape(self.outer, 1, self.inner).long()
        valid = torch.ones_like(label, dtype=torch.bool) if self.ignore is None else label != self.ignore
        safe = torch.where(valid, label, torch.zeros_like(label))
        own = scores.gather(1, safe)
        index = torch.arange(self.classes, device=x.device).reshape(1, -1, 1)
        ahead = (scores > own) | ((scores == own) & (index > safe))
        hit = (ahead.sum(1, keepdim=True) < self.top_k) & valid
        accuracy = hit.sum().to(x.dtype) / valid.sum().to(x.dtype)
        if len(self.lp.top) == 1:
            return accuracy
        seen = torch.zeros(self.classes, dtype=x.dtype, device=x.device).index_add_(
            0, safe[valid], torch.ones_like(safe[valid], dtype=x.dtype))
        hits = torch.zeros_like(seen).index_add_(0, safe[hit], torch.ones_like(safe[hit], dtype=x.dtype))
        return accuracy, torch.where(seen > 0, hits / seen.clamp(min=1), torch.zeros_like(seen))
