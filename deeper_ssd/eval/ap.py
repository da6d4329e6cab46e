"""Average precision exactly as Caffe-SSD computes it (docs/semantics.md, "ComputeAP").

* :func:`compute_ap` is ``ComputeAP`` (``bbox_util.cpp``): "11point" (VOC2007; float32 recall
  compared with the double thresholds ``j/10``, so a recall of exactly 0.7 or 0.9 misses its
  point), "MaxIntegral" (VOC2012/ILSVRC) and "Integral"; all accumulations in float32.
* :class:`DetectionAccumulator` is the solver's ``TestDetection``: it collects the rows of
  DetectionEvaluate output blobs over the test iterations and gives per-class AP and mAP
  (the mean over every class that had a count row, classes without detections counting 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = ["AP_VERSIONS", "compute_ap", "DetectionAccumulator", "DetectionResult"]

AP_VERSIONS = ("11point", "MaxIntegral", "Integral")
_EPS = np.float32(1e-6)


def compute_ap(tp: Sequence[Tuple[float, int]], num_pos: int, fp: Sequence[Tuple[float, int]],
               version: str = "11point") -> Tuple[float, np.ndarray, np.ndarray]:
    """Caffe's ComputeAP.

    ``tp``/``fp``: ``(score, flag)`` pairs of the same detections in the same order
    (``fp`` flag = 1 - ``tp`` flag); ``num_pos``: number of positives of the class.
    Detections are ordered by descending score with a stable sort (ties keep their input
    order). Returns ``(ap, precision, recall)``; ap is 0 without detections or positives.
    """
    if version not in AP_VERSIONS:
        raise ValueError(f"unknown ap_version {version!r} (choose from {', '.join(AP_VERSIONS)})")
    if len(tp) != len(fp):
        raise ValueError(f"tp has {len(tp)} entries, fp {len(fp)}")
    tp_scores = np.float32([s for s, _ in tp])
    tp_flags = np.int64([f for _, f in tp])
    fp_scores = np.float32([s for s, _ in fp])
    fp_flags = np.int64([f for _, f in fp])
    if len(tp) and (np.any(np.abs(tp_scores - fp_scores) > _EPS) or np.any(tp_flags != 1 - fp_flags)):
        raise ValueError("tp and fp must list the same detections with complementary flags")
    empty = np.zeros(0, np.float32)
    if len(tp) == 0 or num_pos == 0:
        return 0.0, empty, empty
    tp_cum = np.cumsum(tp_flags[np.argsort(-tp_scores, kind="stable")])
    fp_cum = np.cumsum(fp_flags[np.argsort(-fp_scores, kind="stable")])
    if tp_cum[-1] > num_pos:
        raise ValueError(f"{tp_cum[-1]} true positives for {num_pos} positives")
    prec = (tp_cum.astype(np.float32) / (tp_cum + fp_cum).astype(np.float32)).astype(np.float32)
    rec = (tp_cum.astype(np.float32) / np.float32(num_pos)).astype(np.float32)
    n = len(prec)
    ap = np.float32(0)
    if version == "11point":
        max_precs = np.zeros(11, np.float32)
        start = n - 1
        for j in range(10, -1, -1):
            for i in range(start, -1, -1):
                if float(rec[i]) < j / 10.0:                      # float32 vs double threshold
                    start = i
                    if j > 0:
                        max_precs[j - 1] = max_precs[j]
                    break
                max_precs[j] = max(max_precs[j], prec[i])
        for j in range(10, -1, -1):
            ap = np.float32(ap + max_precs[j] / np.float32(11))
    elif version == "MaxIntegral":
        cur_rec, cur_prec = rec[-1], prec[-1]
        for i in range(n - 2, -1, -1):
            cur_prec = max(prec[i], cur_prec)
            step = np.float32(abs(cur_rec - rec[i]))
            if step > _EPS:
                ap = np.float32(ap + cur_prec * step)
            cur_rec = rec[i]
        ap = np.float32(ap + cur_rec * cur_prec)
    else:
        prev = np.float32(0)
        for i in range(n):
            step = np.float32(abs(rec[i] - prev))
            if step > _EPS:
                ap = np.float32(ap + prec[i] * step)
            prev = rec[i]
    return float(ap), prec, rec


@dataclass
class DetectionResult:
    """mAP and per-class AP of one DetectionEvaluate output; ``missing`` lists the classes that
    had positives counted but never a detection (Caffe warns and counts their AP as 0)."""
    mean_ap: float
    ap: Dict[int, float]
    num_pos: Dict[int, int]
    missing: List[int] = field(default_factory=list)


class DetectionAccumulator:
    """Accumulate DetectionEvaluate rows ``[image, label, score, tp, fp]`` over test iterations
    the way Caffe's ``Solver::TestDetection`` does, for one output blob.

    Count rows (image -1) add ``int(score)`` positives to their label; detection rows with
    ``tp == fp == 0`` (matched a difficult object) are dropped; the rest are appended in order.
    """

    def __init__(self):
        self.num_pos: Dict[int, int] = {}
        self.true_pos: Dict[int, List[Tuple[float, int]]] = {}
        self.false_pos: Dict[int, List[Tuple[float, int]]] = {}

    def add(self, rows) -> None:
        """Add the rows of one forward pass: any array-like whose last axis has width 5."""
        rows = np.asarray(rows, dtype=np.float32)
        if rows.shape[-1] != 5:
            raise ValueError(f"DetectionEvaluate rows have width 5, got shape {rows.shape}")
        for item, label, score, tp, fp in rows.reshape(-1, 5):
            item, label = int(item), int(label)
            if item == -1:
                self.num_pos[label] = self.num_pos.get(label, 0) + int(score)
                continue
            tp, fp = int(tp), int(fp)
            if tp == 0 and fp == 0:
                continue
            self.true_pos.setdefault(label, []).append((float(score), tp))
            self.false_pos.setdefault(label, []).append((float(score), fp))

    def result(self, version: str = "11point") -> DetectionResult:
        """Per-class AP over the labels with count rows (ascending) and their float32 mean."""
        aps: Dict[int, float] = {}
        missing = []
        total = np.float32(0)
        for label in sorted(self.num_pos):
            if label not in self.true_pos:
                missing.append(label)
                aps[label] = 0.0
                continue
            aps[label], _, _ = compute_ap(self.true_pos[label], self.num_pos[label],
                                          self.false_pos[label], version)
            total = np.float32(total + np.float32(aps[label]))
        mean = float(np.float32(total / np.float32(len(self.num_pos)))) if self.num_pos else 0.0
        return DetectionResult(mean, aps, dict(self.num_pos), missing)
