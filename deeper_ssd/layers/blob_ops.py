"""Blob-structure layers of BVLC Caffe: Slice, Tile, ArgMax, Reduction, and the bottomless
Parameter and DummyData."""
from __future__ import annotations

import torch

from ..proto import caffe_pb2
from .base import Layer, canonical_axis, count, format_shape
from .fillers import fill
from .registry import register

__all__ = ["Slice", "Tile", "ArgMax", "Reduction", "Parameter", "DummyData"]

_REDUCTION = caffe_pb2.ReductionParameter


@register
class Slice(Layer):
    """Split the bottom along ``axis`` (or legacy ``slice_dim``) at the increasing
    ``slice_point`` s (one fewer than the tops), or into equal parts when none are given."""

    caffe_type = "Slice"
    num_tops = (1, None)

    def setup(self, bottoms):
        shape = bottoms[0]
        p = self.lp.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise ValueError("either axis or slice_dim should be specified; not both")
        if p.HasField("slice_dim"):
            if p.slice_dim >= len(shape):
                raise ValueError(f"slice_dim {p.slice_dim} out of range for a {len(shape)}-axis bottom")
            self.axis = p.slice_dim
        else:
            self.axis = canonical_axis(p.axis, len(shape), "slice axis")
        size, tops = shape[self.axis], len(self.lp.top)
        points = list(p.slice_point)
        if points:
            if len(points) != tops - 1:
                raise ValueError(f"{len(points)} slice_point values for {tops} tops (need {tops - 1})")
            bounds = [0] + points + [size]
            if any(b <= a for a, b in zip(bounds, bounds[1:])):
                raise ValueError(f"slice_point {points} must increase strictly inside (0, {size}) "
                                 f"for axis {self.axis} of bottom {format_shape(shape)}")
            self.sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        else:
            if size % tops:
                raise ValueError(f"{tops} tops do not evenly divide axis {self.axis} "
                                 f"({size}) of bottom {format_shape(shape)}")
            self.sizes = [size // tops] * tops
        return [shape[:self.axis] + (s,) + shape[self.axis + 1:] for s in self.sizes]

    def forward(self, x):
        if len(self.sizes) == 1:
            return x
        return tuple(torch.split(x, self.sizes, dim=self.axis))


@register
class Tile(Layer):
    """Repeat the block ``bottom[axis:]`` ``tiles`` times: top axis ``axis`` is ``tiles`` times
    longer, ``[a, b, c] -> [a, b, c, a, b, c]``."""

    caffe_type = "Tile"

    def setup(self, bottoms):
        shape = bottoms[0]
        p = self.lp.tile_param
        self.axis = canonical_axis(p.axis, len(shape), "tile axis")
        if not p.HasField("tiles"):
            raise ValueError("tiles must be specified")
        if p.tiles <= 0:
            raise ValueError(f"tiles {p.tiles} must be positive")
        self.repeats = (1,) * self.axis + (p.tiles,) + (1,) * (len(shape) - self.axis - 1)
        return [shape[:self.axis] + (shape[self.axis] * p.tiles,) + shape[self.axis + 1:]]

    def forward(self, x):
        return x.repeat(self.repeats)


@register
class ArgMax(Layer):
    """Indices (or values) of the ``top_k`` largest entries, in descending order; equal values
    come highest index first (Caffe sorts (value, index) pairs descending). Indices are floats.

    With ``axis``: over that axis; the top is the bottom with ``shape[axis] = top_k`` holding
    indices, or values when ``out_max_val``. Without: over each item's ``count(1)`` flattened
    values; top ``[N, 1, top_k]`` of indices, or ``[N, 2, top_k]`` of indices then values with
    ``out_max_val`` (padded with 1s to the bottom's axes, at least 3). No gradient (Caffe
    has no backward)."""

    caffe_type = "ArgMax"

    def setup(self, bottoms):
        shape = bottoms[0]
        p = self.lp.argmax_param
        self.top_k, self.out_max_val = p.top_k, p.out_max_val
        if self.top_k < 1:
            raise ValueError("top_k must not be less than 1")
        self.axis = canonical_axis(p.axis, len(shape), "argmax axis") if p.HasField("axis") else None
        if self.axis is not None:
            if self.top_k > shape[self.axis]:
                raise ValueError(f"top_k {self.top_k} exceeds axis {self.axis} of bottom {format_shape(shape)}")
            return [shape[:self.axis] + (self.top_k,) + shape[self.axis + 1:]]
        if self.top_k > count(shape, 1):
            raise ValueError(f"top_k {self.top_k} exceeds the {count(shape, 1)} values per item "
                             f"of bottom {format_shape(shape)}")
        top = [1] * max(3, len(shape))
        top[0], top[1], top[2] = shape[0], 2 if self.out_max_val else 1, self.top_k
        return [tuple(top)]

    def _top_k(self, x, dim):
        """Values and indices of the top_k largest along ``dim``, ties highest index first."""
        size = x.shape[dim]
        values, order = torch.sort(x.flip(dim), dim=dim, descending=True, stable=True)
        keep = torch.arange(self.top_k, device=x.device)
        return values.index_select(dim, keep), (size - 1 - order).index_select(dim, keep).to(x.dtype)

    def forward(self, x):
        x = x.detach()
        if self.axis is not None:
            values, indices = self._top_k(x, self.axis)
            return values if self.out_max_val else indices
        values, indices = self._top_k(x.reshape(x.shape[0], -1), 1)
        parts = (indices, values) if self.out_max_val else (indices,)
        return torch.stack(parts, 1).reshape((x.shape[0],) + tuple(self.top_shapes[0][1:]))


@register
class Reduction(Layer):
    """Reduce the axes ``axis..`` of each of the ``count(0, axis)`` leading items to one value,
    times ``coeff``: SUM, ASUM (sum of ``|x|``), SUMSQ (sum of ``x^2``) or MEAN. Top shape
    ``bottom[:axis]`` (a scalar for ``axis: 0``, the default)."""

    caffe_type = "Reduction"

    def setup(self, bottoms):
        shape = bottoms[0]
        p = self.lp.reduction_param
        self.axis = canonical_axis(p.axis, len(shape), "reduction axis")
        self.operation, self.coeff = p.operation, p.coeff
        return [tuple(shape[:self.axis])]

    def forward(self, x):
        flat = x.reshape(tuple(x.shape[:self.axis]) + (-1,))
        if self.operation == _REDUCTION.ASUM:
            flat = flat.abs()
        elif self.operation == _REDUCTION.SUMSQ:
            flat = flat * flat
        y = flat.mean(-1) if self.operation == _REDUCTION.MEAN else flat.sum(-1)
        return y if self.coeff == 1 else y * self.coeff


@register
class Parameter(Layer):
    """A learned blob of ``parameter_param.shape`` (initially 0, Caffe has no filler here) as the
    top; the top's gradient is the blob's."""

    caffe_type = "Parameter"
    num_bottoms = (0, 0)

    def setup(self, bottoms):
        shape = tuple(self.lp.parameter_param.shape.dim)
        self.add_blob(shape)
        return [shape]

    def forward(self):
        return self.blobs[0].clone()         # a later in-place layer must not write the blob


@register
class DummyData(Layer):
    """Tops of ``dummy_data_param.shape`` (one for all or one per top; or the legacy
    num/channels/height/width lists) filled by ``data_filler`` (none: constant 0; one for all or
    one per top) at every forward. Random fillers draw from torch's generator, not Caffe's.
    The caller may feed the tops instead, as for Input."""

    caffe_type = "DummyData"
    num_bottoms = (0, 0)
    num_tops = (1, None)
    is_source = True

    def setup(self, bottoms):
        p = self.lp.dummy_data_param
        tops = len(self.lp.top)
        if len(p.data_filler) not in (0, 1, tops):
            raise ValueError(f"{len(p.data_filler)} data_filler entries for {tops} tops; give 0, 1 or {tops}")
        fillers = list(p.data_filler) or [caffe_pb2.FillerParameter(type="constant", value=0)]
        self.fillers = fillers * tops if len(fillers) == 1 else fillers
        legacy = [list(getattr(p, f)) for f in ("num", "channels", "height", "width")]
        if any(legacy):
            if len(p.shape):
                raise ValueError("both shape and the legacy num/channels/height/width were given")
            for name, values in zip(("num", "channels", "height", "width"), legacy):
                if len(values) not in (1, tops):
                    raise ValueError(f"{name} has {len(values)} values for {tops} tops; give 1 or {tops}")
            return [tuple(v[0] if len(v) == 1 else v[i] for v in legacy) for i in range(tops)]
        if len(p.shape) not in (1, tops):
            raise ValueError(f"{len(p.shape)} shapes for {tops} tops; give 1 or {tops}")
        shapes = [tuple(s.dim) for s in p.shape]
        return shapes * tops if len(shapes) == 1 else shapes

    def forward(self):
        tops = tuple(fill(torch.empty(shape, device=self.device_for_blobs), filler)
                     for shape, filler in zip(self.top_shapes, self.fillers))
        return tops if len(tops) > 1 else tops[0]
