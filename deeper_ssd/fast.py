"""A fast inference path for TEST-phase nets: the part of the net between its inputs and its
detection layers compiled into one graph, checked against the executor, and run beside it.

    fast = optimize(net)                 # net: a TEST-phase deeper_ssd.net.Net with its weights
    out = fast(data=images)              # the same output blobs as net(data=images)

How (timings and choices: docs/performance.md, "Fast inference path"):

* The layers split into three phases: the source layers (Input, data layers) run as in the
  executor; every other layer that reads only source or compiled blobs and is not one of
  :data:`EAGER_TYPES` (host syncs, data-dependent shapes, result files) is compiled; the rest
  (DetectionOutput, DetectionEvaluate and what reads them) runs eagerly on the compiled
  part's outputs, so detections come from the same code as in the exact path.
* The compiled part is traced once per input shape (static shapes: PriorBox outputs become
  constants; layers with a custom backward trace their plain forward under ``no_grad``), then
  either exported to ONNX and run by ONNX Runtime (backend ``onnxruntime``, the default on
  CPU when it is installed: the fastest measured here) or frozen as TorchScript with
  channels-last weights (``torchscript``: ``torch.jit.freeze`` folds BatchNorm and per-channel
  Scale into the convolutions and lets oneDNN fuse convolution + ReLU; any device).
* Before first use the compiled graph's outputs are compared with the executor's on the
  same input (at most :data:`RTOL` relative); the exported model or the trace is saved in
  ``cache_dir`` (keyed by torch version, backend, input shapes, layers and weights), so a
  later process starts without tracing or checking.
* Anything that cannot be compiled or differs (a layer the tracer or exporter cannot follow,
  a trace warning that a Python value came from a tensor) falls back to the exact executor
  with the reason logged; :attr:`FastNet.fallback` holds it.

tests/test_fast.py checks the zoo's deploy nets against the exact path.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .net import Net, NetOutputs

__all__ = ["BACKENDS", "EAGER_TYPES", "FastNet", "default_cache_dir", "onnx_bytes", "optimize"]

log = logging.getLogger(__name__)

#: how the traced part runs: ONNX Runtime (CPU; needs the ``onnx`` extra) or a frozen TorchScript graph
BACKENDS = ("onnxruntime", "torchscript")

#: layer types never traced: host syncs and data-dependent output sizes, or files written
EAGER_TYPES = frozenset({"DetectionOutput", "DetectionEvaluate", "MultiBoxLoss", "Silence"})


#: layer types whose tops depend on the input shapes only: constants of a compiled graph
CONSTANT_TYPES = frozenset({"PriorBox"})


class _Traced(torch.nn.Module):
    """The traceable layers of ``net`` as one module: ``forward(*inputs) -> tuple`` of blobs.
    The first call records the tops of :data:`CONSTANT_TYPES` layers as buffers, later calls
    (the trace) read them from there."""

    def __init__(self, net: Net, steps, inputs: Sequence[int], outputs: Sequence[int]):
        super().__init__()
        self.layers = torch.nn.ModuleList([step.layer for step in steps]
                                          + [step.affine for step in steps if step.affine is not None])
        self._steps, self._inputs, self._outputs = list(steps), tuple(inputs), tuple(outputs)
        self._size = len(net._slot)
        self._constant: Dict[int, str] = {}

    def forward(self, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        values: List[Optional[torch.Tensor]] = [None] * self._size
        for slot, tensor in zip(self._inputs, inputs):
            values[slot] = tensor
        for step in self._steps:
            if step.layer.caffe_type in CONSTANT_TYPES:
                if step.top_slots[0] not in self._constant:
                    for slot, top in zip(step.top_slots, _as_tuple(step.layer(*[values[s] for s in step.bottom_slots]))):
                        self._constant[slot] = f"constant_{slot}"
                        self.register_buffer(self._constant[slot], top)
                for slot in step.top_slots:
                    values[slot] = getattr(self, self._constant[slot])
                continue
            bottoms = [values[s] for s in step.bottom_slots]
            tops = step.layer(*bottoms, *step.affine.blobs) if step.affine is not None \
                else step.layer(*bottoms)
            if isinstance(tops, torch.Tensor):
                tops = (tops,)
            for slot, top in zip(step.top_slots, tops):
                values[slot] = top
        return tuple(values[s] for s in self._outputs)


class FastNet(torch.nn.Module):
    """``net`` with its traceable part compiled (see the module docstring). Call it like the
    Net: keyword inputs by blob name, returns :class:`~deeper_ssd.net.NetOutputs` with the
    same output blobs (``extra_outputs`` adds intermediate blobs by name)."""

    def __init__(self, net: Net, backend: Optional[str] = None, channels_last: bool = True,
                 cache_dir: Optional[Union[str, Path]] = None, extra_outputs: Sequence[str] = ()):
        super().__init__()
        if net.training:
            net.eval()
        self.net = net
        self.channels_last = channels_last
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if backend is None:
            backend = "onnxruntime" if (net.device.type == "cpu" and importlib.util.find_spec("onnxruntime")) \
                else "torchscript"
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: one of {', '.join(BACKENDS)}")
        if backend == "onnxruntime" and net.device.type != "cpu":
            raise ValueError("backend onnxruntime runs on the CPU; the net is on " + str(net.device))
        self.backend = backend
        self.fallback: Optional[str] = None
        self._compiled: Dict[Tuple, Callable] = {}
        self.last_compile_s = 0.0
        self.last_source = ""
        self.blobs: Dict[str, torch.Tensor] = {}
        self._split(list(extra_outputs))

    # -- plan --------------------------------------------------------------------------------
    def _split(self, extra: List[str]) -> None:
        net = self.net
        unknown = [name for name in extra if name not in net._slot]
        if unknown:
            raise KeyError(f"net '{net.name}' has no blob {', '.join(unknown)}")
        source, traced, eager = [], [], []
        from_traced, from_source = set(), set()
        for step in net._steps:
            layer = step.layer
            if layer.is_source:
                source.append(step)
                from_source.update(step.top_slots)
            elif (layer.caffe_type not in EAGER_TYPES
                  and all(s in from_source or s in from_traced for s in step.bottom_slots)):
                traced.append(step)
                from_traced.update(step.top_slots)
            else:
                eager.append(step)
        needed = {s for step in eager for s in step.bottom_slots}
        needed |= set(net._output_slots) | {net._slot[name] for name in extra}
        self._source, self._traced_steps, self._eager = source, traced, eager
        self._traced_inputs = tuple(sorted({s for step in traced for s in step.bottom_slots} & from_source))
        # a blob written by several layers (in place) is read back as its last value
        self._traced_outputs = tuple(sorted(s for s in needed if s in from_traced))
        self._extra = extra
        self._names = {slot: name for name, slot in net._slot.items()}
        if not traced:
            self.fallback = "no layer to compile"

    # -- compilation -------------------------------------------------------------------------
    def _key(self, inputs: Sequence[torch.Tensor]) -> Tuple:
        return tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)

    def _cache_path(self, key: Tuple) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256()
        digest.update(f"{torch.__version__} {self.backend} {self.channels_last}".encode())
        digest.update(repr((key, self._traced_inputs, self._traced_outputs)).encode())
        for step in self._traced_steps:
            digest.update(step.layer.lp.SerializeToString(deterministic=True))
            for layer in (step.layer, step.affine):
                for blob in (layer.blobs if layer is not None else ()):
                    digest.update(blob.detach().cpu().contiguous().numpy().tobytes())
        suffix = ".onnx" if self.backend == "onnxruntime" else ".pt"
        return self.cache_dir / f"{self.net.name or 'net'}-{digest.hexdigest()[:24]}{suffix}"

    def traced_part(self) -> "_Traced":
        """The traceable layers as one module (the weights are the net's own)."""
        return _Traced(self.net, self._traced_steps, self._traced_inputs, self._traced_outputs).eval()

    def blob_names(self) -> Tuple[List[str], List[str]]:
        """Names of the traced part's inputs and outputs."""
        return [self._names[s] for s in self._traced_inputs], [self._names[s] for s in self._traced_outputs]

    def _compile(self, inputs: Sequence[torch.Tensor]):
        """A function ``inputs -> outputs`` of the traced part for these input shapes, checked
        against the executor on ``inputs``; from the cache when there."""
        start = time.perf_counter()
        path = self._cache_path(self._key(inputs))
        if path is not None and path.is_file():
            try:
                run = self._load(path, inputs[0].device)
                self.last_source, self.last_compile_s = f"cache {path}", time.perf_counter() - start
                return run
            except Exception as err:  # noqa: BLE001 - a stale or foreign file: compile again
                log.warning("fast path: cannot read %s (%s); compiling again", path, err)
        traced = self.traced_part()
        with torch.no_grad():
            expected = traced(*inputs)                         # also records the constants
        run, artefact = (self._onnxruntime if self.backend == "onnxruntime" else self._torchscript)(traced, inputs)
        with torch.no_grad():
            got = run(inputs)
        for slot, want, have in zip(self._traced_outputs, expected, got):
            if not _close(want, have):
                raise ValueError(f"the compiled graph's blob '{self._names[slot]}' differs from the "
                                 f"executor's by more than {RTOL:g} relative")
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                artefact(path)
            except OSError as err:
                log.warning("fast path: cannot write %s (%s)", path, err)
        self.last_source, self.last_compile_s = "compiled", time.perf_counter() - start
        return run

    def _memory(self, tensors):
        if not self.channels_last or self.backend != "torchscript":
            return tuple(tensors)
        return tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in tensors)

    def _torchscript(self, traced: "_Traced", inputs):
        if self.channels_last:                        # a copy: the net's own weights stay as they are
            traced = copy.deepcopy(traced).to(memory_format=torch.channels_last)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)
            module = torch.jit.trace(traced, self._memory(inputs), check_trace=False)
        # the trace is what is saved: a frozen graph holds oneDNN-packed weights that do not save
        return self._script_runner(module), lambda path: torch.jit.save(module, str(path))

    def _script_runner(self, module):
        frozen = torch.jit.freeze(module.eval())
        return lambda inputs: frozen(*self._memory(inputs))

    def _onnxruntime(self, traced: "_Traced", inputs):
        data = onnx_bytes(traced, inputs, *self.blob_names())
        return self._session_runner(data), lambda path: path.write_bytes(data)

    def _session_runner(self, data: bytes):
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run(inputs):
            feed = {name: t.detach().contiguous().numpy() for name, t in zip(names, inputs)}
            return tuple(torch.from_numpy(a) for a in session.run(None, feed))
        return run

    def _load(self, path: Path, device):
        if path.suffix == ".onnx":
            return self._session_runner(path.read_bytes())
        return self._script_runner(torch.jit.load(str(path), map_location=device))

    # -- what callers of a Net read ----------------------------------------------------------
    @property
    def name(self) -> str:
        return self.net.name

    @property
    def layers(self):
        return self.net.layers

    @property
    def layer_by_name(self):
        return self.net.layer_by_name

    @property
    def blob_shapes(self):
        return self.net.blob_shapes

    @property
    def inputs(self) -> List[str]:
        return self.net.inputs

    @property
    def outputs(self) -> List[str]:
        return self.net.outputs

    @property
    def data_layers(self):
        return self.net.data_layers

    @property
    def device(self) -> torch.device:
        return self.net.device

    # -- forward -----------------------------------------------------------------------------
    def forward(self, keep_blobs: bool = False, **inputs: torch.Tensor) -> NetOutputs:
        """As :meth:`Net.forward <deeper_ssd.net.Net.forward>`; ``keep_blobs`` keeps the blobs
        this path has (inputs, the traced part's outputs, what the eager layers make) in
        :attr:`blobs`."""
        net = self.net
        if self.fallback is not None:
            return self._exact(inputs, keep_blobs)
        unknown = set(inputs) - set(net.inputs)
        if unknown:
            raise KeyError(f"net '{net.name}' has no input named {', '.join(sorted(unknown))}; "
                           f"inputs: {', '.join(net.inputs) or 'none'}")
        values: List[Optional[torch.Tensor]] = [None] * len(net._slot)
        device = net.device
        for step in self._source:
            tops = net._source_tops(step.layer, inputs)
            if isinstance(tops, torch.Tensor):
                tops = (tops,)
            for slot, top in zip(step.top_slots, tops):
                values[slot] = top.to(device, non_blocking=True) if top.device != device else top
        traced_in = [values[s] for s in self._traced_inputs]
        key = self._key(traced_in)
        module = self._compiled.get(key)
        if module is None:
            try:
                module = self._compile(traced_in)
            except Exception as err:  # noqa: BLE001 - any tracing failure means: use the exact path
                reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                self.fallback = f"cannot compile net '{net.name}' ({reason})"
                log.warning("fast path off, exact executor instead: %s", self.fallback)
                return self._exact(inputs, keep_blobs)
            self._compiled[key] = module
        with torch.no_grad():
            outs = module(traced_in)
            for slot, tensor in zip(self._traced_outputs, outs):
                values[slot] = tensor
            for step in self._eager:
                tops = step.layer(*[values[s] for s in step.bottom_slots])
                if isinstance(tops, torch.Tensor):
                    tops = (tops,)
                for slot, top in zip(step.top_slots, tops):
                    values[slot] = top
        outputs = NetOutputs((name, values[slot]) for name, slot in zip(net.outputs, net._output_slots))
        outputs.update((name, values[net._slot[name]]) for name in self._extra)
        if keep_blobs:
            self.blobs = {name: values[slot] for name, slot in net._slot.items() if values[slot] is not None}
        return outputs

    def _exact(self, inputs, keep_blobs: bool) -> NetOutputs:
        with torch.no_grad():
            out = self.net(keep_blobs=keep_blobs or bool(self._extra), **inputs)
        outputs = NetOutputs(out)
        outputs.update((name, self.net.blobs[name]) for name in self._extra)
        if keep_blobs:
            self.blobs = dict(self.net.blobs)
        return outputs


def _as_tuple(tops) -> Tuple[torch.Tensor, ...]:
    return (tops,) if isinstance(tops, torch.Tensor) else tuple(tops)


#: largest difference allowed between the compiled graph and the executor, relative to the
#: largest magnitude of the blob (BatchNorm folding and other kernels reorder float sums)
RTOL = 1e-4


def _close(want: torch.Tensor, have: torch.Tensor) -> bool:
    if want.shape != have.shape:
        return False
    scale = float(want.abs().max()) if want.numel() else 0.0
    return bool((want.float() - have.float()).abs().max() <= RTOL * max(scale, 1e-6)) if want.numel() else True


def default_cache_dir() -> Path:
    """Where the command line keeps compiled graphs: ``$DEEPER_SSD_CACHE`` or
    ``$XDG_CACHE_HOME/deeper-ssd/fast`` (``~/.cache/deeper-ssd/fast``)."""
    if os.environ.get("DEEPER_SSD_CACHE"):
        return Path(os.environ["DEEPER_SSD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deeper-ssd" / "fast"


def optimize(net: Net, backend: Optional[str] = None, channels_last: bool = True,
             cache_dir: Optional[Union[str, Path]] = None, extra_outputs: Sequence[str] = ()) -> FastNet:
    """The fast inference path of the TEST-phase ``net`` (see the module docstring)."""
    return FastNet(net, backend, channels_last, cache_dir, extra_outputs)


def onnx_bytes(module: torch.nn.Module, inputs: Sequence[torch.Tensor], input_names: Sequence[str],
               output_names: Sequence[str]) -> bytes:
    """``module`` traced on ``inputs`` (static shapes) as an ONNX model (opset 17)."""
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the exporter's own deprecation notes
        torch.onnx.export(module, tuple(inputs), buffer, dynamo=False, opset_version=17,
                          input_names=list(input_names), output_names=list(output_names),
                          do_constant_folding=True)
    return buffer.getvalue()
