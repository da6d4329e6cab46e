"""Evaluate a detection test net: mAP, per-class AP, AP per size bucket, PR curves, speed.

:func:`evaluate` runs a TEST-phase :class:`deeper_ssd.net.Net` whose outputs are
DetectionEvaluate rows (the SSD test net) for ``iterations`` forward passes and accumulates the
rows as Caffe's ``Solver::TestDetection`` with the solver's own test loop (:mod:`.loop`), so
its mAP equals the ``detection_eval`` a training run logs on the same weights and images. Hooks on the DetectionEvaluate layer give the size
buckets (:mod:`.sizes`) and the time spent evaluating, so that the detection speed (paper Eq. 8:
images / total detection time) counts the network and DetectionOutput (decoding and NMS), not
data loading or evaluation. The first batch is a warm-up and not timed when there are several.
"""
from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .. import io
from .ap import AP_VERSIONS, compute_ap
from .loop import DetectionRows, run_test_net
from .sizes import SizeBuckets

__all__ = ["Evaluation", "evaluate", "label_names", "device_description", "pr_points"]


@dataclass
class Evaluation:
    """Everything :func:`evaluate` measured; :meth:`as_dict` is the JSON of ``deeper-ssd test``.

    ``mean_ap[version]`` and ``ap[version][label]`` for every AP version; ``num_pos[label]``;
    ``buckets`` (from :class:`.sizes.SizeBuckets`, headline version); ``pr[label]`` =
    ``(recall, precision)`` at each true positive (headline version); ``speed`` in images/s
    with ``detect_seconds``, ``timed_images``, ``device`` and ``batch``.
    """
    iterations: int
    images: int
    batch: int
    ap_version: str
    output: str
    mean_ap: Dict[str, float]
    ap: Dict[str, Dict[int, float]]
    num_pos: Dict[int, int]
    missing: List[int]
    buckets: list
    pr: Dict[int, tuple]
    speed: Dict[str, object]
    names: Dict[int, str] = field(default_factory=dict)

    @property
    def map(self) -> float:
        return self.mean_ap[self.ap_version]

    def as_dict(self) -> dict:
        name = lambda k: self.names.get(k, f"class{k}")   # noqa: E731
        return dict(
            iterations=self.iterations, images=self.images, batch=self.batch, output=self.output,
            ap_version=self.ap_version, mAP=self.map, mAP_by_version=self.mean_ap,
            per_class={str(k): dict(name=name(k), ap=self.ap[self.ap_version].get(k, 0.0),
                                    ap_by_version={v: self.ap[v].get(k, 0.0) for v in self.ap},
                                    objects=n) for k, n in self.num_pos.items()},
            classes_without_detections=self.missing,
            size_buckets={b.bucket: b.as_dict() for b in self.buckets},
            pr_curves={str(k): dict(name=name(k), recall=r, precision=p) for k, (r, p) in self.pr.items()},
            speed=self.speed)


def label_names(net) -> Dict[int, str]:
    """``{label: display name}`` from the label map of the net's AnnotatedData layer (empty
    when there is none or it cannot be read)."""
    for layer in net.layers:
        path = layer.lp.annotated_data_param.label_map_file if layer.lp.HasField("annotated_data_param") else ""
        if path and os.path.exists(path):
            try:
                return {item.label: item.display_name or item.name for item in io.read_labelmap(path).item}
            except io.CaffeFormatError:
                return {}
    return {}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def pr_points(tp, num_pos: int, fp, version: str):
    """Recall and precision at each true positive (the top of every step of the PR curve),
    as lists of floats, plus the last point."""
    _, prec, rec = compute_ap(tp, num_pos, fp, version)
    if len(prec) == 0:
        return [], []
    rise = np.flatnonzero(np.diff(np.concatenate([[0.0], rec])) > 0)
    keep = np.unique(np.concatenate([rise, [len(rec) - 1]]))
    return [round(float(v), 6) for v in rec[keep]], [round(float(v), 6) for v in prec[keep]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(net, iterations: int, ap_version: str = "11point", sizes: bool = True,
             progress: Optional[Callable[[int, int], None]] = None) -> Evaluation:
    """Run ``net`` ``iterations`` times and evaluate (see the module docstring).
    ``progress(i, iterations)`` is called after each batch."""
    if ap_version not in AP_VERSIONS:
        raise ValueError(f"unknown ap_version {ap_version!r} (choose from {', '.join(AP_VERSIONS)})")
    evaluators = [l for l in net.layers if l.caffe_type == "DetectionEvaluate"]
    if not evaluators:
        raise ValueError(f"net '{net.name}' has no DetectionEvaluate layer: give the test net "
                         "(test.prototxt), not the deploy net")
    sources = [layer for layer in net.layers if layer.is_source]
    buckets = SizeBuckets(evaluators[0]) if sizes else None
    device = net.device
    clock = {"eval": 0.0}

    def before(layer, args):
        _sync(device)
        clock["start"] = time.perf_counter()

    def after(layer, args, output):
        if buckets is not None and layer is evaluators[0]:
            buckets.add(*args)
        clock["eval"] += time.perf_counter() - clock["start"]

    handles = [h for layer in evaluators for h in (layer.register_forward_pre_hook(before),
                                                    layer.register_forward_hook(after))]
    rows = DetectionRows(strict=False)
    detect_s, timed_images, batch, done, started = 0.0, 0, 0, 0, 0.0

    def start_batch(_batch: int) -> None:
        nonlocal started
        clock["eval"] = 0.0
        _sync(device)
        started = time.perf_counter()

    def consume(outputs) -> None:
        nonlocal detect_s, timed_images, batch, done
        _sync(device)
        elapsed = time.perf_counter() - started
        wait = sum(layer.timing.last_wait_s for layer in net.data_layers)
        batch = int(net.blob_shapes[sources[0].lp.top[0]][0]) if sources else 1
        if done > 0 or iterations == 1:
            detect_s += max(elapsed - wait - clock["eval"], 0.0)
            timed_images += batch
        rows.add(outputs)
        done += 1
        if progress is not None:
            progress(done, iterations)

    try:
        run_test_net(net, iterations, consume, before_batch=start_batch)
    finally:
        for handle in handles:
            handle.remove()
    if not rows.accumulators:
        raise ValueError(f"net '{net.name}' has no output of DetectionEvaluate rows (width 5)")
    output, acc = next(iter(rows.accumulators.items()))
    results = {v: acc.result(v) for v in AP_VERSIONS}
    headline = results[ap_version]
    pr = {label: pr_points(acc.true_pos[label], acc.num_pos[label], acc.false_pos[label], ap_version)
          for label in headline.num_pos if label in acc.true_pos}
    speed = dict(images_per_s=timed_images / detect_s if detect_s > 0 else math.nan,
                 detect_seconds=detect_s, timed_images=timed_images, batch=batch,
                 device=device_description(device),
                 measures="network forward + DetectionOutput (decode, NMS); excludes data loading, "
                          "evaluation and the first (warm-up) batch")
    return Evaluation(iterations, iterations * batch, batch, ap_version, output,
                      {v: r.mean_ap for v, r in results.items()}, {v: r.ap for v, r in results.items()},
                      dict(headline.num_pos), list(headline.missing),
                      buckets.results(ap_version) if buckets is not None else [], pr, speed,
                      label_names(net))
