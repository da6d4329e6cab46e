"""ONNX export of a deploy net (``deeper-ssd export``): the network as one ONNX graph that ONNX
Runtime (or TensorRT, or an edge runtime) runs without this package.

The graph is the fast path's traced part (:mod:`deeper_ssd.fast`), exported from the same
layers at the deploy net's input shape (static): inputs are the net's input blobs; outputs are
the three blobs DetectionOutput reads (``mbox_loc``, ``mbox_conf`` as probabilities, and
``mbox_priorbox``, a constant of the graph) plus ``boxes``, the decoded boxes
``[N, K, L, 4]`` (:func:`deeper_ssd.box.decode` with the layer's code type and variances;
``L`` = 1 with ``share_location``).

With ``nms`` the graph goes on to DetectionOutput as ONNX operators (:class:`_Detections`):
per class the ``top_k`` best scores (TopK), ONNX ``NonMaxSuppression`` on each class's
candidates (suppressing IoU > ``nms_threshold``, scores > ``confidence_threshold``), then the
``keep_top_k`` best kept boxes of each image across classes (TopK). Output ``detections``
``[N, R, 7]`` rows ``[image, label, score, xmin, ymin, xmax, ymax]``, R = ``keep_top_k`` (or
every candidate without it), best score first, rows past an image's last detection all -1.
Where it cannot equal Caffe's DetectionOutput (docs/decisions.md): ONNX Runtime orders equal
scores its own way inside NMS and degenerate boxes in its IoU; ``eta < 1`` (adaptive NMS)
and ``share_location: false`` are refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

import torch

from . import box
from .fast import FastNet, onnx_bytes
from .net import Net

__all__ = ["ExportError", "export_onnx"]

_INF = float("inf")


class ExportError(ValueError):
    """The net cannot be exported (no DetectionOutput, layers that do not trace)."""


class _WithBoxes(torch.nn.Module):
    """The traced part followed by the decode of DetectionOutput's boxes (and with ``nms``
    DetectionOutput as ONNX operators)."""

    def __init__(self, traced: torch.nn.Module, layer, indices: List[int], nms: bool):
        super().__init__()
        self.traced, self.layer = traced, layer
        self.loc_index, self.conf_index, self.prior_index = indices
        self.detections = _Detections(layer) if nms else None

    def forward(self, *inputs):
        outs = self.traced(*inputs)
        loc, prior = outs[self.loc_index], outs[self.prior_index]
        k, nl = self.layer.num_priors, self.layer.loc_classes
        boxes = box.decode(prior[0, 0].view(k, 1, 4), prior[0, 1].view(k, 1, 4), loc.view(-1, k, nl, 4),
                           self.layer.code_type, self.layer.variance_encoded_in_target)
        if self.detections is None:
            return (*outs, boxes)
        return (*outs, boxes, self.detections(boxes, outs[self.conf_index]))


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` in an exported graph (``boxes [B, T, 4]``, ``scores [B, 1, T]``
    -> selected ``[M, 3]``: problem, 0, candidate). Only its ONNX form is ever run."""

    @staticmethod
    def forward(ctx, boxes, scores, count: int, iou: float, score: float):
        return torch.zeros(0, 3, dtype=torch.long, device=boxes.device)

    @staticmethod
    def symbolic(g, boxes, scores, count: int, iou: float, score: float):
        def const(value, dtype):
            return g.op("Constant", value_t=torch.tensor([value], dtype=dtype))
        return g.op("NonMaxSuppression", boxes, scores, const(count, torch.long), const(iou, torch.float),
                    const(score, torch.float))


class _Detections(torch.nn.Module):
    """DetectionOutput (share_location, eta 1) as ONNX operators on the decoded boxes
    ``[N, K, 1, 4]`` and ``conf [N, K*C]`` probabilities -> ``[N, R, 7]`` (module docstring)."""

    def __init__(self, layer):
        super().__init__()
        if not layer.share_location:
            raise ExportError(f"layer '{layer.name}': share_location: false is not exported with NMS; "
                              "give --no-nms")
        if layer.eta < 1:
            raise ExportError(f"layer '{layer.name}': eta < 1 (adaptive NMS) has no ONNX operator; "
                              "give --no-nms")
        self.layer = layer
        self.register_buffer("classes", torch.tensor(
            [c for c in range(layer.num_classes) if c != layer.background_label_id], dtype=torch.long))

    def forward(self, boxes, conf):
        layer, classes = self.layer, self.classes
        n, k, nc = boxes.shape[0], layer.num_priors, len(self.classes)
        boxes = boxes.view(n, 1, k, 4).float()
        scores = conf.float().view(n, k, layer.num_classes).transpose(1, 2).index_select(1, classes)
        t = k if layer.top_k < 0 else min(layer.top_k, k)
        top, order = scores.topk(t, dim=-1)                                            # [N, C', T]
        cand = boxes.expand(n, nc, k, 4).gather(2, order.unsqueeze(-1).expand(n, nc, t, 4))
        threshold = max(layer.confidence_threshold, -3.0e38)
        chosen = _NonMaxSuppression.apply(cand.reshape(n * nc, t, 4), top.reshape(n * nc, 1, t), t,
                                          layer.nms_threshold, threshold)
        keep = torch.zeros(n * nc, t, dtype=torch.bool, device=boxes.device)
        keep[chosen[:, 0], chosen[:, 2]] = True
        ranked = torch.where(keep.view(n, nc * t), top.reshape(n, nc * t), -_INF)
        r = nc * t if layer.keep_top_k < 0 else min(layer.keep_top_k, nc * t)
        best, flat = ranked.topk(r, dim=-1)                                             # [N, R]
        label = classes[flat // t].float()
        image = torch.arange(n, device=boxes.device).view(n, 1).expand(n, r).float()
        corners = cand.reshape(n, nc * t, 4).gather(1, flat.unsqueeze(-1).expand(n, r, 4))
        rows = torch.cat([torch.stack([image, label, best], -1), corners], -1)
        return torch.where((best > -_INF).unsqueeze(-1), rows, torch.full_like(rows, -1.0))


def export_onnx(net: Net, out: Union[str, Path], nms: bool = False, batch: Optional[int] = None) -> List[str]:
    """Write ``net`` (a TEST-phase deploy net with one DetectionOutput) as an ONNX model at
    ``out``, without DetectionOutput or (``nms``) with it as ONNX operators, for inputs of the
    net's shapes (batch size ``batch`` if given); returns the output names (DetectionOutput's
    bottoms, ``boxes``, then ``detections`` with ``nms``)."""
    layers = [layer for layer in net.layers if layer.caffe_type == "DetectionOutput"]
    if len(layers) != 1:
        raise ExportError(f"net '{net.name}' needs exactly one DetectionOutput layer, has {len(layers)}")
    layer = layers[0]
    loc, conf, prior = list(layer.lp.bottom)[:3]
    fast = FastNet(net.eval(), backend="torchscript", extra_outputs=list(layer.lp.bottom)[:3])
    input_names, names = fast.blob_names()
    missing = [name for name in layer.lp.bottom[:3] if name not in names]
    if fast.fallback or missing:
        raise ExportError(f"net '{net.name}': {fast.fallback or 'blobs ' + ', '.join(missing) + ' are not traced'}")
    if batch is not None and batch < 1:
        raise ExportError(f"batch size {batch} must be >= 1")
    inputs = [torch.zeros(((batch,) if batch else tuple(net.blob_shapes[name][:1])) + tuple(net.blob_shapes[name][1:]),
                          device=net.device) for name in input_names]
    traced = fast.traced_part()
    with torch.no_grad():
        traced(*inputs)                                       # records PriorBox outputs as constants
    module = _WithBoxes(traced, layer, [names.index(b) for b in (loc, conf, prior)], nms).eval()
    outputs = names + ["boxes"] + (["detections"] if nms else [])
    try:
        data = onnx_bytes(module, inputs, input_names, outputs)
    except Exception as err:  # noqa: BLE001 - the exporter's errors name the operator
        raise ExportError(f"net '{net.name}': {type(err).__name__}: {str(err).splitlines()[0]}") from None
    Path(out).write_bytes(data)
    return outputs
