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

import json
import math
import os
import re
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import box, io
from ..proto import caffe_pb2
from .base import Layer, Shape, count, format_shape
from .registry import register

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


class GroundTruth(NamedTuple):
    """The objects of a label blob, padded per image: ``boxes [N, G, 4]`` float32,
    ``labels [N, G]`` int64, ``difficult [N, G]`` and ``valid [N, G]`` bool (False = padding).
    Objects keep their order of appearance in the blob."""
    boxes: torch.Tensor
    labels: torch.Tensor
    difficult: torch.Tensor
    valid: torch.Tensor


def read_ground_truth(layer: Layer, label: torch.Tensor, num_images: int, keep_difficult: bool,
                      stop_at_missing: bool = False, max_label: Optional[int] = None) -> GroundTruth:
    """Caffe's GetGroundTruth on a ``1 x 1 x G x 8`` label blob, batched.

    Rows with item -1 are skipped (``stop_at_missing``: the first one ends the list, as the
    DetectionEvaluate variant does); items are truncated to int like Caffe; difficult objects
    are dropped unless ``keep_difficult``; rows of items outside ``[0, num_images)`` are never
    looked up (Caffe ignores them too). A row with the background label is an error, and so is a
    label outside ``[0, max_label)`` when ``max_label`` is given. One host sync: the largest
    object count of an image (the padded size) and the error counts.
    """
    rows = label.detach().reshape(-1, 8)
    device = rows.device
    item = rows[:, 0].long()
    labels = rows[:, 1].long()
    present = item != -1
    if stop_at_missing:
        present &= torch.cumsum((~present).long(), 0) == 0
    difficult = rows[:, 7] != 0
    keep = present & (item >= 0) & (item < num_images)
    if not keep_difficult:
        keep &= ~difficult
    one_hot = (item.unsqueeze(1) == torch.arange(num_images, device=device)) & keep.unsqueeze(1)
    position = (torch.cumsum(one_hot.long(), 0) - 1).gather(1, item.clamp(0, max(num_images - 1, 0))
                                                           .unsqueeze(1)).squeeze(1) if num_images else item
    background = layer.background_label_id
    problems = [one_hot.sum(0).max() if num_images else torch.zeros((), dtype=torch.long, device=device),
                (present & (labels == background)).sum()]
    if max_label is not None:
        problems.append((keep & ((labels < 0) | (labels >= max_label))).sum())
    stats = torch.stack(problems).tolist()
    if stats[1]:
        raise layer.error(f"found background label {background} in the label blob "
                          f"'{layer.lp.bottom[-1]}' ({stats[1]} row(s))")
    if max_label is not None and stats[2]:
        raise layer.error(f"label blob '{layer.lp.bottom[-1]}' has {stats[2]} object(s) with a label "
                          f"outside [0, {max_label})")
    g = max(int(stats[0]), 1)                      # one padding slot keeps gathers simple
    slot = torch.where(keep, item * g + position, torch.full_like(item, num_images * g))

    def scatter(values, fill, dtype):
        out = torch.full((num_images * g + 1, *values.shape[1:]), fill, dtype=dtype, device=device)
        out[slot] = values.to(dtype)
        return out[:-1].view(num_images, g, *values.shape[1:])

    return GroundTruth(scatter(rows[:, 3:7], 0.0, torch.float32), scatter(labels, -1, torch.long),
                       scatter(difficult, False, torch.bool), scatter(keep, False, torch.bool))


def read_name_sizes(layer: Layer, path: str) -> Tuple[List[str], List[Tuple[int, int]]]:
    """Names and ``(height, width)`` of a name/size file ("name height width" per line), as
    Caffe reads it (whitespace-separated triples); an unreadable or empty file names the layer."""
    try:
        with open(path) as handle:
            words = handle.read().split()
        triples = [(words[i], int(words[i + 1]), int(words[i + 2])) for i in range(0, len(words) - 2, 3)]
    except (OSError, ValueError) as err:
        raise layer.error(f"cannot read name_size_file '{path}': {err}") from None
    if not triples:
        raise layer.error(f"name_size_file '{path}' has no 'name height width' line")
    return [name for name, _, _ in triples], [(h, w) for _, h, w in triples]


def _check_nms(nms: caffe_pb2.NonMaximumSuppressionParameter) -> None:
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
        if self.share_location and self.background_label_id == -1:
            raise ValueError("background_label_id: -1 needs share_location: false (Caffe skips the "
                             "shared boxes, whose label is -1, as background and aborts)")
        self.code_type = p.code_type
        self.variance_encoded_in_target = p.variance_encoded_in_target
        self.keep_top_k = p.keep_top_k
        self.confidence_threshold = (p.confidence_threshold if p.HasField("confidence_threshold")
                                     else -float(np.finfo(np.float32).max))
        _check_nms(p.nms_param)
        self.nms_threshold = p.nms_param.nms_threshold
        self.eta = p.nms_param.eta
        self.top_k = p.nms_param.top_k if p.nms_param.HasField("top_k") else -1
        if p.visualize:
            raise ValueError("visualize: true is not supported (Caffe opens an interactive OpenCV "
                             "window on a fourth 'data' bottom); draw detections with "
                             "`deeper-ssd detect` instead")
        self.num_priors = _check_heads(self, bottoms, self.num_classes, self.loc_classes)
        save = p.save_output_param
        self.saver = None
        if (save.output_directory and save.HasField("label_map_file") and save.label_map_file
                and save.HasField("name_size_file") and save.name_size_file):
            self.saver = ResultWriter(self, save)
        return [(1, 1, -1, 7)]

    def forward(self, loc, conf, prior, *image):
        """``loc [N, 4KL]``, ``conf [N, KC]`` (probabilities), ``prior [1, 2, 4K]`` ->
        detections ``[1, 1, D, 7]`` in conf's dtype.

        Per image and non-background class: candidates with score strictly above
        ``confidence_threshold``, the ``top_k`` best (ties keep the lower prior first, like
        Caffe's stable CPU sort), greedy NMS keeping IoU <= the (eta-adaptive) threshold; then
        at most ``keep_top_k`` per image across classes by score (ties: lower class, then NMS
        order; Caffe's unstable std::sort leaves that open). Rows are ordered by image, class,
        then NMS order; boxes are decoded in float32 and not clipped. With no detection in the
        whole batch, one ``[i, -1, -1, -1, -1, -1, -1]`` row per image. Two host syncs: the
        candidate count and the number of rows.
        """
        detections = self._detect(loc, conf, prior)
        if self.saver is not None:
            self.saver.add(detections, loc.shape[0])
        return detections

    def _detect(self, loc, conf, prior):
        n, k, c, nl = loc.shape[0], self.num_priors, self.num_classes, self.loc_classes
        device = conf.device
        priors = prior[0, 0].detach().float().view(k, 4).to(device)
        variances = prior[0, 1].detach().float().view(k, 4).to(device)
        boxes = box.decode(priors.unsqueeze(1), variances.unsqueeze(1),
                           loc.detach().float().view(n, k, nl, 4).to(device),
                           self.code_type, self.variance_encoded_in_target)          # [N, K, L, 4]
        classes = torch.tensor([x for x in range(c) if x != self.background_label_id],
                               dtype=torch.long, device=device)
        scores = conf.detach().float().view(n, k, c).transpose(1, 2)[:, classes]      # [N, C', K]
        candidate = scores > self.confidence_threshold
        limit = k if self.top_k < 0 else min(self.top_k, k)
        m = min(limit, int(candidate.sum(-1).max())) if len(classes) else 0         # host sync
        if m == 0:
            return self._no_detection(n, conf.dtype, device)
        order, valid = box.top_candidates(scores, candidate, m)                     # [N, C', M]
        cand_score = scores.gather(-1, order)
        nc = len(classes)
        image = torch.arange(n, device=device).view(n, 1, 1)
        loc_class = (torch.zeros_like(classes) if self.share_location else classes).view(1, nc, 1)
        cand_boxes = boxes[image, order, loc_class]                                  # [N, C', M, 4]
        keep = box.greedy_nms(cand_boxes.view(n * nc, m, 4), valid.view(n * nc, m),
                              self.nms_threshold, self.eta).view(n, nc, m)
        if self.keep_top_k > -1:
            best, chosen = box.top_candidates(cand_score.view(n, nc * m), keep.view(n, nc * m),
                                              self.keep_top_k)
            keep = box.positions_mask(best, chosen, nc * m).view(n, nc, m)
        image, cls, pos = keep.nonzero(as_tuple=True)                               # host sync
        if image.numel() == 0:
            return self._no_detection(n, conf.dtype, device)
        rows = torch.cat([torch.stack([image.float(), classes[cls].float(), cand_score[image, cls, pos]], 1),
                          cand_boxes[image, cls, pos]], dim=1)
        return rows.to(conf.dtype).view(1, 1, -1, 7)

    @staticmethod
    def _no_detection(n, dtype, device):
        rows = torch.full((n, 7), -1.0, dtype=dtype, device=device)
        rows[:, 0] = torch.arange(n, dtype=dtype, device=device)
        return rows.view(1, 1, n, 7)


class ResultWriter:
    """DetectionOutput's ``save_output_param``: result files of a test pass, as Caffe writes them.

    Each image of each forward takes the next line of ``name_size_file`` ("name height width");
    its detections are mapped to pixels of that original image (:func:`box.to_image_pixels`
    with ``resize_param``) and ``xmin, ymin, width, height`` are rounded to 2 decimals, then
    truncated to integers. After every ``num_test_image`` images (default: all lines) the files
    are written in ``output_directory`` (created if needed, never emptied) and counting restarts:

    * VOC: ``<prefix><class name>.txt`` per non-background class of the label map, lines
      ``name score xmin ymin xmin+width ymin+height`` (no +1 shift); the files are truncated at
      the start of each pass;
    * COCO: ``<prefix>.json``, a list of ``{"image_id", "category_id" (class name), "bbox":
      [x, y, w, h], "score"}`` with numeric-looking strings unquoted (as Caffe's regex does);
    * ILSVRC: ``<prefix>.txt``, lines ``name label score xmin ymin xmax ymax``.

    The label map and the name/size list are read at the first forward.
    """

    FORMATS = ("VOC", "COCO", "ILSVRC")

    def __init__(self, layer: Layer, param: caffe_pb2.SaveOutputParameter):
        if param.output_format not in self.FORMATS:
            raise ValueError(f"save_output_param.output_format {param.output_format!r} must be one of "
                             f"{', '.join(self.FORMATS)}")
        self.layer, self.param = layer, param
        self.directory = param.output_directory
        self.names: Optional[List[str]] = None
        self.count = 0
        self.pending: List[Tuple[str, int, float, List[int]]] = []

    def _load(self):
        p = self.param
        try:
            labelmap = io.read_labelmap(p.label_map_file)
        except (OSError, io.CaffeFormatError) as err:
            raise self.layer.error(f"save_output_param: {err}") from None
        self.label_names = {item.label: item.name for item in labelmap.item}
        self.names, self.sizes = read_name_sizes(self.layer, p.name_size_file)
        self.num_test_image = p.num_test_image if p.HasField("num_test_image") else len(self.names)
        if not 0 < self.num_test_image <= len(self.names):
            raise self.layer.error(f"save_output_param: num_test_image {self.num_test_image} must be in "
                                   f"[1, {len(self.names)}] (lines of {p.name_size_file})")

    def _path(self, suffix: str) -> str:
        os.makedirs(self.directory, exist_ok=True)
        return os.path.join(self.directory, self.param.output_name_prefix + suffix)

    def _voc_files(self):
        return {label: self._path(name + ".txt") for label, name in sorted(self.label_names.items())
                if label != self.layer.background_label_id}

    def add(self, detections: torch.Tensor, num_images: int) -> None:
        if self.names is None:
            self._load()
        if self.count % self.num_test_image == 0 and self.param.output_format == "VOC":
            for path in self._voc_files().values():
                open(path, "w").close()
        rows = detections.detach().reshape(-1, 7).cpu().float()
        resize = self.param.resize_param if self.param.HasField("resize_param") else None
        for image in range(num_images):
            mine = rows[(rows[:, 0] == image) & (rows[:, 1] != -1)]
            height, width = self.sizes[self.count]
            pixels, _ = box.to_image_pixels(mine[:, 3:7], height, width, resize)
            for (label, score), (x0, y0, x1, y1) in zip(mine[:, 1:3].tolist(), pixels.numpy()):
                if int(label) not in self.label_names:
                    raise self.layer.error(f"label {int(label)} is not in {self.param.label_map_file}")
                bbox = [_round2_trunc(x0), _round2_trunc(y0), _round2_trunc(x1 - x0), _round2_trunc(y1 - y0)]
                self.pending.append((self.names[self.count], int(label), score, bbox))
            self.count += 1
            if self.count % self.num_test_image == 0:
                self._write()
                self.count = 0
                self.pending = []

    def _write(self):
        fmt = self.param.output_format
        if fmt == "VOC":
            files = self._voc_files()
            lines = {label: [] for label in files}
            for name, label, score, (x, y, w, h) in self.pending:
                if label in lines:
                    lines[label].append(f"{name} {score:g} {x} {y} {x + w} {y + h}\n")
            for label, path in files.items():
                with open(path, "w") as handle:
                    handle.writelines(lines[label])
        elif fmt == "COCO":
            records = [{"image_id": name, "category_id": self.label_names[label], "bbox": bbox,
                        "score": float(np.float32(score))} for name, label, score, bbox in self.pending]
            text = json.dumps(records, indent=1)
            text = re.sub(r'"(null|true|false|-?[0-9]+(\.[0-9]+)?)"', r"\1", text)
            with open(self._path(".json"), "w") as handle:
                handle.write(text + "\n")
        else:
            with open(self._path(".txt"), "w") as handle:
                for name, label, score, (x, y, w, h) in self.pending:
                    handle.write(f"{name} {label} {score:g} {x} {y} {x + w} {y + h}\n")


def _round2_trunc(value: float) -> int:
    """``static_cast<int>(round(v * 100) / 100.)`` in float, C rounding (half away from zero)."""
    scaled = float(np.float32(np.float32(value) * np.float32(100)))
    rounded = math.copysign(math.floor(abs(scaled) + 0.5), scaled)
    return int(np.float32(rounded / 100.0))


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
            _check_nms(p.nms_param)
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

    def forward(self, loc, conf, prior, label):
        """The scalar loss; see :meth:`terms` for what it is made of."""
        return self.terms(loc, conf, prior, label).loss

    def terms(self, loc, conf, prior, label) -> "MultiBoxTerms":
        """Match, mine, and sum the two losses (caffe-ssd-semantics.md §3.5-3.6).

        ``loc [N, 4KL]``, ``conf [N, KC]`` (logits), ``prior [1, 2, 4K]``, ``label [1, 1, G, 8]``.
        Matching, encoding and mining use float32 box geometry like Caffe and carry no
        gradient; the loss is in the dtype of ``loc``/``conf``, and its autograd gradients are
        Caffe's backward (including its quirk with ``encode_variance_in_target``, where the
        gradient w.r.t. ``pred / variance`` is written unscaled to ``mbox_loc``).
        Three host syncs, each a count Caffe needs: the padded object count (with the label
        checks), the matched priors and the largest number of negatives.
        """
        p = self.param
        n, k, c, nl = loc.shape[0], self.num_priors, self.num_classes, self.loc_classes
        priors = prior[0, 0].detach().float().view(k, 4).to(loc.device)
        variances = prior[0, 1].detach().float().view(k, 4).to(loc.device)
        max_label = None if p.map_object_to_agnostic else c
        gt = read_ground_truth(self, label.to(loc.device), n, p.use_difficult_gt, max_label=max_label)
        loc4 = loc.view(n, k, nl, 4).transpose(1, 2)                       # [N, L, K, 4]
        conf3 = conf.view(n, k, c)
        decoded = None
        if not p.use_prior_for_matching:
            decoded = box.decode(priors, variances, loc4.detach().float(), p.code_type,
                                 p.encode_variance_in_target)
        indices, overlaps = self._match(priors, decoded, gt)                # [N, L, K]
        matched = (indices > -1).nonzero(as_tuple=True)                     # host sync: the matches
        loc_terms = self._loc_terms(loc4, indices, matched, priors, variances, gt, decoded)
        logp = F.log_softmax(conf3, dim=-1) if p.conf_loss_type == _MBL.SOFTMAX else None
        negatives = None
        if self.mining_type != _MBL.NONE:
            indices, negatives = self._mine(conf3, logp, loc, loc_terms, matched, indices, overlaps,
                                            priors, variances, gt)
        num_matches = (indices > -1).sum()
        still = (indices[matched] > -1).unsqueeze(-1)                       # HARD_EXAMPLE demotes
        loc_sum = torch.where(still, loc_terms, torch.zeros_like(loc_terms)).sum()
        conf_sum = self._conf_sum(conf3, logp, indices, negatives, gt)
        normalizer = self._normalizer(n, k, num_matches, loc.dtype)
        loss = loc.new_zeros(())
        if self.use_loc:
            loss = loss + p.loc_weight * loc_sum / normalizer
        if self.use_conf:
            loss = loss + conf_sum / normalizer
        return MultiBoxTerms(loss, loc_sum, conf_sum, normalizer, num_matches, indices, negatives)

    def _match(self, priors, decoded, gt: GroundTruth):
        """Match indices and overlaps ``[N, L, K]`` (L = 1 with share_location, else one row per
        class, the background row never matched), as FindMatches does."""
        p = self.param
        n, g = gt.valid.shape
        k, c = self.num_priors, self.num_classes
        thr, per_prediction = p.overlap_threshold, p.match_type == _MBL.PER_PREDICTION
        classes = torch.arange(c, device=priors.device)
        if p.use_prior_for_matching:                # padding objects are empty boxes: IoU 0
            iou = box.pairwise_iou(gt.boxes, priors)                            # [N, G, K]
            ignored = (box.is_cross_boundary(priors).expand(n, k)
                       if p.ignore_cross_boundary_bbox else None)
            indices, overlaps = box.match(iou, None, ignored, thr, per_prediction)
            if self.share_location:
                return indices.unsqueeze(1), overlaps.unsqueeze(1)
            label = gt.labels.gather(1, indices.clamp(min=0))                # distribute by class
            own = ((indices > -1) & (label == classes.view(c, 1, 1))).transpose(0, 1)
            own &= (classes != self.background_label_id).view(1, c, 1)
            return (torch.where(own, indices.unsqueeze(1), torch.full_like(own, -1, dtype=torch.long)),
                    overlaps.unsqueeze(1).expand(n, c, k))
        nl = decoded.shape[1]
        valid = gt.valid.unsqueeze(1).expand(n, nl, g)
        if not self.share_location:                                          # objects of class l
            valid = valid & (gt.labels.unsqueeze(1) == classes.view(1, c, 1))
        iou = box.pairwise_iou(gt.boxes.unsqueeze(1), decoded)              # [N, L, G, K]
        ignored = box.is_cross_boundary(decoded) if p.ignore_cross_boundary_bbox else None
        indices, overlaps = box.match(iou.reshape(n * nl, g, k), valid.reshape(n * nl, g),
                                      None if ignored is None else ignored.reshape(n * nl, k),
                                      thr, per_prediction)
        indices, overlaps = indices.view(n, nl, k), overlaps.view(n, nl, k)
        if not self.share_location:                                          # background: no entry
            skip = (classes == self.background_label_id).view(1, c, 1)
            indices = indices.masked_fill(skip, -1)
            overlaps = overlaps.masked_fill(skip, 0.0)
        return indices, overlaps

    def _loc_terms(self, loc4, indices, matched, priors, variances, gt: GroundTruth, decoded):
        """Per-coordinate localisation loss ``[M, 4]`` of the ``M`` matched (image, loc class,
        prior) triples ``matched`` (Caffe's rows of loc_pred / loc_gt, in the same order),
        differentiable w.r.t. ``loc4 [N, L, K, 4]``."""
        p = self.param
        image, _, prior = matched
        objects = gt.boxes[image, indices[matched]]
        target = box.encode(priors[prior], variances[prior], objects, p.code_type,
                            p.encode_variance_in_target).to(loc4.dtype)
        pred = loc4[matched]
        if p.bp_inside:
            inside_box = priors[prior] if p.use_prior_for_matching else decoded[matched]
            outside = (inside_box < 0) | (inside_box > 1)
            pred = torch.where(outside, target, pred)
        if p.encode_variance_in_target:
            var = variances[prior].to(loc4.dtype)
            pred = pred + (pred / var - pred).detach()
            target = target / var
        diff = pred - target
        if p.loc_loss_type == _MBL.SMOOTH_L1:
            return torch.where(diff.abs() < 1, 0.5 * diff * diff, diff.abs() - 0.5)
        return 0.5 * diff * diff

    def _class_targets(self, indices, gt: GroundTruth):
        """Per prior: the class a positive is trained towards (``[N, K]``, -1 where unmatched),
        taking the last loc class with a match like Caffe's EncodeConfPrediction."""
        n, nl, k = indices.shape
        matched = indices > -1
        last = torch.where(matched, torch.arange(nl, device=indices.device).view(1, nl, 1),
                           torch.full_like(indices, -1)).max(1).values               # [N, K]
        index = indices.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1)
        label = gt.labels.gather(1, index.clamp(min=0))
        if self.param.map_object_to_agnostic:
            label = torch.full_like(label, self.background_label_id + 1)
        return torch.where(last >= 0, label, torch.full_like(label, -1))

    def _conf_rows(self, conf3, logp, target, class_row, fill, image_stride=None):
        """Per-prior confidence loss ``[N, K]`` towards the ``target`` classes. LOGISTIC targets
        are 1 at the target class of the priors in ``class_row`` and ``fill`` elsewhere (the
        loss fills with background_label_id, the mining score with 0, as Caffe does).
        ``image_stride``: where image ``i``'s one-hot entries land in the flat ``N*K*C`` target
        (Caffe's EncodeConfPrediction advances by ``K``, not ``K*C``, per image when every prior
        is used, so its LOGISTIC targets of images ``i > 0`` are misplaced; kept as is).
        ``logp``: the log-softmax of ``conf3`` (SOFTMAX only)."""
        n, k, c = conf3.shape
        if logp is not None:
            logp = logp.gather(-1, target.clamp(0, c - 1).unsqueeze(-1)).squeeze(-1)
            # Caffe: -log(max(p, FLT_MIN)); its gradient stays softmax - onehot
            return -(logp + (logp.clamp(min=_LOG_FLT_MIN) - logp).detach())
        hot = class_row & (target >= 0) & (target < c)
        stride = k * c if image_stride is None else image_stride
        flat = (torch.arange(n, device=conf3.device).view(n, 1) * stride
                + torch.arange(k, device=conf3.device).view(1, k) * c + target.clamp(0, c - 1))
        goal = torch.full((n * k * c + 1,), float(fill), dtype=conf3.dtype, device=conf3.device)
        goal[torch.where(hot, flat, torch.full_like(flat, n * k * c))] = 1.0
        goal = goal[:-1].view(n, k, c)
        return F.binary_cross_entropy_with_logits(conf3, goal, reduction="none").sum(-1)

    def _conf_sum(self, conf3, logp, indices, negatives, gt: GroundTruth):
        background = self.background_label_id
        target = self._class_targets(indices, gt)
        positive = target >= 0
        if negatives is None:                                                 # every prior
            rows = torch.ones_like(positive)
            class_row = positive
        else:
            rows = positive | negatives
            class_row = rows
        target = torch.where(positive, target, torch.full_like(target, background))
        per_prior = self._conf_rows(conf3, logp, target, class_row, background,
                                    image_stride=conf3.shape[1] if negatives is None else None)
        return torch.where(rows, per_prior, torch.zeros_like(per_prior)).sum()

    def _mine(self, conf3, logp, loc, loc_terms, matched_at, indices, overlaps, priors, variances,
              gt: GroundTruth):
        """MineHardExamples (share_location only, so L = 1): returns the updated match indices
        and the negatives ``[N, K]``."""
        p = self.param
        n, k = conf3.shape[:2]
        matched = indices[:, 0] > -1
        has_gt = gt.valid.any(1, keepdim=True)
        with torch.no_grad():
            target = self._class_targets(indices, gt)
            target = torch.where(matched, target, torch.full_like(target, self.background_label_id))
            score = self._conf_rows(conf3.detach(), None if logp is None else logp.detach(), target,
                                    torch.ones_like(matched), 0).float()
            if self.mining_type == _MBL.HARD_EXAMPLE:
                loc_loss = torch.zeros_like(score)
                loc_loss[matched_at[0], matched_at[2]] = loc_terms.detach().sum(-1).float()
                score = score + loc_loss
                eligible = has_gt.expand(n, k)
                wanted = torch.full((n,), p.sample_size, dtype=torch.long, device=conf3.device)
            else:
                eligible = (indices[:, 0] == -1) & (overlaps[:, 0] < p.neg_overlap) & has_gt
                num_pos = matched.sum(1).float() * torch.tensor(p.neg_pos_ratio, dtype=torch.float32)
                wanted = num_pos.long()
            count = torch.minimum(wanted, eligible.sum(1))
            if p.HasField("nms_param") and p.nms_param.nms_threshold > 0:
                boxes = priors.expand(n, k, 4) if p.use_prior_for_nms else box.decode(
                    priors, variances, loc.detach().float().view(n, k, 4), p.code_type,
                    p.encode_variance_in_target)
                selected = self._nms_select(score, eligible, count, boxes)
            else:
                selected = box.select_top(score, eligible, count)
        negatives = selected & (indices[:, 0] == -1)
        if self.mining_type == _MBL.HARD_EXAMPLE:                  # unselected positives lose their match
            indices = indices.masked_fill(matched.unsqueeze(1) & ~selected.unsqueeze(1), -1)
        return indices, negatives

    def _nms_select(self, score, eligible, count, boxes):
        """Mining with NMS (ApplyNMS): candidates by descending loss, cut to nms_param.top_k
        (Caffe reads the unset field as 0: nothing is selected), boxes with area < 1e-5 dropped,
        greedy NMS; the first ``count`` survivors are selected."""
        nms = self.param.nms_param
        n, k = score.shape
        if nms.top_k <= 0:
            return torch.zeros_like(eligible)
        order, valid = box.top_candidates(score, eligible, nms.top_k)
        cand = boxes.gather(1, order.unsqueeze(-1).expand(*order.shape, 4))
        valid &= box.box_area(cand) >= 1e-5
        keep = box.greedy_nms(cand, valid, nms.nms_threshold)
        chosen = keep & (keep.long().cumsum(1) <= count.unsqueeze(1))
        return box.positions_mask(order, chosen, k)

    def _normalizer(self, n, k, num_matches, dtype):
        """LossLayer::GetNormalizer, at least 1."""
        if self.normalization == _LOSS.FULL:
            value = torch.tensor(float(n * k))
        elif self.normalization == _LOSS.VALID:
            value = num_matches
        elif self.normalization == _LOSS.BATCH_SIZE:
            value = torch.tensor(float(n))
        else:
            value = torch.tensor(1.0)
        return value.to(device=num_matches.device, dtype=dtype).clamp(min=1)


_LOG_FLT_MIN = math.log(float(np.finfo(np.float32).tiny))


class MultiBoxTerms(NamedTuple):
    """What :meth:`MultiBoxLoss.terms` computed: the scalar ``loss``; the unnormalised sums
    ``loc_sum`` (SmoothL1/L2 over matched priors) and ``conf_sum`` (cross-entropy over the
    selected rows); the ``normalizer`` and ``num_matches`` (after mining); the final match
    ``indices [N, L, K]`` (-1 unmatched, -2 ignored cross-boundary prior) and the mined
    ``negatives [N, K]`` (None without mining)."""
    loss: torch.Tensor
    loc_sum: torch.Tensor
    conf_sum: torch.Tensor
    normalizer: torch.Tensor
    num_matches: torch.Tensor
    indices: torch.Tensor
    negatives: Optional[torch.Tensor]


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
        self._sizes: Optional[List[Tuple[int, int]]] = None
        self._name_index = 0
        return [(1, 1, -1, 5)]

    def forward(self, detections, label):
        """``detections [1, 1, D, 7]``, ``label [1, 1, G, 8]`` -> ``[1, 1, C-1 + D', 5]`` rows:
        first ``[-1, c, n_pos(c), -1, -1]`` for every non-background class ``c`` ascending
        (``n_pos`` counts difficult objects only with ``evaluate_difficult_gt``), then for each
        image ascending, each label ascending, one ``[image, label, score, tp, fp]`` per
        detection (D' = detections whose label is not -1).

        Within an (image, label) that has objects, detections go by descending score (stable)
        and each takes the object of largest IoU (first on ties): true positive if IoU >=
        overlap_threshold and the object is still unused, ``[.., 0, 0]`` if that object is
        difficult and difficult ones are not evaluated, else false positive. Without objects of
        the label, every detection is a false positive, in input order. With ``name_size_file``
        boxes are first mapped to pixels of the original image (clipped, VOC "+1" areas); its
        line advances once per image present in the detections and wraps at the end, across
        forward calls (like Caffe). Runs on the host; the result goes back to the input device.
        """
        det = detections.detach().reshape(-1, 7).cpu().float()
        gt_rows = label.detach().reshape(-1, 8).cpu().float()
        background = self.background_label_id
        det_item, det_label = det[:, 0].long(), det[:, 1].long()
        real = det_item != -1
        if bool((real & (det_label == background)).any()):
            raise self.error(f"found background label {background} in the detections "
                             f"'{self.lp.bottom[0]}'")
        items = torch.cat([det_item, gt_rows[:, 0].long()])
        gt = read_ground_truth(self, gt_rows, int(items.max()) + 1 if len(items) else 0,
                               keep_difficult=True, stop_at_missing=True)
        counted = gt.valid & (~gt.difficult if not self.evaluate_difficult_gt else True)
        rows = [[-1.0, float(c), float((counted & (gt.labels == c)).sum()), -1.0, -1.0]
                for c in range(self.num_classes) if c != background]
        evaluated = real & (det_label != -1)
        images = sorted(set(det_item[real].tolist()))       # each advances the name/size line
        sizes = self._image_sizes() if self.name_size_file else None
        for image in images:
            mine = evaluated & (det_item == image)
            for cls in sorted(set(det_label[mine].tolist())):
                group = det[mine & (det_label == cls)]
                rows.extend(self._evaluate_group(image, cls, group, gt, sizes))
            if sizes:
                self._name_index = (self._name_index + 1) % len(sizes)
        out = torch.tensor(rows, dtype=torch.float32).to(device=detections.device, dtype=detections.dtype)
        return out.view(1, 1, -1, 5)

    def _evaluate_group(self, image, cls, group, gt: GroundTruth, sizes):
        scores = group[:, 2]
        objects = gt.valid[image] & (gt.labels[image] == cls) if 0 <= image < len(gt.valid) else None
        if objects is None or not bool(objects.any()):
            return [[float(image), float(cls), float(s), 0.0, 1.0] for s in scores]
        order = torch.sort(scores, descending=True, stable=True).indices
        boxes, scores = group[order, 3:7], scores[order]
        truth, difficult = gt.boxes[image][objects], gt.difficult[image][objects]
        if sizes:
            height, width = sizes[self._name_index]
            boxes, box_areas = box.to_image_pixels(boxes, height, width, self.resize_param)
            truth, truth_areas = box.to_image_pixels(truth, height, width, self.resize_param)
            iou = box.pairwise_iou(boxes, truth, pixel=True, area_a=box_areas, area_b=truth_areas)
        else:
            iou = box.pairwise_iou(boxes, truth)
        best = iou.argmax(1)                                          # first max
        overlap = iou.gather(1, best.unsqueeze(1)).squeeze(1)
        hit = overlap >= self.overlap_threshold
        scored = hit & (torch.ones_like(hit) if self.evaluate_difficult_gt else ~difficult[best])
        first = torch.zeros_like(hit)                                 # first scored hit of its object
        seen = set()
        for i in scored.nonzero().flatten().tolist():
            if best[i].item() not in seen:
                seen.add(best[i].item())
                first[i] = True
        tp = first
        fp = ~hit | (scored & ~first)
        return [[float(image), float(cls), float(s), float(t), float(f)]
                for s, t, f in zip(scores.tolist(), tp.tolist(), fp.tolist())]

    def _image_sizes(self) -> List[Tuple[int, int]]:
        """``(height, width)`` per line of name_size_file ("name height width"), read once."""
        if self._sizes is None:
            self._sizes = read_name_sizes(self, self.name_size_file)[1]
        return self._sizes
