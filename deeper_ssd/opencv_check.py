"""A deploy net against OpenCV's Caffe importer (``cv2.dnn.readNetFromCaffe``, OpenCV < 5).

:func:`unsupported_layers` lists the layers OpenCV cannot run: every layer type of deeper-ssd's
own (its parameter message sits in LayerParameter 7700–7799: SR-TOD, ZoomInNet). OpenCV parses
such a file — it skips fields it does not know — and only fails at its first forward ("Can't
create layer"), so :func:`refuse_unsupported` says so up front. :func:`compare` runs one seeded
random input through both executors on the same weights and reports the largest difference of
the detection head's inputs (``mbox_loc``, ``mbox_conf_flatten``, ``mbox_priorbox``) or, in a
net without DetectionOutput, of its outputs.
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
           "Difference", "compare"]

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


@dataclass
class Difference:
    """One compared blob: its shape, the largest |ours − OpenCV| and the largest |ours|."""
    blob: str
    shape: Tuple[int, ...]
    max_abs_diff: float
    max_abs: float

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.max_abs, 1e-12)


def _compared_blobs(net: caffe_pb2.NetParameter, outputs: List[str]) -> List[str]:
    detection = [layer for layer in net.layer if layer.type == "DetectionOutput"]
    if not detection:
        return outputs
    blobs = []
    for layer in detection:
        blobs += [b for b in layer.bottom if b not in blobs]
    return blobs


def compare(deploy: Union[str, Path, caffe_pb2.NetParameter], weights: Optional[Union[str, Path]] = None,
            seed: int = 0) -> List[Difference]:
    """Run ``deploy`` (its weights from ``weights``, else our seeded fillers) in deeper-ssd and in
    OpenCV on one input drawn uniformly from [-120, 130] (a mean-subtracted image); returns the
    differences of the compared blobs (see the module docstring). DetectionOutput's result files
    are switched off. Raises OpenCVUnsupported first when OpenCV cannot run the net."""
    import cv2
    origin = str(deploy) if not isinstance(deploy, caffe_pb2.NetParameter) else f"net '{deploy.name}'"
    net_param = deploy if isinstance(deploy, caffe_pb2.NetParameter) else io.read_net(deploy)
    refuse_unsupported(net_param, origin)
    net_param = type(net_param).FromString(net_param.SerializeToString())
    for layer in net_param.layer:
        layer.detection_output_param.ClearField("save_output_param")
    net = Net(net_param, "TEST", seed=seed)
    if weights is not None:
        net.load_caffemodel(weights)
    data = net.inputs[0]
    shape = net.blob_shapes[data]
    x = np.random.default_rng(seed).uniform(-120, 130, shape).astype(np.float32)
    blobs = _compared_blobs(net_param, net.outputs)
    producer = {top: layer.name for layer in net_param.layer for top in layer.top}
    with tempfile.TemporaryDirectory() as tmp:
        prototxt, model = Path(tmp) / "deploy.prototxt", Path(tmp) / "weights.caffemodel"
        io.write_net(net_param, prototxt)
        net.save_caffemodel(model)
        cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), str(model))
        cv_net.setInput(x, data)
        theirs = cv_net.forward([producer[b] for b in blobs])
    with torch.no_grad():
        ours = net(keep_blobs=True, **{data: torch.from_numpy(x)})
    rows = []
    for blob, other in zip(blobs, theirs):
        mine = net.blobs[blob].numpy() if blob in net.blobs else ours[blob].numpy()
        other = np.asarray(other).reshape(mine.shape)
        rows.append(Difference(blob, tuple(mine.shape), float(np.abs(mine - other).max()),
                               float(np.abs(mine).max())))
    return rows
