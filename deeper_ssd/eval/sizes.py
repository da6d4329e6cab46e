"""Average precision per object-size bucket of the paper's Table 2.

A bucket holds the objects whose ``box area / image area`` (normalised box area, so the ratio
of the original image) is: S ``<= 0.12 %``, M ``(0.12 %, 1 %]``, L ``(1 %, 10 %]``,
XL ``> 10 %`` (:data:`SIZE_BUCKETS`).

AP of a bucket is Caffe's evaluation with the objects outside the bucket treated like
*difficult* objects: they are not counted as positives, and a detection whose best match
(IoU >= overlap_threshold) is one of them is ignored (neither true nor false positive). Every
other detection counts — as in the paper's sub data set S, a detection of no object is a false
positive in every bucket. The matching is the net's own DetectionEvaluate layer (one copy per
bucket, so its name_size_file position advances as the original's does), fed the detections
and a label blob whose out-of-bucket rows are flagged difficult. A bucket's mAP is the mean
over the classes with at least one object in it (None when it has none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .. import box
from ..proto import caffe_pb2
from .ap import DetectionAccumulator

__all__ = ["SIZE_BUCKETS", "BUCKETS", "bucket_of", "bucket_label_blob", "BucketResult", "SizeBuckets"]

#: (name, upper bound of box area / image area, share of the paper's objects): Table 2 of the
#: paper; the sample generator draws sizes with these shares, the last bound is only a drawing cap
SIZE_BUCKETS = (("S", 0.0012, 0.6362), ("M", 0.01, 0.3641), ("L", 0.10, 0.0728), ("XL", 0.25, 0.0026))

#: bucket names in Table 2's order
BUCKETS = tuple(name for name, _, _ in SIZE_BUCKETS)


def _bounds_text() -> Dict[str, str]:
    uppers = [upper * 100 for _, upper, _ in SIZE_BUCKETS[:-1]]
    text = {BUCKETS[0]: f"<= {uppers[0]:g} %", BUCKETS[-1]: f"> {uppers[-1]:g} %"}
    for name, low, high in zip(BUCKETS[1:-1], uppers, uppers[1:]):
        text[name] = f"{low:g} % < area <= {high:g} %"
    return text


_BOUNDS = _bounds_text()


def bucket_of(ratio: float) -> str:
    """Table 2 bucket of a ``box area / image area`` ratio: S, M, L or XL."""
    for name, upper, _ in SIZE_BUCKETS[:-1]:
        if ratio <= upper:
            return name
    return SIZE_BUCKETS[-1][0]


def _bucket_index(label_rows: torch.Tensor) -> torch.Tensor:
    """Index into BUCKETS of every label row's box (``[G]`` long)."""
    ratio = box.box_area(label_rows[:, 3:7].float())
    index = torch.zeros(len(ratio), dtype=torch.long)
    for upper in (b[1] for b in SIZE_BUCKETS[:-1]):
        index += (ratio > upper).long()
    return index


def bucket_label_blob(label: torch.Tensor, bucket: str, keep_difficult: bool = False) -> torch.Tensor:
    """The ``1 x 1 x G x 8`` label blob with every object outside ``bucket`` flagged difficult
    (column 7). ``keep_difficult``: the objects inside are made non-difficult (for a
    DetectionEvaluate that evaluates difficult objects)."""
    rows = label.detach().reshape(-1, 8).cpu().float().clone()
    real = rows[:, 0] != -1
    inside = _bucket_index(rows) == BUCKETS.index(bucket)
    rows[real & ~inside, 7] = 1.0
    if keep_difficult:
        rows[real & inside, 7] = 0.0
    return rows.view(1, 1, -1, 8)


@dataclass
class BucketResult:
    """One bucket: ``mean_ap`` over the classes with objects in it (None without any),
    per-class ``ap`` and ``num_pos``."""
    bucket: str
    bounds: str
    mean_ap: Optional[float]
    ap: Dict[int, float]
    num_pos: Dict[int, int]

    def as_dict(self) -> dict:
        return dict(bounds=self.bounds, mAP=self.mean_ap, objects=sum(self.num_pos.values()),
                    per_class={str(k): dict(ap=self.ap[k], objects=self.num_pos[k]) for k in self.ap})


class SizeBuckets:
    """Per-bucket evaluation alongside a test net's DetectionEvaluate ``layer``: call
    :meth:`add` with that layer's two bottoms after each forward."""

    def __init__(self, layer):
        lp = caffe_pb2.LayerParameter()
        lp.CopyFrom(layer.lp)
        self.keep_difficult = lp.detection_evaluate_param.evaluate_difficult_gt
        lp.detection_evaluate_param.evaluate_difficult_gt = False
        cls = type(layer)
        self.layers = {b: cls(lp, layer.bottom_shapes, layer.phase) for b in BUCKETS}
        self.accumulators = {b: DetectionAccumulator() for b in BUCKETS}

    @torch.no_grad()
    def add(self, detections: torch.Tensor, label: torch.Tensor) -> None:
        detections = detections.detach().cpu()
        for bucket, layer in self.layers.items():
            rows = layer(detections, bucket_label_blob(label, bucket, self.keep_difficult))
            self.accumulators[bucket].add(rows.numpy())

    def results(self, version: str = "11point") -> List[BucketResult]:
        out = []
        for bucket, acc in self.accumulators.items():
            result = acc.result(version)
            present = [k for k, n in result.num_pos.items() if n > 0]
            mean = sum(result.ap[k] for k in present) / len(present) if present else None
            out.append(BucketResult(bucket, _BOUNDS[bucket], mean, {k: result.ap[k] for k in present},
                                    {k: result.num_pos[k] for k in present}))
        return out
