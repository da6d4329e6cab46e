"""Static shape inference over a NetParameter, using each layer type's own shape rule.

:func:`plan_net` walks a net exactly as Caffe's ``Net::Init`` does (NetState include/exclude
filtering, legacy input upgrade, in-place tops, "produced by multiple sources" and unknown
bottom checks) and instantiates every layer with its bottom shapes. ``deeper_ssd.net.Net`` builds
its execution plan with it on a real device; :func:`infer_shapes` runs it on the ``meta``
device (no memory for weights) for the ``deeper-ssd sizes`` table.
"""
from __future__ import annotations

import csv
import io as _io
import json
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

from . import io
from .layers import Layer, LayerError, Shape, format_shape, registry
from .proto import caffe_pb2

__all__ = ["PlannedLayer", "NetPlan", "plan_net", "net_state", "layer_included", "infer_shapes",
           "LayerRow", "format_table"]


@dataclass
class PlannedLayer:
    """One layer of a filtered net with the blob names it reads and writes."""
    layer: Layer
    bottoms: List[str]
    tops: List[str]


@dataclass
class NetPlan:
    """The filtered, upgraded net: its layers in order, every blob's shape, the output blobs."""
    net_param: caffe_pb2.NetParameter
    layers: List[PlannedLayer]
    blob_shapes: Dict[str, Shape]
    outputs: List[str]


def net_state(net_param: caffe_pb2.NetParameter, phase: int, level: Optional[int] = None,
              stages: Iterable[str] = ()) -> caffe_pb2.NetState:
    """The NetState a net runs in: the file's own state with ``phase`` (and level/stages) applied."""
    state = caffe_pb2.NetState()
    state.CopyFrom(net_param.state)
    state.phase = phase
    if level is not None:
        state.level = level
    state.stage.extend(s for s in stages if s not in state.stage)
    return state


def _rule_matches(state: caffe_pb2.NetState, rule: caffe_pb2.NetStateRule) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    return all(s in state.stage for s in rule.stage) and not any(s in state.stage for s in rule.not_stage)


def layer_included(layer: caffe_pb2.LayerParameter, state: caffe_pb2.NetState) -> bool:
    """Caffe's FilterNet rule: include rules need one match; otherwise no exclude rule may match."""
    if len(layer.include) and len(layer.exclude):
        raise LayerError(f"layer '{layer.name}': specify include or exclude rules, not both")
    if len(layer.include):
        return any(_rule_matches(state, rule) for rule in layer.include)
    return not any(_rule_matches(state, rule) for rule in layer.exclude)


def plan_net(net_param: caffe_pb2.NetParameter, phase: int = caffe_pb2.TEST, *,
             device=None, level: Optional[int] = None, stages: Sequence[str] = (),
             input_shapes: Optional[Dict[str, Sequence[int]]] = None) -> NetPlan:
    """Filter, upgrade and instantiate every layer of ``net_param`` for ``phase``.

    ``input_shapes`` overrides the shapes of tops made by source layers (Input, data layers),
    e.g. ``{"data": (8, 3, 300, 300)}``. Raises LayerError naming the first offending layer.
    """
    net_param = io.upgrade_net(net_param)
    state = net_state(net_param, phase, level, stages)
    overrides = {name: tuple(int(d) for d in shape) for name, shape in (input_shapes or {}).items()}
    shapes: Dict[str, Shape] = {}
    consumed: Dict[str, bool] = {}
    planned: List[PlannedLayer] = []
    names = set()
    for lp in net_param.layer:
        if not layer_included(lp, state):
            continue
        if lp.name in names:
            raise LayerError(f"layer name '{lp.name}' is used twice")
        names.add(lp.name)
        for bottom in lp.bottom:
            if bottom not in shapes:
                raise LayerError(f"layer '{lp.name}' ({lp.type}): unknown bottom blob '{bottom}' "
                                 f"(no earlier layer in phase {caffe_pb2.Phase.Name(phase)} produces it)")
        layer_phase = lp.phase if lp.HasField("phase") else phase
        cls = registry.get(lp.type, lp.name)
        layer = cls(lp, [shapes[b] for b in lp.bottom], layer_phase, device=device)
        for bottom in lp.bottom:
            consumed[bottom] = True
        for i, top in enumerate(lp.top):
            in_place = i < len(lp.bottom) and lp.bottom[i] == top
            if top in shapes and not in_place:
                raise LayerError(f"layer '{lp.name}': top blob '{top}' is produced by multiple sources")
            shape = layer.top_shapes[i]
            if cls.is_source and top in overrides:
                shape = layer.top_shapes[i] = overrides.pop(top)
            if any(int(d) == 0 for d in shape):                 # no torch op takes it
                raise LayerError(f"layer '{lp.name}' ({lp.type}): top '{top}' would be empty "
                                 f"({format_shape(shape)})")
            shapes[top] = shape
            consumed[top] = False
        planned.append(PlannedLayer(layer, list(lp.bottom), list(lp.top)))
    if overrides:
        raise LayerError(f"input shape given for {', '.join(overrides)}, which no input layer produces")
    outputs = [name for name, used in consumed.items() if not used]
    return NetPlan(net_param, planned, shapes, outputs)


# ---------------------------------------------------------------------------------------------
# the sizes table

@dataclass
class LayerRow:
    """One row of the sizes table."""
    name: str
    type: str
    geometry: str
    bottoms: List[str]
    tops: List[str]
    shapes: List[Shape]
    params: int
    macs: int
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return ", ".join(format_shape(s) for s in self.shapes)


def _pair(values) -> str:
    a, b = values
    return str(a) if a == b else f"{a}x{b}"


def _geometry(layer: Layer) -> str:
    """``kernel/stride/pad`` (``/dN`` when dilated) for convolution-like layers, else ''."""
    kernel = getattr(layer, "kernel", None)
    if kernel is None:
        return ""
    text = f"{kernel[0]}x{kernel[1]}/{_pair(layer.stride)}/{_pair(layer.pad)}"
    dilation = getattr(layer, "dilation", (1, 1))
    if tuple(dilation) != (1, 1):
        text += f"/d{_pair(dilation)}"
    return text


def infer_shapes(net_param: caffe_pb2.NetParameter, phase: int = caffe_pb2.TEST,
                 input_shapes: Optional[Dict[str, Sequence[int]]] = None,
                 level: Optional[int] = None, stages: Sequence[str] = ()) -> List[LayerRow]:
    """Static shapes, learnable parameter counts and multiply-accumulates of every layer."""
    plan = plan_net(net_param, phase, device="meta", level=level, stages=stages,
                    input_shapes=input_shapes)
    rows = []
    for step in plan.layers:
        layer = step.layer
        params = sum(b.numel() for b in layer.blobs if b.requires_grad)
        rows.append(LayerRow(layer.name, layer.caffe_type, _geometry(layer), step.bottoms, step.tops,
                             list(layer.top_shapes), params, layer.macs()))
    return rows


def format_table(rows: List[LayerRow], fmt: str = "md") -> str:
    """Render rows as a Markdown table, CSV or JSON, with totals."""
    total_params = sum(r.params for r in rows)
    total_macs = sum(r.macs for r in rows)
    if fmt == "json":
        return json.dumps({
            "layers": [{"name": r.name, "type": r.type, "geometry": r.geometry, "bottoms": r.bottoms,
                        "tops": r.tops, "shapes": [list(s) for s in r.shapes], "params": r.params,
                        "macs": r.macs} for r in rows],
            "total": {"params": total_params, "macs": total_macs},
        }, indent=1)
    header = ["layer", "type", "k/s/p", "output", "params", "MACs"]
    body = [[r.name, r.type, r.geometry, r.output, str(r.params), str(r.macs)] for r in rows]
    footer = ["total", "", "", "", str(total_params), str(total_macs)]
    if fmt == "csv":
        buffer = _io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerows([header] + body + [footer])
        return buffer.getvalue().rstrip("\n")
    if fmt != "md":
        raise ValueError(f"unknown format {fmt!r} (md, csv or json)")
    widths = [max(len(row[i]) for row in [header] + body + [footer]) for i in range(len(header))]
    numeric = {4, 5}

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else "-" * (w + 2)
                          for i, w in enumerate(widths)) + "|"
    summary = f"\n{total_params / 1e6:.3f} M learnable parameters, {total_macs / 1e9:.3f} G multiply-accumulates"
    return "\n".join([line(header), rule] + [line(r) for r in body] + [line(footer)]) + summary
