"""DetectionEvaluate: per-class positive counts and true/false-positive flags of a test pass,
with the SSD fork's semantics. Blob layouts: :mod:`.detection_blobs`."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import box
from .base import Layer, format_shape
from .registry import register
from .detection_blobs import GroundTruth, check_label_blob, read_ground_truth, read_name_sizes


@register
class DetectionEvaluate(Layer):
    """Per-class positive counts and tp/fp flags of every detection (docs/semantics.md, "DetectionEvaluate"). See :meth:`forward`."""

    caffe_type = "DetectionEvaluate"
    num_bottoms = (2, 2)
    host_bottoms = (1,)              # the label blob: read on the host, no device round trip

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
        check_label_blob(self, label, 1)
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
