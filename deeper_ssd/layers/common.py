"""Element-wise, shape and normalisation layers with Caffe semantics.

ReLU, Sigmoid, TanH, Dropout, Concat, Eltwise, Split, Silence, Permute, Flatten, Reshape,
Softmax, Normalize, BatchNorm, Scale, Bias.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .base import Layer, Shape, canonical_axis, count, format_shape
from .registry import register

_ELTWISE = caffe_pb2.EltwiseParameter


def _describe_bottoms(layer: Layer, bottoms: List[Shape]) -> str:
    return ", ".join(f"'{name}' {format_shape(shape)}" for name, shape in zip(layer.lp.bottom, bottoms))


class _Identity(Layer):
    """Shape rule of element-wise layers: the top has the bottom's shape."""

    def setup(self, bottoms: List[Shape]) -> List[Shape]:
        return [bottoms[0]]


@register
class ReLU(_Identity):
    """``max(x, 0) + negative_slope * min(x, 0)``."""

    caffe_type = "ReLU"
    supports_in_place = True

    def setup(self, bottoms):
        self.negative_slope = self.lp.relu_param.negative_slope
        return super().setup(bottoms)

    def forward(self, x):
        if self.negative_slope == 0:
            return F.relu(x, inplace=self.overwrite_bottom)
        return F.leaky_relu(x, self.negative_slope, inplace=self.overwrite_bottom)


@register
class Sigmoid(_Identity):
    caffe_type = "Sigmoid"

    def forward(self, x):
        return torch.sigmoid(x)


@register
class TanH(_Identity):
    caffe_type = "TanH"

    def forward(self, x):
        return torch.tanh(x)


@register
class Dropout(_Identity):
    """TRAIN: zero with probability ``dropout_ratio``, scale survivors by ``1/(1-ratio)``; TEST: identity."""

    caffe_type = "Dropout"

    def setup(self, bottoms):
        self.ratio = self.lp.dropout_param.dropout_ratio
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"dropout_ratio {self.ratio} must be in [0, 1)")
        return super().setup(bottoms)

    def forward(self, x):
        return F.dropout(x, self.ratio, training=self.phase == caffe_pb2.TRAIN)


@register
class Concat(Layer):
    """Join the bottoms along ``axis`` (legacy ``concat_dim`` honoured); other axes must agree."""

    caffe_type = "Concat"
    num_bottoms = (1, None)

    def setup(self, bottoms):
        p = self.lp.concat_param
        first = bottoms[0]
        if any(len(s) != len(first) for s in bottoms):
            raise self.error(f"bottoms have different numbers of axes: {_describe_bottoms(self, bottoms)}")
        self.axis = p.concat_dim if p.HasField("concat_dim") else canonical_axis(p.axis, len(first))
        for shape in bottoms[1:]:
            if any(a != b for i, (a, b) in enumerate(zip(first, shape)) if i != self.axis):
                raise self.error(f"bottoms disagree outside concat axis {self.axis}: "
                                 f"{_describe_bottoms(self, bottoms)}")
        top = list(first)
        top[self.axis] = sum(s[self.axis] for s in bottoms)
        return [tuple(top)]

    def forward(self, *xs):
        return torch.cat(xs, dim=self.axis) if len(xs) > 1 else xs[0]


@register
class Eltwise(Layer):
    """Element-wise PROD, SUM (with optional per-bottom ``coeff``) or MAX of equal-shaped bottoms."""

    caffe_type = "Eltwise"
    num_bottoms = (2, None)

    def setup(self, bottoms):
        p = self.lp.eltwise_param
        if any(s != bottoms[0] for s in bottoms):
            raise self.error(f"bottoms must have equal shapes: {_describe_bottoms(self, bottoms)}")
        self.operation = p.operation
        if len(p.coeff) and p.operation != _ELTWISE.SUM:
            raise ValueError("coeff is only allowed with operation SUM")
        if len(p.coeff) not in (0, len(bottoms)):
            raise ValueError(f"coeff has {len(p.coeff)} values for {len(bottoms)} bottoms")
        self.coeff = list(p.coeff)
        return [bottoms[0]]

    def forward(self, *xs):
        if self.operation == _ELTWISE.SUM:
            if not self.coeff:
                return torch.stack(xs).sum(0) if len(xs) > 2 else xs[0] + xs[1]
            out = xs[0] * self.coeff[0]
            for x, c in zip(xs[1:], self.coeff[1:]):
                out = out + c * x
            return out
        out = xs[0]
        for x in xs[1:]:
            out = out * x if self.operation == _ELTWISE.PROD else torch.maximum(out, x)
        return out


@register
class Split(Layer):
    """Copy one bottom to several tops (Caffe inserts these automatically; explicit ones work too)."""

    caffe_type = "Split"
    num_tops = (1, None)

    def setup(self, bottoms):
        return [bottoms[0]] * len(self.lp.top)

    def forward(self, x):
        return tuple(x for _ in self.lp.top)


@register
class Silence(Layer):
    """Consume bottoms, produce nothing (keeps unused tops out of the net outputs)."""

    caffe_type = "Silence"
    num_bottoms = (1, None)
    num_tops = (0, 0)

    def setup(self, bottoms):
        return []

    def forward(self, *xs):
        return ()


@register
class Permute(Layer):
    """Top axis ``i`` is bottom axis ``order[i]``; unlisted axes follow in their natural order."""

    caffe_type = "Permute"

    def setup(self, bottoms):
        shape = bottoms[0]
        order = list(self.lp.permute_param.order)
        if len(set(order)) != len(order):
            raise ValueError(f"order {order} repeats an axis")
        if any(a >= len(shape) for a in order):
            raise ValueError(f"order {order} names an axis beyond the bottom's {len(shape)} axes")
        order += [a for a in range(len(shape)) if a not in order]
        self.order = tuple(order)
        self.identity = self.order == tuple(range(len(shape)))
        return [tuple(shape[a] for a in self.order)]

    def forward(self, x):
        return x if self.identity else x.permute(self.order).contiguous()


@register
class Flatten(Layer):
    """Merge axes ``axis..end_axis`` into one."""

    caffe_type = "Flatten"

    def setup(self, bottoms):
        shape = bottoms[0]
        p = self.lp.flatten_param
        self.start = canonical_axis(p.axis, len(shape), "flatten axis")
        self.end = canonical_axis(p.end_axis, len(shape), "flatten end_axis")
        if self.end < self.start:
            raise ValueError(f"end_axis {p.end_axis} comes before axis {p.axis}")
        return [shape[:self.start] + (count(shape, self.start, self.end + 1),) + shape[self.end + 1:]]

    def forward(self, x):
        return x.flatten(self.start, self.end)


@register
class Reshape(Layer):
    """Replace bottom axes ``[axis, axis + num_axes)`` by ``shape``: 0 copies the bottom dim at
    that position, -1 is inferred (at most one)."""

    caffe_type = "Reshape"

    def setup(self, bottoms):
        shape = bottoms[0]
        p = self.lp.reshape_param
        dims = list(p.shape.dim)
        if dims.count(-1) > 1:
            raise ValueError(f"shape {dims} has more than one -1")
        if any(d < -1 for d in dims):
            raise ValueError(f"shape {dims} has a negative dimension other than -1")
        start = p.axis + len(shape) + 1 if p.axis < 0 else p.axis
        if not 0 <= start <= len(shape):
            raise ValueError(f"axis {p.axis} out of range for a {len(shape)}-axis bottom")
        if p.num_axes < -1:
            raise ValueError(f"num_axes {p.num_axes} must be >= -1")
        end = len(shape) if p.num_axes == -1 else start + p.num_axes
        if end > len(shape):
            raise ValueError(f"axis {p.axis} + num_axes {p.num_axes} exceed the bottom's axes")
        new = []
        for i, d in enumerate(dims):
            if d == 0:
                if start + i >= len(shape):
                    raise ValueError(f"dim {i} is 0 (copy) but the bottom has no axis {start + i}")
                d = shape[start + i]
            new.append(d)
        top = list(shape[:start]) + new + list(shape[end:])
        if -1 in new:
            known = count([d for d in top if d != -1])
            total = count(shape)
            if known == 0 or total % known:
                raise ValueError(f"cannot infer -1 in {dims} for bottom {format_shape(shape)}")
            top[top.index(-1)] = total // known
        if count(top) != count(shape):
            raise ValueError(f"shape {format_shape(top)} does not hold the bottom's "
                             f"{count(shape)} values ({format_shape(shape)})")
        self.start, self.end, self.dims = start, end, dims
        return [tuple(top)]

    def forward(self, x):
        new = [x.shape[self.start + i] if d == 0 else d for i, d in enumerate(self.dims)]
        return x.reshape(tuple(x.shape[:self.start]) + tuple(new) + tuple(x.shape[self.end:]))


@register
class Softmax(_Identity):
    caffe_type = "Softmax"

    def setup(self, bottoms):
        self.axis = canonical_axis(self.lp.softmax_param.axis, len(bottoms[0]), "softmax axis")
        return super().setup(bottoms)

    def forward(self, x):
        return torch.softmax(x, dim=self.axis)


def _normalize(x, scale, dims, eps, scale_view):
    """Normalize's forward: ``(y, norm, scale as broadcast)``."""
    norm = torch.sqrt(x.pow(2).sum(dim=dims, keepdim=True) + eps)
    s = scale.reshape(scale_view)
    return x / norm * s, norm, s


class _CaffeNormalizeFunction(torch.autograd.Function):
    """Normalize's forward and Caffe's own backward.

    Caffe back-propagates ``dx = s * (g - x * sum(x * g) / n^2) / n`` (sums over the norm's
    axes), i.e. it applies the scale after the projection. With one scale per channel that is not
    the derivative of the forward (the exact one sums ``s_c * g_c * x_c``); we reproduce Caffe's
    so that training follows it (docs/decisions.md). The scale's gradient, ``sum(g * y) / s``
    per scale entry, is Caffe's as well (and exact).
    """

    @staticmethod
    def forward(ctx, x, scale, dims, eps, scale_view):
        y, norm, s = _normalize(x, scale, dims, eps, scale_view)
        ctx.save_for_backward(x, norm, s, y)
        ctx.dims, ctx.scale_shape = dims, scale.shape
        return y

    @staticmethod
    def backward(ctx, g):
        x, norm, s, y = ctx.saved_tensors
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:
            projection = (x * g).sum(dim=ctx.dims, keepdim=True) / norm.pow(2)
            grad_x = (g - x * projection) / norm * s
        if ctx.needs_input_grad[1]:
            per_entry = g * y / s
            reduce = [d for d in range(g.dim()) if s.shape[d] == 1]
            grad_scale = per_entry.sum(dim=reduce).reshape(ctx.scale_shape)
        return grad_x, grad_scale, None, None, None


@register
class Normalize(_Identity):
    """SSD's L2 normalisation with a learned scale.

    ``across_spatial: false``: ``y = x / sqrt(eps + sum_c x^2) * s`` per pixel;
    ``true``: one norm ``sqrt(sum_{c,h,w} x^2 + eps)`` per image. ``s`` is one scalar
    (``channel_shared``, a 0-axis blob) or one value per channel. Backward is Caffe's (see
    ``_CaffeNormalizeFunction``).
    """

    caffe_type = "Normalize"
    float32 = True              # Caffe-semantic arithmetic, float32 under autocast

    def setup(self, bottoms):
        shape = bottoms[0]
        if len(shape) < 2:
            raise ValueError(f"needs at least 2 axes, got {format_shape(shape)}")
        p = self.lp.norm_param
        self.across_spatial, self.channel_shared, self.eps = p.across_spatial, p.channel_shared, p.eps
        filler = p.scale_filler if p.HasField("scale_filler") else caffe_pb2.FillerParameter(type="constant", value=1.0)
        self.add_blob(() if self.channel_shared else (shape[1],), filler)
        self.norm_dims = tuple(range(1, len(shape))) if self.across_spatial else (1,)
        self.scale_view = (1,) * len(shape) if self.channel_shared else (1, -1) + (1,) * (len(shape) - 2)
        return super().setup(bottoms)

    def forward(self, x):
        if not torch.is_grad_enabled():         # same arithmetic; plain ops trace and export
            return _normalize(x, self.blobs[0], self.norm_dims, self.eps, self.scale_view)[0]
        return _CaffeNormalizeFunction.apply(x, self.blobs[0], self.norm_dims, self.eps, self.scale_view)


@register
class BatchNorm(_Identity):
    """Caffe BatchNorm (no affine part; pair it with Scale). Blobs: running mean sum ``[C]``,
    running variance sum ``[C]``, accumulation weight ``[1]``; none are learned by the solver."""

    caffe_type = "BatchNorm"

    def setup(self, bottoms):
        shape = bottoms[0]
        p = self.lp.batch_norm_param
        self.use_global_stats = (p.use_global_stats if p.HasField("use_global_stats")
                                 else self.phase == caffe_pb2.TEST)
        self.fraction, self.eps = p.moving_average_fraction, p.eps
        if not self.eps >= 0:
            raise ValueError(f"batch_norm_param.eps must be >= 0, got {self.eps:g}")
        channels = shape[1] if len(shape) > 1 else 1
        for blob_shape in ((channels,), (channels,), (1,)):
            self.add_blob(blob_shape, None, learnable=False)
        return super().setup(bottoms)

    def forward(self, x, scale=None, bias=None):
        """``x`` [N, C, ...]. ``scale``/``bias`` [C]: the learned blobs of an in-place Scale
        layer that follows, when the net runs the pair as one kernel (``Net`` decides); the
        result is then Scale's output."""
        mean_sum, var_sum, weight = self.blobs
        if self.use_global_stats:
            factor = torch.where(weight == 0, torch.zeros_like(weight), 1.0 / weight)
            return F.batch_norm(x, mean_sum * factor, var_sum * factor, scale, bias,
                                training=False, eps=self.eps)
        # one fused kernel normalises with the batch mean and biased variance (as Caffe) and
        # returns them; Caffe's running sums are then updated from those
        y, mean, inv_std = torch.native_batch_norm(x, scale, bias, None, None, True, 0.0, self.eps)
        with torch.no_grad():
            m = x.numel() // x.shape[1]
            var = inv_std.pow(-2) - self.eps
            weight.mul_(self.fraction).add_(1.0)
            mean_sum.mul_(self.fraction).add_(mean.to(mean_sum.dtype))
            var_sum.mul_(self.fraction).add_(var.to(var_sum.dtype) * (m / max(m - 1, 1)))
        return y


class _AxisParameterLayer(Layer):
    """Shared by Scale and Bias: a second bottom or a learned blob covering ``axis..axis+num_axes``,
    broadcast over the remaining axes."""

    num_bottoms = (1, 2)

    def _operand_shape(self, bottoms, axis_field: int, num_axes: int) -> Shape:
        shape = bottoms[0]
        if len(bottoms) == 2:
            operand = bottoms[1]
            axis = canonical_axis(axis_field, len(shape)) if operand else 0
        else:
            axis = canonical_axis(axis_field, len(shape))
            if num_axes < -1:
                raise ValueError(f"num_axes {num_axes} must be >= -1")
            end = len(shape) if num_axes == -1 else axis + num_axes
            if end > len(shape):
                raise ValueError(f"axis {axis_field} + num_axes {num_axes} exceed the bottom's axes")
            operand = shape[axis:end]
        if tuple(shape[axis:axis + len(operand)]) != tuple(operand):
            raise self.error(f"operand {format_shape(operand)} does not match bottom "
                             f"{format_shape(shape)} from axis {axis}: {_describe_bottoms(self, bottoms)}")
        self.view = (1,) * axis + tuple(operand) + (1,) * (len(shape) - axis - len(operand))
        return tuple(operand)


@register
class Scale(_AxisParameterLayer):
    """``y = x * s (+ b)``; ``s`` is bottom 1 or a learned blob (default 1), ``b`` learned (default 0)."""

    caffe_type = "Scale"

    def setup(self, bottoms):
        p = self.lp.scale_param
        operand = self._operand_shape(bottoms, p.axis, p.num_axes)
        if len(bottoms) == 1:
            self.add_blob(operand, p.filler if p.HasField("filler")
                          else caffe_pb2.FillerParameter(type="constant", value=1.0))
        self.bias_term = p.bias_term
        if self.bias_term:
            self.add_blob(operand, p.bias_filler if p.HasField("bias_filler") else None)
        return [bottoms[0]]

    def forward(self, x, scale=None):
        blobs = list(self.blobs)
        if scale is None:
            scale = blobs.pop(0)
        if self.bias_term:
            return torch.addcmul(blobs[0].reshape(self.view), x, scale.reshape(self.view))
        return x * scale.reshape(self.view)


@register
class Bias(_AxisParameterLayer):
    """``y = x + b``; ``b`` is bottom 1 or a learned blob (default 0)."""

    caffe_type = "Bias"

    def setup(self, bottoms):
        p = self.lp.bias_param
        operand = self._operand_shape(bottoms, p.axis, p.num_axes)
        if len(bottoms) == 1:
            self.add_blob(operand, p.filler if p.HasField("filler") else None)
        return [bottoms[0]]

    def forward(self, x, bias=None):
        return x + (self.blobs[0] if bias is None else bias).reshape(self.view)
