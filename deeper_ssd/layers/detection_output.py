"""DetectionOutput: decode, per-class NMS, keep_top_k, and the result files of a test pass
(``save_output_param``), with the SSD fork's semantics. Blob layouts: :mod:`.detection_blobs`."""
from __future__ import annotations

import json
import math
import os
import re
from typing import List, Optional, Tuple

import numpy as np
import torch

from .. import box, io
from ..proto import caffe_pb2
from .base import Layer
from .registry import register
from .detection_blobs import check_heads, check_nms, read_name_sizes


@register
class DetectionOutput(Layer):
    """Decode, per-class NMS and keep_top_k (docs/semantics.md, "DetectionOutput and NMS"). See :meth:`forward`."""

    caffe_type = "DetectionOutput"
    float32 = True              # Caffe-semantic arithmetic, float32 under autocast
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
        check_nms(p.nms_param)
        self.nms_threshold = p.nms_param.nms_threshold
        self.eta = p.nms_param.eta
        self.top_k = p.nms_param.top_k if p.nms_param.HasField("top_k") else -1
        if p.visualize:
            raise ValueError("visualize: true is not supported (Caffe opens an interactive OpenCV "
                             "window on a fourth 'data' bottom); draw detections with "
                             "`deeper-ssd detect` instead")
        self.num_priors = check_heads(self, bottoms, self.num_classes, self.loc_classes)
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
        whole batch, one ``[i, -1, -1, -1, -1, -1, -1]`` row per image. Host syncs: the
        candidate count, one or two per NMS block (:func:`box.greedy_nms`, which stops once
        ``keep_top_k`` is settled), the top-k tie checks and the number of rows.
        """
        detections = self._detect(loc, conf, prior)
        if self.saver is not None:
            self.saver.add(detections, loc.shape[0])
        return detections

    #: candidates per class taken first when keep_top_k can end NMS early (then all top_k if needed)
    FIRST_FETCH = 64

    def _detect(self, loc, conf, prior):
        n, k, c, nl = loc.shape[0], self.num_priors, self.num_classes, self.loc_classes
        device = conf.device
        classes = torch.tensor([x for x in range(c) if x != self.background_label_id],
                               dtype=torch.long, device=device)
        if not len(classes):
            return self._no_detection(n, conf.dtype, device)
        priors = prior[0, 0].detach().float().view(k, 4).to(device)
        variances = prior[0, 1].detach().float().view(k, 4).to(device)
        boxes = box.decode(priors.unsqueeze(1), variances.unsqueeze(1),
                           loc.detach().float().view(n, k, nl, 4).to(device),
                           self.code_type, self.variance_encoded_in_target)          # [N, K, L, 4]
        scores = conf.detach().float().view(n, k, c).transpose(1, 2)                  # [N, C, K] view
        limit = k if self.top_k < 0 else min(self.top_k, k)
        fetch = limit if self.keep_top_k < 0 else min(limit, self.FIRST_FETCH)
        found = self._nms(boxes, scores, classes, fetch, limit)
        if found is None:                           # keep_top_k not settled by the first fetch
            found = self._nms(boxes, scores, classes, limit, limit)
        if not found:
            return self._no_detection(n, conf.dtype, device)
        keep, cand_score, cand_boxes = found
        nc, m = keep.shape[1:]
        if self.keep_top_k > -1:
            kept_at = keep.view(-1, m).any(0).nonzero()
            m = int(kept_at[-1]) + 1 if len(kept_at) else 1               # host sync; NMS may end early
            keep, cand_score, cand_boxes = keep[..., :m], cand_score[..., :m], cand_boxes[:, :, :m]
            best, chosen = box.top_candidates(cand_score.reshape(n, nc * m), keep.reshape(n, nc * m),
                                              self.keep_top_k)
            keep = box.positions_mask(best, chosen, nc * m).view(n, nc, m)
        image, cls, pos = keep.nonzero(as_tuple=True)                               # host sync
        if image.numel() == 0:
            return self._no_detection(n, conf.dtype, device)
        rows = torch.cat([torch.stack([image.float(), classes[cls].float(), cand_score[image, cls, pos]], 1),
                          cand_boxes[image, cls, pos]], dim=1)
        return rows.to(conf.dtype).view(1, 1, -1, 7)

    def _nms(self, boxes, scores, classes, fetch: int, limit: int):
        """NMS on each class's ``fetch`` best candidates (of the ``limit`` = top_k allowed):
        ``(keep, scores, boxes)`` ``[N, C', M(, 4)]`` in score order, ``()`` without candidates,
        or None when ``fetch < limit`` was too few to settle ``keep_top_k``. ``boxes``
        ``[N, K, L, 4]`` decoded, ``scores [N, C, K]``, ``classes [C']`` the non-background ones."""
        n, nc = scores.shape[0], len(classes)
        more = int(fetch < limit)                       # one more candidate bounds those not taken
        order, valid = box.top_candidates(scores, self.confidence_threshold, fetch + more)
        cand_score = scores.gather(-1, order)[:, classes]
        order, valid = order[:, classes], valid[:, classes]                          # [N, C', F]
        m = int(valid.sum(-1).max())                                                # host sync
        if m == 0:
            return ()
        order, valid, cand_score = order[..., :m], valid[..., :m], cand_score[..., :m]
        image = torch.arange(n, device=scores.device).view(n, 1, 1)
        loc_class = (torch.zeros_like(classes) if self.share_location else classes).view(1, nc, 1)
        cand_boxes = boxes[image, order, loc_class]                                  # [N, C', M, 4]
        enough = self._enough(cand_score, valid)
        more = more and m > fetch
        m = min(m, fetch)
        keep = box.greedy_nms(cand_boxes[:, :, :m].reshape(n * nc, m, 4), valid[..., :m].reshape(n * nc, m),
                              self.nms_threshold, self.eta, done=enough).view(n, nc, m)
        if more and not enough(keep, m):
            return None
        return keep, cand_score[..., :m], cand_boxes[:, :, :m]

    def _enough(self, cand_score: torch.Tensor, valid: torch.Tensor):
        """The early end of NMS for ``keep_top_k`` (None without it): once every image has
        ``keep_top_k`` kept boxes scoring strictly above all its undecided candidates, those
        can no longer be among its ``keep_top_k`` best. ``cand_score``/``valid`` ``[N, C', F]``
        (sorted per class); ``done(keep, decided)`` takes ``keep`` with ``decided <= F - 1``
        candidates per class decided (shape ``[N * C', M]`` or ``[N, C', M]``)."""
        if self.keep_top_k < 0:
            return None
        n, nc = cand_score.shape[:2]
        rest = cand_score.masked_fill(~valid, -float("inf"))

        def done(keep: torch.Tensor, decided: int) -> bool:
            best_left = rest[:, :, decided].amax(-1).view(n, 1, 1)
            above = keep.view(n, nc, -1)[:, :, :decided] & (cand_score[:, :, :decided] > best_left)
            return bool((above.sum((1, 2)) >= self.keep_top_k).all())             # host sync
        return done

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
