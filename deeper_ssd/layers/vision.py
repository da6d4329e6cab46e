"""Spatial layers: Convolution, Deconvolution, Pooling, Crop (Caffe semantics, 2-D, NCHW)."""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .base import Layer, Shape, canonical_axis, format_shape
from .registry import register

__all__ = ["Convolution", "Deconvolution", "Pooling", "Crop", "pool_output_size"]

_POOL = caffe_pb2.PoolingParameter


def _pair(param, field: str, h_field: str, w_field: str, default: int) -> Tuple[int, int]:
    """Caffe's rule for a 2-D conv setting given either as ``field`` (0, 1 or 2 values) or as
    ``field_h``/``field_w`` (then ``field`` must be empty; a missing one reads as its proto
    default, 0, which the caller's positivity checks refuse for kernels and strides)."""
    values = list(getattr(param, field))
    if param.HasField(h_field) or param.HasField(w_field):
        if values:
            raise ValueError(f"either {field} or {h_field}/{w_field} should be specified; not both")
        return getattr(param, h_field), getattr(param, w_field)
    if len(values) == 0:
        return default, default
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ValueError(f"{field} has {len(values)} values; give 1 or one per spatial axis (2)")


class _ConvBase(Layer):
    """Parameter parsing shared by Convolution and Deconvolution (one convolution_param)."""

    transposed = False

    def setup(self, bottoms: List[Shape]) -> List[Shape]:
        p = self.lp.convolution_param
        if len(bottoms[0]) != 4:
            raise ValueError(f"needs N x C x H x W input, got {bottoms[0]}")
        n, c, h, w = bottoms[0]
        if p.axis not in (1, -3):
            raise ValueError(f"only channel axis 1 is supported (axis: {p.axis})")
        if not p.HasField("num_output") or p.num_output == 0:
            raise ValueError("num_output must be set and positive")
        if len(p.kernel_size) == 0 and not (p.HasField("kernel_h") or p.HasField("kernel_w")):
            raise ValueError("kernel_size (or kernel_h and kernel_w) must be set")
        self.kernel = _pair(p, "kernel_size", "kernel_h", "kernel_w", 0)
        self.stride = _pair(p, "stride", "stride_h", "stride_w", 1)
        self.pad = _pair(p, "pad", "pad_h", "pad_w", 0)
        if len(p.dilation) > 2:
            raise ValueError(f"dilation has {len(p.dilation)} values; give 1 or 2")
        self.dilation = (tuple(p.dilation) * 2)[:2] if len(p.dilation) else (1, 1)
        if min(self.kernel) <= 0 or min(self.stride) <= 0 or min(self.dilation) <= 0:
            raise ValueError(f"kernel {self.kernel}, stride {self.stride} and dilation "
                             f"{self.dilation} must be positive")
        self.group = p.group
        self.num_output = p.num_output
        if self.group == 0 or c % self.group or self.num_output % self.group:
            raise ValueError(f"group {self.group} must divide the input channels ({c}) and "
                             f"num_output ({self.num_output})")
        self.in_channels = c
        out_hw = [self._out_size(size, i) for i, size in enumerate((h, w))]
        if min(out_hw) <= 0:
            raise ValueError(f"input {h}x{w} is too small for kernel {self.kernel}, stride "
                             f"{self.stride}, pad {self.pad}, dilation {self.dilation}")
        weight_shape = ((c, self.num_output // self.group) if self.transposed
                        else (self.num_output, c // self.group)) + self.kernel
        self.add_blob(weight_shape, p.weight_filler if p.HasField("weight_filler") else None)
        if p.bias_term:
            self.add_blob((self.num_output,), p.bias_filler if p.HasField("bias_filler") else None)
        return [(n, self.num_output, *out_hw)]

    def _effective_kernel(self, axis: int) -> int:
        return self.dilation[axis] * (self.kernel[axis] - 1) + 1

    def macs(self) -> int:
        """Every input-output channel pair of a group meets once per kernel tap and position:
        at the output positions for a convolution, at the input positions for a deconvolution."""
        n, c, h, w = self.bottom_shapes[0]
        _, co, ho, wo = self.top_shapes[0]
        positions = h * w if self.transposed else ho * wo
        return n * positions * c * co // self.group * self.kernel[0] * self.kernel[1]


@register
class Convolution(_ConvBase):
    """2-D convolution: ``out = (in + 2 pad - (dilation (k - 1) + 1)) // stride + 1`` per axis.
    Weights ``[num_output, C/group, kh, kw]``; bias ``[num_output]``."""

    caffe_type = "Convolution"

    def _out_size(self, size: int, axis: int) -> int:
        return (size + 2 * self.pad[axis] - self._effective_kernel(axis)) // self.stride[axis] + 1

    def forward(self, x):
        bias = self.blobs[1] if len(self.blobs) > 1 else None
        return F.conv2d(x, self.blobs[0], bias, self.stride, self.pad, self.dilation, self.group)


@register
class Deconvolution(_ConvBase):
    """Transposed convolution: ``out = stride (in - 1) + dilation (k - 1) + 1 - 2 pad``; no
    output padding (Caffe has none). Weights ``[C, num_output/group, kh, kw]``."""

    caffe_type = "Deconvolution"
    transposed = True

    def _out_size(self, size: int, axis: int) -> int:
        return self.stride[axis] * (size - 1) + self._effective_kernel(axis) - 2 * self.pad[axis]

    def forward(self, x):
        bias = self.blobs[1] if len(self.blobs) > 1 else None
        return F.conv_transpose2d(x, self.blobs[0], bias, self.stride, self.pad, 0, self.group,
                                  self.dilation)


def pool_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Caffe's pooled size: ceil rounding, minus one when the last window would start inside
    the padding only (this correction applies only when ``pad > 0``)."""
    out = int(math.ceil((size + 2 * pad - kernel) / stride)) + 1
    if pad > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _torch_ceil_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """The size torch's ceil_mode pooling gives (it always applies the last-window correction)."""
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    if (out - 1) * stride >= size + pad:
        out -= 1
    return out


@register
class Pooling(Layer):
    """MAX / AVE pooling with Caffe's ceil rounding, clipping rule and AVE border divisor
    (padding cells inside ``[-pad, H + pad)`` count in the divisor, ceil overhang does not)."""

    caffe_type = "Pooling"

    def setup(self, bottoms: List[Shape]) -> List[Shape]:
        p = self.lp.pooling_param
        if len(bottoms[0]) != 4:
            raise ValueError(f"needs N x C x H x W input, got {bottoms[0]}")
        n, c, h, w = bottoms[0]
        if p.pool not in (_POOL.MAX, _POOL.AVE):
            raise ValueError(f"pool method {_POOL.PoolMethod.Name(p.pool)} is not supported "
                             "(MAX and AVE are)")
        self.method = p.pool
        has_kernel = p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w")
        if p.global_pooling:
            if has_kernel:
                raise ValueError("with global_pooling: true the kernel size cannot be given")
            self.kernel = (h, w)
        else:
            if p.HasField("kernel_size") == (p.HasField("kernel_h") and p.HasField("kernel_w")):
                raise ValueError("give kernel_size or both kernel_h and kernel_w (not both)")
            self.kernel = ((p.kernel_size, p.kernel_size) if p.HasField("kernel_size")
                           else (p.kernel_h, p.kernel_w))
        self.pad = self._hw(p, "pad", 0)
        self.stride = self._hw(p, "stride", 1)
        if min(self.kernel) <= 0 or min(self.stride) <= 0:
            raise ValueError(f"kernel {self.kernel} and stride {self.stride} must be positive")
        if p.global_pooling and (self.pad != (0, 0) or self.stride != (1, 1)):
            raise ValueError("with global_pooling: true only pad 0 and stride 1 are allowed")
        if self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]:
            raise ValueError(f"pad {self.pad} must be smaller than the kernel {self.kernel}")
        self.out_hw = tuple(pool_output_size(size, k, s, pd) for size, k, s, pd
                            in zip((h, w), self.kernel, self.stride, self.pad))
        torch_hw = tuple(_torch_ceil_size(size, k, s, pd) for size, k, s, pd
                         in zip((h, w), self.kernel, self.stride, self.pad))
        # torch's own ceil_mode pooling is exact whenever it produces Caffe's size and its padding
        # limit (pad <= kernel / 2) holds; otherwise pad explicitly and, for AVE, divide by
        # Caffe's divisor map.
        self.native = torch_hw == self.out_hw and all(2 * pd <= k for pd, k in zip(self.pad, self.kernel))
        if not self.native:
            self.register_buffer("divisor", self._ave_divisor(h, w), persistent=False)
        return [(n, c, *self.out_hw)]

    @staticmethod
    def _hw(p, field: str, default: int) -> Tuple[int, int]:
        has_h, has_w = p.HasField(f"{field}_h"), p.HasField(f"{field}_w")
        if has_h or has_w:
            if p.HasField(field) or not (has_h and has_w):
                raise ValueError(f"give {field} or both {field}_h and {field}_w")
            return getattr(p, f"{field}_h"), getattr(p, f"{field}_w")
        value = getattr(p, field) if p.HasField(field) else default
        return value, value

    def _ave_divisor(self, h: int, w: int) -> torch.Tensor:
        """Per-output-cell AVE divisor, Caffe's ``(he - hs) * (we - ws)`` before clipping."""
        sizes = []
        for size, k, s, pd, out in zip((h, w), self.kernel, self.stride, self.pad, self.out_hw):
            start = torch.arange(out) * s - pd
            sizes.append((torch.clamp(start + k, max=size + pd) - start).float())
        return (sizes[0][:, None] * sizes[1][None, :]).to(self.device_for_blobs)

    def forward(self, x):
        if self.native:
            if self.method == _POOL.MAX:
                return F.max_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=True)
            return F.avg_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=True,
                                count_include_pad=True)
        (ph, pw), (kh, kw), (sh, sw) = self.pad, self.kernel, self.stride
        extra_h = max(0, (self.out_hw[0] - 1) * sh + kh - x.shape[2] - ph)
        extra_w = max(0, (self.out_hw[1] - 1) * sw + kw - x.shape[3] - pw)
        if self.method == _POOL.MAX:
            padded = F.pad(x, (pw, extra_w, ph, extra_h), value=-torch.finfo(torch.float32).max)  # -FLT_MAX, as Caffe
            return F.max_pool2d(padded, self.kernel, self.stride)
        padded = F.pad(x, (pw, extra_w, ph, extra_h))
        sums = F.avg_pool2d(padded, self.kernel, self.stride, divisor_override=1)
        return sums / self.divisor.to(x.dtype)


@register
class Crop(Layer):
    """Crop bottom 0 to bottom 1's size on axes ``axis..``; ``offset`` gives the start per axis."""

    caffe_type = "Crop"
    num_bottoms = (2, 2)

    def setup(self, bottoms: List[Shape]) -> List[Shape]:
        data, ref = bottoms
        if len(data) != len(ref):
            raise ValueError(f"bottoms have different numbers of axes: {data} and {ref}")
        p = self.lp.crop_param
        axis = canonical_axis(p.axis, len(data))
        cropped = len(data) - axis
        offsets = list(p.offset)
        if len(offsets) not in (0, 1, cropped):
            raise ValueError(f"crop_param.offset has {len(offsets)} values; give 0, 1 or {cropped}")
        if len(offsets) <= 1:
            offsets = [offsets[0] if offsets else 0] * cropped
        top = list(data)
        self.slices = [slice(None)] * len(data)
        for i in range(axis, len(data)):
            offset, size = offsets[i - axis], ref[i]
            if data[i] - offset < size:
                raise ValueError(f"cannot crop axis {i}: bottom '{self.lp.bottom[0]}' {format_shape(data)} "
                                 f"with offset {offset} is smaller than bottom '{self.lp.bottom[1]}' "
                                 f"{format_shape(ref)}")
            top[i] = size
            self.slices[i] = slice(offset, offset + size)
        self.slices = tuple(self.slices)
        return [tuple(top)]

    def forward(self, x, reference):
        return x[self.slices]
