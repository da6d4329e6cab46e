"""SR-TOD's layer types (Cao et al., "Visible and Clear: Finding Tiny Objects in Difference Map",
ECCV 2024; docs/srtod.md, and docs/decisions.md "SR-TOD self-reconstruction head").

* :class:`DenormalizeImage` — the data blob back to the ``[0, 1]`` image the head reconstructs;
* :class:`DifferenceMap` — Eq. 3, the channel mean of ``|reconstruction − image|``;
* :class:`DGFE` — Eq. 4–6, the difference-map guided feature enhancement;
* :class:`MSELoss` — the reconstruction loss (mean over all elements, as the official code).

The reconstruction head itself is stock layers (Deconvolution, Convolution, ReLU, Sigmoid,
Crop); :mod:`deeper_ssd.builder.heads` wires the whole head onto a zoo model.

Gradients follow the official code (github Hiyuur/SR-TOD): the reconstruction is trained by the
reconstruction loss alone — DGFE passes no gradient to its difference-map bottom — and the
threshold ``t`` of DGFE receives the zero gradient of ``torch.sign`` (so only weight decay moves
it) unless ``threshold_gradient: STRAIGHT_THROUGH`` asks for a surrogate. docs/decisions.md
records each choice the paper leaves open.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .base import Layer, Shape, format_shape
from .registry import register

__all__ = ["DenormalizeImage", "DifferenceMap", "DGFE", "MSELoss"]

_DIFF = caffe_pb2.DifferenceMapParameter
_DGFE = caffe_pb2.DGFEParameter
_MSE = caffe_pb2.MSELossParameter


def _describe(layer: Layer, bottoms: List[Shape]) -> str:
    return ", ".join(f"'{name}' {format_shape(shape)}" for name, shape in zip(layer.lp.bottom, bottoms))


def _same_4d(layer: Layer, bottoms: List[Shape], hint: str) -> Shape:
    first, second = bottoms
    if len(first) != 4 or first != second:
        raise layer.error(f"needs two N x C x H x W bottoms of one shape{hint}: {_describe(layer, bottoms)}")
    return first


@register
class DenormalizeImage(Layer):
    """The SSD data blob (BGR, mean-subtracted, multiplied by ``scale``) back to an image in
    ``[0, 1]``: ``top[:, c] = (bottom[:, k] / scale + mean_value[k]) · output_scale`` with
    ``k = C − 1 − c`` under ``bgr_to_rgb`` (the official code's target is RGB / 255).

    Bottom and top ``N x C x H x W``; ``mean_value`` holds 1 or C values (none: 0), the data
    layer's own ``transform_param`` values. The map is linear; autograd differentiates it.
    """

    caffe_type = "DenormalizeImage"

    def setup(self, bottoms):
        shape = bottoms[0]
        if len(shape) != 4:
            raise ValueError(f"needs an N x C x H x W bottom, got {format_shape(shape)}")
        p = self.lp.denormalize_image_param
        channels = shape[1]
        mean = list(p.mean_value)
        if len(mean) not in (0, 1, channels):
            raise ValueError(f"mean_value has {len(mean)} values for {channels} channels; give 1 or "
                             f"{channels} (none: 0), as the data layer's transform_param")
        if p.scale == 0:
            raise ValueError("scale must not be 0 (it is the data layer's transform_param.scale)")
        mean = mean * channels if len(mean) == 1 else (mean or [0.0] * channels)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32,
                                                  device=self.device_for_blobs).view(1, -1, 1, 1),
                             persistent=False)
        self.scale, self.output_scale, self.reverse = p.scale, p.output_scale, p.bgr_to_rgb
        return [shape]

    def forward(self, x):
        image = (x / self.scale + self.mean.to(x.dtype)) * self.output_scale
        return image.flip(1) if self.reverse else image


@register
class DifferenceMap(Layer):
    """Eq. 3: bottoms reconstruction and image (``N x C x H x W``, one shape: crop the
    reconstruction first), top ``N x 1 x H x W`` = mean over channels of ``|recon − image|``
    (the official code's ``sum(|r − img|, dim=1) / 3``).

    ``mode: HIGH_FREQ`` (the paper's HFD ablation, whose filter it does not give) takes the
    difference of the images' high-frequency parts instead: an ideal high-pass on the 2-D DFT
    removing every frequency of radius ``sqrt(fy² + fx²) <= cutoff`` (cycles per pixel). The
    filter is linear, so it is applied once to the difference. Autograd differentiates both
    modes (``sign(·)/C`` per element in PIXEL); in an SR-TOD net the map's only reader, DGFE,
    sends nothing back.
    """

    caffe_type = "DifferenceMap"
    num_bottoms = (2, 2)

    def setup(self, bottoms):
        n, _, h, w = _same_4d(self, bottoms, " (crop the reconstruction to the image first)")
        p = self.lp.difference_map_param
        self.high_freq = p.mode == _DIFF.HIGH_FREQ
        if self.high_freq:
            if not 0 < p.cutoff <= 0.5:
                raise ValueError(f"mode HIGH_FREQ needs cutoff in (0, 0.5] cycles per pixel, got "
                                 f"{p.cutoff} (the paper gives no filter: set it explicitly)")
            fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
            fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
            keep = (fy * fy + fx * fx > p.cutoff * p.cutoff).to(torch.float32)
            self.register_buffer("keep", keep.to(self.device_for_blobs), persistent=False)
        return [(n, 1, h, w)]

    def forward(self, recon, image):
        diff = recon - image
        if self.high_freq:
            spectrum = torch.fft.rfft2(diff) * self.keep.to(diff.dtype)
            diff = torch.fft.irfft2(spectrum, s=diff.shape[-2:])
        return diff.abs().mean(dim=1, keepdim=True)


class _StraightThroughStep(torch.autograd.Function):
    """``(sign(d − t) + 1) / 2`` whose derivative in ``t`` is taken as that of the ramp
    ``clamp((d − t + w) / 2w, 0, 1)``: ``−1/(2w)`` where ``|d − t| < w``, 0 elsewhere. ``d``
    gets no gradient."""

    @staticmethod
    def forward(ctx, d, t, width):
        z = d - t
        ctx.save_for_backward(z)
        ctx.width, ctx.t_shape = width, t.shape
        return (torch.sign(z) + 1) * 0.5

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        window = (z.abs() < ctx.width).to(g.dtype)
        grad_t = -(g * window).sum() / (2 * ctx.width)
        return None, grad_t.reshape(ctx.t_shape), None


@register
class DGFE(Layer):
    """Difference-map guided feature enhancement, Eq. 4–6, as the official code.

    Bottoms: feature ``P`` (``N x C x h x w``), difference map ``D`` (``N x 1 x H x W``, in
    ``[0, 1]`` image units). Top ``P'`` (``N x C x h x w``):

    * filtration ``M = (sign(D − t) + 1) / 2`` ∈ {0, ½, 1}, resized to ``h x w``: NEAREST takes
      ``M[floor(i·H/h), floor(j·W/w)]`` (PyTorch's legacy nearest, what the code calls), MAX the
      maximum over the cell's block (adaptive max pooling);
    * reweighting ``s = σ(MLP(mean_hw P) + MLP(max_hw P))`` (``N x C``), one MLP
      ``W2·relu(W1·v + b1) + b2`` with ``C/r`` hidden units shared by both poolings;
    * ``P' = P·s·R + P·s·mask_offset`` (``mask_offset`` is Eq. 4's "+ 1").

    Blobs (Caffe order): ``W1`` (C/r × C), ``b1`` (C/r), ``W2`` (C × C/r), ``b2`` (C) — the biases
    only with ``bias_term`` — then the threshold ``t`` (1), filled with ``initial_threshold``;
    ``param { lr_mult decay_mult }`` applies to it as to any blob (``lr_mult: 0`` = the paper's
    "Fixed T"). Unset fillers are PyTorch's ``nn.Linear`` default, ``U(±1/sqrt(fan_in))``.

    Backward: to ``P`` (directly and through ``s``) and to the MLP blobs; never to ``D``. ``t``
    gets ``torch.sign``'s zero gradient (``threshold_gradient: ZERO``, the official code) or the
    straight-through ramp gradient of half-width ``ste_width`` (:class:`_StraightThroughStep`).
    """

    caffe_type = "DGFE"
    num_bottoms = (2, 2)

    def setup(self, bottoms):
        feature, diff = bottoms
        if len(feature) != 4 or len(diff) != 4 or diff[1] != 1 or diff[0] != feature[0]:
            raise self.error("needs a feature N x C x h x w and a difference map N x 1 x H x W of the "
                             f"same batch: {_describe(self, bottoms)}")
        p = self.lp.dgfe_param
        channels = feature[1]
        if p.reduction_ratio == 0 or channels // p.reduction_ratio == 0:
            raise ValueError(f"reduction_ratio {p.reduction_ratio} leaves no hidden unit for "
                             f"{channels} channels (needs 1 <= reduction_ratio <= {channels})")
        if p.threshold_gradient == _DGFE.STRAIGHT_THROUGH and not p.ste_width > 0:
            raise ValueError(f"ste_width must be positive, got {p.ste_width}")
        hidden = channels // p.reduction_ratio
        self.hidden, self.bias_term = hidden, p.bias_term
        self.straight_through = p.threshold_gradient == _DGFE.STRAIGHT_THROUGH
        self.ste_width, self.mask_offset = p.ste_width, p.mask_offset
        self.resize_max = p.resize == _DGFE.MAX
        self.out_hw = tuple(feature[2:])
        for rows, cols in ((hidden, channels), (channels, hidden)):
            self.add_blob((rows, cols), self._filler(p, "weight_filler", cols))
            if self.bias_term:
                self.add_blob((rows,), self._filler(p, "bias_filler", cols))
        self.add_blob((1,), caffe_pb2.FillerParameter(type="constant", value=p.initial_threshold))
        return [feature]

    @staticmethod
    def _filler(p, field: str, fan_in: int) -> caffe_pb2.FillerParameter:
        if p.HasField(field):
            return getattr(p, field)
        bound = 1.0 / math.sqrt(fan_in)
        return caffe_pb2.FillerParameter(type="uniform", min=-bound, max=bound)

    def macs(self) -> int:
        """Two MLP passes per image, plus the three products per output element."""
        n, c, h, w = self.bottom_shapes[0]
        return n * (2 * 2 * c * self.hidden + 3 * c * h * w)

    def _mlp(self, v):
        if self.bias_term:
            w1, b1, w2, b2 = (self.blobs[i] for i in range(4))
        else:
            (w1, w2), b1, b2 = (self.blobs[0], self.blobs[1]), None, None
        return F.linear(F.relu(F.linear(v, w1, b1)), w2, b2)

    def forward(self, p, d):
        t = self.blobs[-1]
        d = d.detach()
        if self.straight_through:
            mask = _StraightThroughStep.apply(d, t, self.ste_width)
        else:
            mask = (torch.sign(d - t) + 1) * 0.5
        if self.resize_max:
            resized = F.adaptive_max_pool2d(mask, self.out_hw)
        else:
            resized = F.interpolate(mask, size=self.out_hw, mode="nearest")
        n = p.shape[0]
        pooled = torch.cat([p.mean(dim=(2, 3)), p.flatten(2).max(dim=2).values])
        attention = self._mlp(pooled)
        scale = torch.sigmoid(attention[:n] + attention[n:])[:, :, None, None]
        out = p * scale
        return out * resized.to(out.dtype) + out * self.mask_offset


@register
class MSELoss(Layer):
    """The reconstruction loss: ``sum((prediction − target)²) / norm`` with ``norm`` the element
    count ``N·C·H·W`` (``normalization: ALL``, torch's ``reduction='mean'``, the official code) or
    the batch size ``N`` (``BATCH``). Not Caffe's EuclideanLoss (``1/2N``). Bottoms of one shape,
    top a scalar weighted 1 by default; the builder sets ``propagate_down: [true, false]``."""

    caffe_type = "MSELoss"
    num_bottoms = (2, 2)
    is_loss = True

    def setup(self, bottoms):
        if bottoms[0] != bottoms[1] or not bottoms[0]:
            raise self.error(f"needs two bottoms of one shape: {_describe(self, bottoms)}")
        self.per_batch = self.lp.mse_loss_param.normalization == _MSE.BATCH
        return [()]

    def forward(self, prediction, target):
        if self.per_batch:
            return F.mse_loss(prediction, target, reduction="sum") / prediction.shape[0]
        return F.mse_loss(prediction, target)
