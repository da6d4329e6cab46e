"""SSD detection layers with the semantics of Wei Liu's Caffe fork (branch ``ssd``):
PriorBox, DetectionOutput, MultiBoxLoss, DetectionEvaluate.

Blob layouts (caffe-ssd-semantics.md §3.2), ``K`` priors, ``C`` classes, batch ``N``:

* PriorBox top ``1 x 2 x 4K``: channel 0 the prior corners ``[xmin, ymin, xmax, ymax]``
  normalised by the input image size, channel 1 the four variances of every prior.
* ``mbox_loc`` ``N x 4K`` (``N x 4KC`` with ``share_location: false``), ``mbox_conf``
  ``N x KC`` (logits for the loss, probabilities for DetectionOutput).
* label blob ``1 x 1 x G x 8``: rows ``[item, label, instance, xmin, ymin, xmax, ymax,
  difficult]`` in normalised coordinates (one row of -1 when the batch has no object).
* detections ``1 x 1 x D x 7``: rows ``[image, label, score, xmin, ymin, xmax, ymax]``.
* evaluation rows ``1 x 1 x R x 5`` (see :class:`DetectionEvaluate`).

The box math (IoU, coding, matching, mining, NMS) lives in :mod:`deeper_ssd.box`.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..proto import caffe_pb2
from .base import Layer, Shape, count, format_shape
from .registry import register

_PB = caffe_pb2.PriorBoxParameter
_MBL = caffe_pb2.MultiBoxLossParameter
_LOSS = caffe_pb2.LossParameter


def _legacy_dim(shape: Shape, index: int) -> int:
    """Caffe's LegacyShape: num/channels/height/width of a blob with up to 4 axes (missing = 1)."""
    if index >= len(shape):
        return 1
    return shape[index]


# ---------------------------------------------------------------------------------------------
# PriorBox

@register
class PriorBox(Layer):
    """Default boxes of one feature map (caffe-ssd-semantics.md §3.1).

    Bottoms: the feature map ``N x C x H x W`` and the input image ``N x 3 x img_h x img_w``
    (its size is used unless ``img_size``/``img_h``/``img_w`` are given). Top ``1 x 2 x HWP4``.

    Caffe's quirks kept here: ``min_size``/``max_size`` are truncated to integers before use; the
    per-cell order is ``min``, ``sqrt(min*max)``, then one box per non-unit ratio of the internal
    list ``[1, a1, 1/a1, a2, 1/a2, ...]`` (a ratio within 1e-6 of a listed one is skipped);
    cell centres and box sides are float32, the corner arithmetic is double, rounded to the
    output dtype at the end; ``clip`` clamps to [0, 1] after generation.
    """

    caffe_type = "PriorBox"
    num_bottoms = (2, 2)

    def setup(self, bottoms):
        p = self.lp.prior_box_param
        feature, image = bottoms
        if len(feature) != 4 or len(image) != 4:
            raise ValueError(f"bottoms must be 4-D (feature map, image); got "
                             f"{format_shape(feature)} and {format_shape(image)}")
        if not len(p.min_size):
            raise ValueError("must provide min_size")
        if any(not s > 0 for s in p.min_size):
            raise ValueError(f"min_size must be positive, got {list(p.min_size)}")
        self.min_sizes = [float(s) for s in p.min_size]
        ratios = [1.0]
        for ar in p.aspect_ratio:
            ar = float(np.float32(ar))
            if any(abs(ar - r) < 1e-6 for r in ratios):
                continue
            ratios.append(ar)
            if p.flip:
                ratios.append(float(np.float32(1.0 / ar)))
        self.aspect_ratios = ratios
        self.max_sizes: List[float] = []
        if len(p.max_size):
            if len(p.max_size) != len(p.min_size):
                raise ValueError(f"{len(p.max_size)} max_size for {len(p.min_size)} min_size; "
                                 f"give one per min_size")
            for mn, mx in zip(p.min_size, p.max_size):
                if not mx > mn:
                    raise ValueError(f"max_size {mx} must be greater than min_size {mn}")
            self.max_sizes = [float(s) for s in p.max_size]
        self.num_priors = len(ratios) * len(self.min_sizes) + len(self.max_sizes)
        if len(p.variance) > 1:
            if len(p.variance) != 4:
                raise ValueError(f"variance needs 1 or 4 values, got {len(p.variance)}")
        if any(not v > 0 for v in p.variance):
            raise ValueError(f"variance must be positive, got {list(p.variance)}")
        self.variance = [float(v) for v in p.variance] if len(p.variance) else [0.1]
        if p.HasField("img_h") or p.HasField("img_w"):
            if p.HasField("img_size"):
                raise ValueError("either img_size or img_h/img_w should be specified; not both")
            if not (p.img_h > 0 and p.img_w > 0):
                raise ValueError(f"img_h ({p.img_h}) and img_w ({p.img_w}) must both be > 0")
            self.img_hw: Optional[Tuple[int, int]] = (p.img_h, p.img_w)
        elif p.HasField("img_size"):
            if not p.img_size > 0:
                raise ValueError("img_size should be larger than 0")
            self.img_hw = (p.img_size, p.img_size)
        else:
            self.img_hw = None
        if p.HasField("step_h") or p.HasField("step_w"):
            if p.HasField("step"):
                raise ValueError("either step or step_h/step_w should be specified; not both")
            if not (p.step_h > 0 and p.step_w > 0):
                raise ValueError(f"step_h ({p.step_h}) and step_w ({p.step_w}) must both be > 0")
            self.step_hw: Optional[Tuple[float, float]] = (p.step_h, p.step_w)
        elif p.HasField("step"):
            if not p.step > 0:
                raise ValueError("step should be larger than 0")
            self.step_hw = (p.step, p.step)
        else:
            self.step_hw = None
        self.offset = p.offset
        self.clip = p.clip
        self._box_sides = self._cell_box_sides()
        dim = feature[2] * feature[3] * self.num_priors * 4
        if dim <= 0:
            raise ValueError(f"feature map {format_shape(feature)} gives no prior")
        return [(1, 2, dim)]

    def _cell_box_sides(self) -> np.ndarray:
        """``P x 2`` float32 (width, height) of the boxes of one cell, in input pixels, in
        emission order; sizes truncated to int as Caffe does."""
        sides = []
        for s, raw_min in enumerate(self.min_sizes):
            mn = int(raw_min)
            sides.append((mn, mn))
            if self.max_sizes:
                mx = int(self.max_sizes[s])
                side = math.sqrt(mn * mx)                   # integer product, double sqrt
                sides.append((side, side))
            for ar in self.aspect_ratios:
                if abs(ar - 1.0) < 1e-6:
                    continue
                root = np.sqrt(np.float32(ar))             # float sqrt
                sides.append((np.float32(mn) * root, np.float32(mn) / root))
        return np.asarray(sides, dtype=np.float32)

    def priors(self, layer_hw: Tuple[int, int], img_hw: Tuple[int, int],
               dtype=torch.float32, device=None) -> torch.Tensor:
        """The top blob ``1 x 2 x (H W P 4)`` for a ``layer_hw`` feature map and ``img_hw`` input."""
        layer_h, layer_w = layer_hw
        img_h, img_w = self.img_hw or img_hw
        if self.step_hw is not None:
            step_h, step_w = (np.float32(s) for s in self.step_hw)
        else:
            step_h = np.float32(np.float32(img_h) / np.float32(layer_h))
            step_w = np.float32(np.float32(img_w) / np.float32(layer_w))
        offset = np.float32(self.offset)
        f32 = dict(dtype=torch.float32, device=device)
        cx = (torch.arange(layer_w, **f32) + float(offset)) * float(step_w)      # float32
        cy = (torch.arange(layer_h, **f32) + float(offset)) * float(step_h)
        sides = torch.as_tensor(self._box_sides, device=device).double()        # P x 2
        half_w, half_h = sides[:, 0] / 2.0, sides[:, 1] / 2.0
        cxd = cx.double().view(1, layer_w, 1)
        cyd = cy.double().view(layer_h, 1, 1)
        shape = (layer_h, layer_w, len(self._box_sides))
        boxes = torch.stack([((cxd - half_w) / img_w).expand(shape),
                             ((cyd - half_h) / img_h).expand(shape),
                             ((cxd + half_w) / img_w).expand(shape),
                             ((cyd + half_h) / img_h).expand(shape)], dim=-1).reshape(-1)
        boxes = boxes.to(dtype)
        if self.clip:
            boxes = boxes.clamp(0.0, 1.0)
        variances = torch.tensor((self.variance * 4)[:4], dtype=dtype, device=device)
        variances = variances.repeat(boxes.numel() // 4)
        return torch.stack([boxes, variances]).unsqueeze(0)

    def forward(self, feature, image):
        return self.priors(tuple(feature.shape[2:]), tuple(image.shape[2:]), feature.dtype,
                           feature.device)


# ---------------------------------------------------------------------------------------------
# shared checks of the detection layers

def _check_heads(layer: Layer, bottoms: Sequence[Shape], num_classes: int, loc_classes: int) -> int:
    """Validate ``mbox_loc``, ``mbox_conf`` and ``mbox_priorbox`` shapes; return the prior count."""
    loc, conf, prior = bottoms[:3]
    if len(prior) != 3 or prior[0] != 1 or prior[1] != 2 or prior[2] % 4:
        raise ValueError(f"prior bottom '{layer.lp.bottom[2]}' must be 1x2x(4*priors), got "
                         f"{format_shape(prior)}")
    num_priors = prior[2] // 4
    if loc[0] != conf[0]:
        raise ValueError(f"loc and conf bottoms disagree on the batch size: "
                         f"{format_shape(loc)} vs {format_shape(conf)}")
    for name, shape, per_prior in ((layer.lp.bottom[0], loc, 4 * loc_classes),
                                   (layer.lp.bottom[1], conf, num_classes)):
        if _legacy_dim(shape, 1) != num_priors * per_prior or count(shape, 1) != num_priors * per_prior:
            raise ValueError(f"bottom '{name}' {format_shape(shape)} must be N x "
                             f"{num_priors * per_prior} ({num_priors} priors x {per_prior})")
    return num_priors


def _check_label_blob(layer: Layer, shape: Shape, index: int) -> None:
    """The SSD label blob is ``1 x 1 x G x 8`` (G may be dynamic)."""
    if len(shape) != 4 or shape[0] not in (1, -1) or shape[1] not in (1, -1) or shape[3] not in (8, -1):
        raise ValueError(f"label bottom '{layer.lp.bottom[index]}' must be 1x1xGx8 rows "
                         f"[item, label, instance, xmin, ymin, xmax, ymax, difficult], got "
                         f"{format_shape(shape)}")


def _nms_settings(layer: Layer, nms: caffe_pb2.NonMaximumSuppressionParameter):
    if not nms.nms_threshold >= 0:
        raise ValueError(f"nms_threshold must be non negative, got {nms.nms_threshold}")
    if not 0 < nms.eta <= 1:
        raise ValueError(f"nms_param.eta must be in (0, 1], got {nms.eta}")


# ---------------------------------------------------------------------------------------------
# DetectionOutput

@register
class DetectionOutput(Layer):
    """Decode, per-class NMS and keep_top_k (caffe-ssd-semantics.md §3.7). See :meth:`forward`."""

    caffe_type = "DetectionOutput"
    num_bottoms = (3, 4)

    def setup(self, bottoms):
        p = self.lp.detection_output_param
        if not p.HasField("num_classes"):
            raise ValueError("must specify num_classes")
        self.num_classes = p.num_classes
        if self.num_classes < 1:
            raise ValueError("num_classes must be at least 1")
        self.share_location = p.share_location
        self.loc_classes = 1 if self.share_location else self.num_classes
        self.background_label_id = p.background_label_id
        self.code_type = p.code_type
        self.variance_encoded_in_target = p.variance_encoded_in_target
        self.keep_top_k = p.keep_top_k
        self.confidence_threshold = (p.confidence_threshold if p.HasField("confidence_threshold")
                                     else -float(np.finfo(np.float32).max))
        _nms_settings(self, p.nms_param)
        self.nms_threshold = p.nms_param.nms_threshold
        self.eta = p.nms_param.eta
        self.top_k = p.nms_param.top_k if p.nms_param.HasField("top_k") else -1
        if p.visualize:
            raise ValueError("visualize: true is not supported (Caffe opens an interactive OpenCV "
                             "window on a fourth 'data' bottom); draw detections with "
                             "`deeper-ssd detect` instead")
        self.num_priors = _check_heads(self, bottoms, self.num_classes, self.loc_classes)
        return [(1, 1, -1, 7)]


# ---------------------------------------------------------------------------------------------
# MultiBoxLoss

@register
class MultiBoxLoss(Layer):
    """SSD's training loss (caffe-ssd-semantics.md §3.5-3.6). See :meth:`forward`."""

    caffe_type = "MultiBoxLoss"
    num_bottoms = (4, 4)
    is_loss = True

    def setup(self, bottoms):
        p = self.lp.multibox_loss_param
        if not p.HasField("num_classes"):
            raise ValueError("must provide num_classes")
        self.num_classes = p.num_classes
        if self.num_classes < 1:
            raise ValueError("num_classes should not be less than 1")
        self.param = p
        self.share_location = p.share_location
        self.loc_classes = 1 if self.share_location else self.num_classes
        self.background_label_id = p.background_label_id
        self.mining_type = p.mining_type
        if p.HasField("do_neg_mining") and p.do_neg_mining != (p.mining_type != _MBL.NONE):
            raise ValueError(f"do_neg_mining: {str(p.do_neg_mining).lower()} contradicts mining_type "
                             f"{_MBL.MiningType.Name(p.mining_type)} (do_neg_mining is deprecated)")
        if self.mining_type != _MBL.NONE and not self.share_location:
            raise ValueError("negative mining needs share_location: true (as in Caffe)")
        if self.mining_type == _MBL.HARD_EXAMPLE and p.sample_size <= 0:
            raise ValueError(f"sample_size must be > 0 for HARD_EXAMPLE mining, got {p.sample_size}")
        if p.HasField("nms_param"):
            _nms_settings(self, p.nms_param)
        if p.conf_loss_type == _MBL.SOFTMAX and not self.background_label_id < self.num_classes:
            raise ValueError(f"background_label_id {self.background_label_id} must be within "
                             f"[0, num_classes={self.num_classes}) for SOFTMAX")
        if p.map_object_to_agnostic and self.num_classes != 2:
            raise ValueError("map_object_to_agnostic needs num_classes: 2 (background + object)")
        lp = self.lp.loss_param
        if not lp.HasField("normalization") and lp.HasField("normalize"):
            self.normalization = _LOSS.VALID if lp.normalize else _LOSS.BATCH_SIZE
        else:
            self.normalization = lp.normalization
        pd = list(self.lp.propagate_down)
        if pd and len(pd) != 4:
            raise ValueError(f"propagate_down needs 4 values (one per bottom), got {len(pd)}")
        pd = pd or [True, True, False, False]
        if pd[2] or pd[3]:
            raise ValueError("cannot back-propagate to the prior or label bottoms "
                             "(propagate_down must be false for bottoms 2 and 3)")
        self.use_loc, self.use_conf = bool(pd[0]), bool(pd[1])
        self.num_priors = _check_heads(self, bottoms, self.num_classes, self.loc_classes)
        _check_label_blob(self, bottoms[3], 3)
        return [()]


# ---------------------------------------------------------------------------------------------
# DetectionEvaluate

@register
class DetectionEvaluate(Layer):
    """Per-class positive counts and tp/fp flags of every detection (§3.8). See :meth:`forward`."""

    caffe_type = "DetectionEvaluate"
    num_bottoms = (2, 2)

    def setup(self, bottoms):
        p = self.lp.detection_evaluate_param
        if not p.HasField("num_classes"):
            raise ValueError("must provide num_classes")
        self.num_classes = p.num_classes
        self.background_label_id = p.background_label_id
        if not self.background_label_id < self.num_classes:
            raise ValueError(f"background_label_id {self.background_label_id} must be below "
                             f"num_classes {self.num_classes}")
        self.overlap_threshold = p.overlap_threshold
        if not self.overlap_threshold > 0:
            raise ValueError(f"overlap_threshold must be positive, got {self.overlap_threshold}")
        self.evaluate_difficult_gt = p.evaluate_difficult_gt
        self.name_size_file = p.name_size_file if p.HasField("name_size_file") else None
        self.resize_param = p.resize_param if p.HasField("resize_param") else None
        det, label = bottoms
        if len(det) != 4 or det[0] not in (1, -1) or det[1] not in (1, -1) or det[3] not in (7, -1):
            raise ValueError(f"detection bottom '{self.lp.bottom[0]}' must be 1x1xDx7, got "
                             f"{format_shape(det)}")
        _check_label_blob(self, label, 1)
        self.num_pos_classes = self.num_classes - 1
        rows = -1 if det[2] < 0 else self.num_pos_classes + det[2]
        return [(1, 1, rows, 5)]
