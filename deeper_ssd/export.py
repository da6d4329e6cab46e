"""ONNX export of a deploy net (``deeper-ssd export``): the network up to DetectionOutput as one
ONNX graph that ONNX Runtime (or TensorRT, or an edge runtime) runs without this package.

The graph is the fast path's traced part (:mod:`deeper_ssd.fast`), exported from the same
layers at the deploy net's input shape (static): inputs are the net's input blobs; outputs are
the three blobs DetectionOutput reads (``mbox_loc``, ``mbox_conf`` as probabilities, and
``mbox_priorbox``, a constant of the graph) plus ``boxes``, the decoded boxes
``[N, K, L, 4]`` (:func:`deeper_ssd.box.decode` with the layer's code type and variances;
``L`` = 1 with ``share_location``). DetectionOutput itself (top_k, greedy NMS with Caffe's
tie order and ``eta``, keep_top_k across classes) is not exported: it stays
:class:`deeper_ssd.layers.detection_output.DetectionOutput`, which runs on these outputs.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Union

import torch

from . import box
from .fast import FastNet, onnx_bytes
from .net import Net

__all__ = ["ExportError", "export_onnx"]


class ExportError(ValueError):
    """The net cannot be exported (no DetectionOutput, layers that do not trace)."""


class _WithBoxes(torch.nn.Module):
    """The traced part followed by the decode of DetectionOutput's boxes."""

    def __init__(self, traced: torch.nn.Module, layer, loc_index: int, prior_index: int):
        super().__init__()
        self.traced, self.layer = traced, layer
        self.loc_index, self.prior_index = loc_index, prior_index

    def forward(self, *inputs):
        outs = self.traced(*inputs)
        loc, prior = outs[self.loc_index], outs[self.prior_index]
        k, nl = self.layer.num_priors, self.layer.loc_classes
        boxes = box.decode(prior[0, 0].view(k, 1, 4), prior[0, 1].view(k, 1, 4), loc.view(-1, k, nl, 4),
                           self.layer.code_type, self.layer.variance_encoded_in_target)
        return (*outs, boxes)


def export_onnx(net: Net, out: Union[str, Path]) -> List[str]:
    """Write ``net`` (a TEST-phase deploy net with one DetectionOutput) without DetectionOutput
    as an ONNX model at ``out``; returns the output names (DetectionOutput's bottoms, then
    ``boxes``)."""
    layers = [layer for layer in net.layers if layer.caffe_type == "DetectionOutput"]
    if len(layers) != 1:
        raise ExportError(f"net '{net.name}' needs exactly one DetectionOutput layer, has {len(layers)}")
    layer = layers[0]
    loc, _, prior = list(layer.lp.bottom)[:3]
    fast = FastNet(net.eval(), backend="torchscript", extra_outputs=list(layer.lp.bottom)[:3])
    input_names, names = fast.blob_names()
    missing = [name for name in layer.lp.bottom[:3] if name not in names]
    if fast.fallback or missing:
        raise ExportError(f"net '{net.name}': {fast.fallback or 'blobs ' + ', '.join(missing) + ' are not traced'}")
    inputs = [torch.zeros(net.blob_shapes[name], device=net.device) for name in input_names]
    traced = fast.traced_part()
    with torch.no_grad():
        traced(*inputs)                                       # records PriorBox outputs as constants
    module = _WithBoxes(traced, layer, names.index(loc), names.index(prior)).eval()
    try:
        data = onnx_bytes(module, inputs, input_names, names + ["boxes"])
    except Exception as err:  # noqa: BLE001 - the exporter's errors name the operator
        raise ExportError(f"net '{net.name}': {type(err).__name__}: {str(err).splitlines()[0]}") from None
    Path(out).write_bytes(data)
    return names + ["boxes"]
