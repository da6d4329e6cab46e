"""``deeper-ssd time``: Caffe's ``caffe time`` benchmark for a net, per layer and in total.

One untimed forward + backward warms up; then every iteration runs

* the net's forward with a timer around each layer (synchronising CUDA at both ends) and one
  around the whole pass, as Caffe's forward timer includes its per-layer timers;
* the whole net's backward, timed as one: the "backward pass" total. As in Caffe it starts
  from the loss (the weighted loss tops) and reaches the layers the loss depends on; a net
  with ``force_backward: true`` starts from every output (top gradient 1) and covers every
  layer, a net with neither has no backward;
* each of those layers' backward on its own: the layer is run again on the bottoms it saw in
  the timed forward (untimed) and only the gradient computation (bottoms that needed a
  gradient in the net, learnable blobs) is timed, as Caffe times ``Layer::Backward``.

So per-layer backward times add up to about the total but not exactly (autograd runs the whole
graph at once). Averages are in milliseconds per iteration. A layer the net runs fused into the
one before it (BatchNorm + in-place Scale) has no time of its own and says so. Source layers
(Input, AnnotatedData) are fed synthetic tensors: images uniform in [-128, 128) and, for label
tops, ``boxes_per_image`` random ground-truth boxes per image; no database is read, so the
timing is the net's, not the reader's (Caffe's data layers prefetch in a thread, and
``caffe time`` only sees the copy out of the prefetch queue). In TRAIN, BatchNorm running
statistics update at every forward, the per-layer reruns included: time a net whose statistics
you do not need.
"""
from __future__ import annotations

import csv
import io as _io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from . import io, shapes
from .layers import LayerError
from .net import Net
from .proto import caffe_pb2

__all__ = ["TimingError", "LayerTiming", "NetTiming", "synthetic_inputs", "time_net", "format_timing", "time_file"]


class TimingError(ValueError):
    """Bad arguments to :func:`time_net` / :func:`time_file` (one line for the user)."""


@dataclass
class LayerTiming:
    """Average milliseconds of one layer per iteration."""
    name: str
    type: str
    forward_ms: float = 0.0
    backward_ms: float = 0.0
    note: str = ""


@dataclass
class NetTiming:
    """The result of :func:`time_net`: layers in net order and the pass totals (ms/iteration)."""
    layers: List[LayerTiming]
    forward_ms: float
    backward_ms: float
    iterations: int
    device: str
    phase: str
    inputs: Dict[str, List[int]] = field(default_factory=dict)
    backward_from: str = "the loss"

    @property
    def forward_backward_ms(self) -> float:
        return self.forward_ms + self.backward_ms


def _num_classes(net: Net) -> int:
    for layer in net.layers:
        if layer.caffe_type == "MultiBoxLoss":
            return layer.lp.multibox_loss_param.num_classes
    return 2


def synthetic_inputs(net: Net, boxes_per_image: int = 4, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A tensor for every source-layer top of ``net``: uniform [-128, 128) values of the top's
    shape, or for a label top (``1 x 1 x ? x 8``) ``boxes_per_image`` boxes per image of the batch
    as ``[item, label, instance, xmin, ymin, xmax, ymax, difficult]`` rows, labels 1..C-1."""
    generator = torch.Generator().manual_seed(seed)
    batch = next((net.blob_shapes[n][0] for n in net.inputs if -1 not in net.blob_shapes[n]), 1)
    inputs = {}
    for name in net.inputs:
        shape = net.blob_shapes[name]
        if -1 not in shape:
            inputs[name] = torch.rand(shape, generator=generator) * 256 - 128
            continue
        count = batch * boxes_per_image
        centre = torch.rand(count, 2, generator=generator) * 0.8 + 0.1
        size = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        rows = torch.zeros(count, 8)
        rows[:, 0] = torch.arange(count) // boxes_per_image
        rows[:, 1] = torch.randint(1, max(_num_classes(net), 2), (count,), generator=generator).float()
        rows[:, 3:5] = (centre - size / 2).clamp(0, 1)
        rows[:, 5:7] = (centre + size / 2).clamp(0, 1)
        inputs[name] = rows.reshape(1, 1, count, 8)
    return {name: tensor.to(net.device) for name, tensor in inputs.items()}


class _Clock:
    """Wall-clock milliseconds that wait for queued CUDA work first."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() * 1000.0


def _tensor_outputs(value) -> List[torch.Tensor]:
    values = value if isinstance(value, (tuple, list)) else (value,)
    return [v for v in values if isinstance(v, torch.Tensor) and v.requires_grad]


def _layer_backward_ms(layer, args, clock: _Clock) -> float:
    """Run ``layer`` on detached copies of ``args`` (untimed) and time only its backward."""
    inputs = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    overwrite, layer.overwrite_bottom = layer.overwrite_bottom, False
    try:
        with torch.enable_grad():
            outputs = _tensor_outputs(layer(*inputs))
    finally:
        layer.overwrite_bottom = overwrite
    targets = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    targets += [b for b in layer.blobs if b.requires_grad]
    if not outputs or not targets:
        return 0.0
    grads = [torch.ones_like(o) for o in outputs]
    start = clock.now()
    torch.autograd.grad(outputs, targets, grads, allow_unused=True)
    return clock.now() - start


def _backward_layers(net: Net, force_backward: bool) -> set:
    """Names of the layers Caffe's backward runs: those the loss tops depend on, or every layer
    with ``force_backward``."""
    if force_backward:
        return {layer.name for layer in net.layers}
    blobs, needed = set(net.loss_weights), set()
    for layer in reversed(net.layers):
        if any(top in blobs for top in layer.lp.top):
            needed.add(layer.name)
            blobs.update(layer.lp.bottom)
    return needed


def time_net(net: Net, iterations: int = 50, inputs: Optional[Dict[str, torch.Tensor]] = None,
             force_backward: bool = False) -> NetTiming:
    """Average forward and backward milliseconds of every layer of ``net`` and of the whole
    passes over ``iterations`` iterations (module docstring); ``inputs`` feed the source layers
    (default :func:`synthetic_inputs`). As in Caffe, backward starts from the loss and covers
    the layers it depends on; ``force_backward`` (the NetParameter field) makes it start from
    every output (top gradient 1) and cover every layer."""
    if iterations < 1:
        raise TimingError(f"iterations must be at least 1, got {iterations}")
    inputs = synthetic_inputs(net) if inputs is None else inputs
    backward_layers = _backward_layers(net, force_backward)
    clock = _Clock(net.device)
    rows = {layer.name: LayerTiming(layer.name, layer.caffe_type) for layer in net.layers}
    seen: Dict[str, list] = {}
    started: Dict[str, float] = {}

    def before(layer, args):
        seen[layer.name] = list(args)
        started[layer.name] = clock.now()

    def after(layer, args, output):
        rows[layer.name].forward_ms += clock.now() - started[layer.name]

    def run_backward(outputs) -> None:
        tensors = _tensor_outputs(list(outputs.values())) if force_backward else _tensor_outputs(outputs.loss)
        if tensors:
            torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])

    run_backward(net(**inputs))                                          # warm-up
    net.zero_grad(set_to_none=True)
    hooks = [h for layer in net.layers
             for h in (layer.register_forward_pre_hook(before), layer.register_forward_hook(after))]
    forward_ms = backward_ms = 0.0
    try:
        for _ in range(iterations):
            seen.clear()
            start = clock.now()
            outputs = net(**inputs)
            forward_ms += clock.now() - start
            start = clock.now()
            run_backward(outputs)
            backward_ms += clock.now() - start
            del outputs
            net.zero_grad(set_to_none=True)
            for layer in net.layers:
                if layer.name in seen and layer.name in backward_layers and not layer.is_source:
                    rows[layer.name].backward_ms += _layer_backward_ms(layer, seen[layer.name], clock)
            net.zero_grad(set_to_none=True)
    finally:
        for hook in hooks:
            hook.remove()
    for layer in net.layers:
        row = rows[layer.name]
        row.forward_ms /= iterations
        row.backward_ms /= iterations
        if layer.name not in seen:
            row.note = "fed (synthetic input)" if layer.is_source else "fused into the layer before"
    backward_from = ("every output (force_backward)" if force_backward else
                     "the loss" if net.loss_weights else "nothing (no loss and no force_backward, as in Caffe)")
    return NetTiming(list(rows.values()), forward_ms / iterations, backward_ms / iterations, iterations,
                     str(net.device), caffe_pb2.Phase.Name(net.phase),
                     {name: list(t.shape) for name, t in inputs.items()}, backward_from)


def format_timing(result: NetTiming, fmt: str = "md") -> str:
    """Render as a Markdown table, CSV or JSON: one row per layer, then the pass totals."""
    both = f"forward + backward {result.forward_backward_ms:.3f} ms"
    if fmt == "json":
        return json.dumps({"iterations": result.iterations, "device": result.device, "phase": result.phase,
                           "inputs": result.inputs, "backward_from": result.backward_from, "layers": [asdict(r) for r in result.layers],
                           "total": {"forward_ms": result.forward_ms, "backward_ms": result.backward_ms,
                                     "forward_backward_ms": result.forward_backward_ms}}, indent=1)
    if fmt == "csv":
        out = _io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["layer", "type", "forward_ms", "backward_ms", "note"])
        for r in result.layers:
            writer.writerow([r.name, r.type, f"{r.forward_ms:.4f}", f"{r.backward_ms:.4f}", r.note])
        writer.writerow(["total", "", f"{result.forward_ms:.4f}", f"{result.backward_ms:.4f}", both])
        return out.getvalue().rstrip("\n")
    if fmt != "md":
        raise ValueError(f"unknown format {fmt!r} (md, csv, json)")
    shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in result.inputs.items())
    lines = [f"{result.phase} net on {result.device}, average of {result.iterations} iterations; inputs {shapes}; "
             f"backward from {result.backward_from}", "", "| layer | type | forward ms | backward ms | note |", "|---|---|---:|---:|---|"]
    lines += [f"| {r.name} | {r.type} | {r.forward_ms:.3f} | {r.backward_ms:.3f} | {r.note} |" for r in result.layers]
    lines.append(f"| **total** | | {result.forward_ms:.3f} | {result.backward_ms:.3f} | {both} |")
    return "\n".join(lines)


def time_file(path: Union[str, Path], phase: int = caffe_pb2.TRAIN, iterations: int = 50, device="cpu",
              input_shape: Optional[Sequence[int]] = None) -> NetTiming:
    """:func:`time_net` on the net file ``path`` built for ``phase`` on ``device`` with filler
    weights (seed 0); ``input_shape`` replaces the shape of the first source layer's first top."""
    if iterations < 1:
        raise TimingError(f"iterations must be at least 1, got {iterations}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise TimingError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TimingError(f"device {device}: CUDA is not available on this machine")
    param = io.read_net(path)
    overrides = None
    if input_shape is not None:
        sources = [step for step in shapes.plan_net(param, phase, device="meta").layers if step.layer.is_source]
        if not sources:
            raise LayerError(f"{path}: --input given but the net has no input layer")
        overrides = {sources[0].tops[0]: tuple(input_shape)}
    net = Net(param, phase, device=device, seed=0, input_shapes=overrides)
    return time_net(net, iterations, force_backward=param.force_backward)
