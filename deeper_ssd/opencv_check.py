"""A deploy net against OpenCV's Caffe importer (``cv2.dnn.readNetFromCaffe``, OpenCV < 5).

:func:`unsupported_layers` lists the layers OpenCV cannot run: every layer type of deeper-ssd's
own (its parameter message sits in LayerParameter 7700–7799: SR-TOD, ZoomInNet). OpenCV parses
such a file — it skips fields it does not know — and only fails at its first forward ("Can't
create layer"), so :func:`refuse_unsupported` says so up front.

:func:`compare` runs one seeded random input through both executors on the same weights and
compares every layer's output that OpenCV exposes (ours captured with forward hooks, so in-place
chains compare layer by layer); DetectionOutput rows are compared as sets, the lowest-scoring row of
each class excepted (a near-tie at a cut-off may keep either of two rows). OpenCV does not
truncate non-integer PriorBox sizes to int as Caffe does, so on such nets the priors and
everything computed from them are skipped (and named): Caffe's rule is checked against the
oracle instead (tests/test_priorbox.py).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from . import io
from .net import Net
from .proto import caffe_pb2

__all__ = ["OWN_FIELD_RANGE", "OpenCVUnsupported", "unsupported_layers", "refuse_unsupported",
           "LayerDifference", "Comparison", "compare", "has_integer_prior_sizes",
           "without_result_files"]

#: LayerParameter field numbers of deeper-ssd's own parameter messages (docs/schema.md)
OWN_FIELD_RANGE = range(7700, 7800)


class OpenCVUnsupported(ValueError):
    """The net has layer types OpenCV's Caffe importer does not implement."""


def _own_types() -> set:
    fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields
    return {f.message_type.name[:-len("Parameter")] for f in fields
            if f.message_type is not None and f.number in OWN_FIELD_RANGE}


def unsupported_layers(net: caffe_pb2.NetParameter) -> List[Tuple[str, str]]:
    """``(layer name, type)`` of every layer OpenCV's Caffe importer cannot run."""
    own = _own_types()
    return [(layer.name, layer.type) for layer in net.layer if layer.type in own]


def refuse_unsupported(net: caffe_pb2.NetParameter, origin: str) -> None:
    """Raise OpenCVUnsupported naming the layers and the way out, if there are any."""
    layers = unsupported_layers(net)
    if layers:
        listed = ", ".join(f"{name!r} ({kind})" for name, kind in layers)
        raise OpenCVUnsupported(
            f"{origin}: OpenCV's Caffe importer cannot run deeper-ssd's own layer types: {listed}. "
            "Nets with the SR-TOD or ZoomInNet layers run in deeper-ssd's executor only; check the "
            "same model without the head (deeper-ssd generate MODEL, no --head) against OpenCV")


def has_integer_prior_sizes(net: caffe_pb2.NetParameter) -> bool:
    """True when every PriorBox min/max size is a whole number (where OpenCV agrees with Caffe)."""
    return all(float(v).is_integer() for layer in net.layer if layer.type == "PriorBox"
               for v in list(layer.prior_box_param.min_size) + list(layer.prior_box_param.max_size))


def without_result_files(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """A copy without DetectionOutput's save_output_param (result files need the dataset's label
    map and name-size files, which Caffe and deeper-ssd require to exist; OpenCV ignores them)."""
    copy = caffe_pb2.NetParameter()
    copy.CopyFrom(net)
    for layer in copy.layer:
        layer.detection_output_param.ClearField("save_output_param")
    return copy


def _downstream_of(net: caffe_pb2.NetParameter, layer_type: str) -> List[str]:
    """Names of the layers of ``layer_type`` and of every layer that reads what they produce."""
    blobs, names = set(), []
    for layer in net.layer:
        if layer.type == layer_type or any(b in blobs for b in layer.bottom):
            names.append(layer.name)
            blobs.update(layer.top)
    return names


@dataclass
class LayerDifference:
    """One compared layer output: its shape, the largest |ours − OpenCV| and the largest |ours|.
    For DetectionOutput the rows are compared as sets (see :func:`_detection_difference`); a row
    without a partner gives an infinite difference (``note`` says how many each found)."""
    layer: str
    type: str
    shape: Tuple[int, ...]
    max_abs_diff: float
    max_abs: float
    note: str = ""

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.max_abs, 1e-12)


@dataclass
class Comparison:
    """The result of :func:`compare`: compared layers in net order and the skipped ones."""
    layers: List[LayerDifference]
    skipped: List[str]

    def worst(self) -> LayerDifference:
        return max(self.layers, key=lambda d: d.relative)

    def failures(self, rtol: float) -> List[LayerDifference]:
        return [d for d in self.layers if not d.relative <= rtol]


def _difference(name: str, layer_type: str, ours: np.ndarray, theirs: np.ndarray) -> LayerDifference:
    if layer_type == "DetectionOutput":
        return _detection_difference(name, np.asarray(ours).reshape(-1, 7), np.asarray(theirs).reshape(-1, 7))
    theirs = np.asarray(theirs).reshape(ours.shape)
    return LayerDifference(name, layer_type, tuple(ours.shape), float(np.abs(ours - theirs).max(initial=0)),
                           float(np.abs(ours).max(initial=0)))


def _detection_difference(name: str, a: np.ndarray, b: np.ndarray, tie: float = 1e-4) -> LayerDifference:
    """Detections ``a`` (ours) and ``b`` (OpenCV), rows (image, label, score, x1, y1, x2, y2), are
    compared as sets: every row must have a partner of the same image and label on the other
    side, except the lowest-scoring row(s) (within ``tie``) of each image and label. Those are the
    rows a near-tie at a cut-off decides — the confidence threshold, the per-class top_k before
    NMS and the per-image keep_top_k all drop a class's lowest scores first — so two correct
    implementations may keep different ones; ``note`` counts them."""
    a_tail, b_tail = _class_tail(a, tie), _class_tail(b, tie)
    distance = max(_nearest_row_distance(a[~a_tail], b), _nearest_row_distance(b[~b_tail], a))
    unpaired = (_unpaired_count(a[a_tail], b), _unpaired_count(b[b_tail], a))
    note = ""
    if len(a) != len(b) and distance > 0:
        note = f"{len(a)} detections, OpenCV {len(b)}"
    elif any(unpaired):
        note = f"{unpaired[0]} vs OpenCV {unpaired[1]} lowest-score rows of a class differ (cut-off near-ties)"
    return LayerDifference(name, "DetectionOutput", a.shape, distance, float(np.abs(a).max(initial=0)), note)


def _class_tail(rows: np.ndarray, tie: float) -> np.ndarray:
    """Mask of the rows scoring within ``tie`` of the lowest score of their (image, label)."""
    tail = np.zeros(len(rows), dtype=bool)
    for key in {(r[0], r[1]) for r in rows}:
        group = (rows[:, 0] == key[0]) & (rows[:, 1] == key[1])
        tail |= group & (rows[:, 2] <= rows[group, 2].min() + tie)
    return tail


def _row_distances(rows: np.ndarray, other: np.ndarray) -> np.ndarray:
    """For each row, the max-abs distance over the 7 columns to its nearest row of ``other``
    (rows of another image or label are infinitely far)."""
    if not len(other):
        return np.full(len(rows), np.inf)
    far = np.abs(rows[:, None, :] - other[None, :, :]).max(axis=2)
    far[(rows[:, None, 0] != other[None, :, 0]) | (rows[:, None, 1] != other[None, :, 1])] = np.inf
    return far.min(axis=1)


def _nearest_row_distance(rows: np.ndarray, other: np.ndarray) -> float:
    return float(_row_distances(rows, other).max(initial=0))


def _unpaired_count(rows: np.ndarray, other: np.ndarray, atol: float = 1e-3) -> int:
    return int((_row_distances(rows, other) > atol).sum())


def compare(deploy: Union[str, Path, caffe_pb2.NetParameter], weights: Optional[Union[str, Path]] = None,
            seed: int = 0, batch: int = 1) -> Comparison:
    """Run ``deploy`` (its weights from ``weights``, else deeper-ssd's fillers seeded by ``seed``)
    in deeper-ssd and in OpenCV on one input of ``batch`` images drawn uniformly from [-120, 130]
    (a mean-subtracted image) and compare every layer (see the module docstring).
    DetectionOutput's result files are switched off. Raises OpenCVUnsupported first when OpenCV cannot run the net."""
    import cv2
    origin = str(deploy) if not isinstance(deploy, caffe_pb2.NetParameter) else f"net '{deploy.name}'"
    net_param = deploy if isinstance(deploy, caffe_pb2.NetParameter) else io.read_net(deploy)
    refuse_unsupported(net_param, origin)
    net_param = without_result_files(net_param)
    net = Net(net_param, "TEST", seed=seed)
    if weights is not None:
        net.load_caffemodel(weights)
    data = net.inputs[0]
    shape = (batch,) + tuple(net.blob_shapes[data][1:])
    x = np.random.default_rng(seed).uniform(-120, 130, shape).astype(np.float32)

    outputs = {}
    following = {a.name: b.name for a, b in zip(net.layers, list(net.layers)[1:])}

    def keep(layer, args, out):        # copies: a later in-place layer overwrites its bottom
        first = out[0] if isinstance(out, tuple) else out
        # a BatchNorm the net runs together with the Scale after it gets that Scale's blobs as
        # extra arguments and returns the Scale's output: compare it under the Scale's name
        name = following[layer.name] if len(args) > len(layer.lp.bottom) else layer.name
        outputs[name] = first.detach().clone().numpy()

    hooks = [layer.register_forward_hook(keep) for layer in net.layers]
    try:
        with torch.no_grad():
            net(**{data: torch.from_numpy(x)})
    finally:
        for hook in hooks:
            hook.remove()
    skipped = [] if has_integer_prior_sizes(net_param) else _downstream_of(net_param, "PriorBox")
    compared = [layer for layer in net.layers if layer.caffe_type != "Input" and layer.name not in skipped
                and layer.name in outputs]
    with tempfile.TemporaryDirectory() as tmp:
        prototxt, model = Path(tmp) / "deploy.prototxt", Path(tmp) / "weights.caffemodel"
        io.write_net(net_param, prototxt)
        net.save_caffemodel(model)
        cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), str(model))
        cv_net.setInput(x, data)
        theirs = cv_net.forward([layer.name for layer in compared])
    if len(theirs) != len(compared):
        raise RuntimeError(f"OpenCV returned {len(theirs)} outputs for {len(compared)} requested layers")
    rows = [_difference(layer.name, layer.caffe_type, outputs[layer.name], other)
            for layer, other in zip(compared, theirs)]
    return Comparison(rows, skipped)
