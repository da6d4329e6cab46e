"""Net: a NetParameter + phase as a ``torch.nn.Module`` with a precomputed execution plan.

    net = Net.from_prototxt("deploy.prototxt", phase="TEST")
    net.load_caffemodel("weights.caffemodel")
    out = net(data=images)                 # dict of the net's output blobs
    out["detection_out"]                   # 1 x 1 x D x 7

Construction follows Caffe's ``Net::Init`` (see ``deeper_ssd.shapes.plan_net``): NetState
include/exclude filtering, in-place tops, blobs consumed by several layers, ``loss_weight``,
``propagate_down`` and ParamSpec sharing by name. Every blob name gets an integer slot once, so
a forward pass is a loop over prebuilt steps without string lookups. A layer's learnable blobs
are filled with its fillers at construction (seeded), in Caffe's order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import io, shapes
from .layers import Layer, LayerError
from .layers.data import DataLayer
from .layers.fillers import fill
from .proto import caffe_pb2

__all__ = ["Net", "NetOutputs", "LearnableParam", "WeightsError", "phase_value", "top_loss_weights"]

PhaseLike = Union[int, str]


class WeightsError(LayerError):
    """A .caffemodel does not fit the net (blob count or shape mismatch)."""


def phase_value(phase: PhaseLike) -> int:
    """``"TRAIN"``/``"TEST"`` (any case) or caffe_pb2.TRAIN/TEST -> the enum value."""
    if isinstance(phase, str):
        try:
            return caffe_pb2.Phase.Value(phase.upper())
        except ValueError:
            raise ValueError(f"phase must be TRAIN or TEST, not {phase!r}") from None
    if phase not in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        raise ValueError(f"phase must be TRAIN or TEST, not {phase!r}")
    return int(phase)


def top_loss_weights(layer: Layer) -> Tuple[float, ...]:
    """Caffe's loss weight of each of ``layer``'s tops: ``loss_weight`` (one entry per top), else
    1 for top 0 of a loss layer and 0 for the rest (0 = not part of the objective)."""
    lp = layer.lp
    if len(lp.loss_weight) not in (0, len(lp.top)):
        raise LayerError(f"layer '{lp.name}': loss_weight needs 0 or {len(lp.top)} entries "
                         f"(one per top), has {len(lp.loss_weight)}")
    if len(lp.loss_weight):
        return tuple(lp.loss_weight)
    return tuple(1.0 if (layer.is_loss and i == 0) else 0.0 for i in range(len(lp.top)))


@dataclass
class LearnableParam:
    """One parameter blob as the solver sees it (Caffe's ``learnable_params`` order).
    ``statistics``: the layer computes it in forward instead of learning it (BatchNorm's mean,
    variance and factor), so it changes without a gradient."""
    layer: str
    index: int
    blob: torch.nn.Parameter
    lr_mult: float
    decay_mult: float
    statistics: bool = False


@dataclass
class _Step:
    layer: Layer
    bottom_slots: Tuple[int, ...]
    top_slots: Tuple[int, ...]
    detach: Tuple[bool, ...]              # per bottom: propagate_down false
    loss_weights: Tuple[float, ...]       # per top, 0 = not part of the objective
    free_after: Tuple[int, ...]           # slots whose last reader is this step
    host: Tuple[bool, ...] = ()           # per bottom: the layer reads it on the host
    affine: Optional[Layer] = None        # a BatchNorm step running the next Scale layer too


class NetOutputs(dict):
    """The net's output blobs by name; ``loss`` is the weighted objective (None without loss tops)."""

    loss: Optional[torch.Tensor] = None


class Net(torch.nn.Module):
    """A Caffe net executed by PyTorch (see the module docstring)."""

    def __init__(self, net_param: caffe_pb2.NetParameter, phase: PhaseLike = "TEST", *,
                 device=None, seed: Optional[int] = None, level: Optional[int] = None,
                 stages: Sequence[str] = (), input_shapes: Optional[Dict[str, Sequence[int]]] = None):
        super().__init__()
        self.phase = phase_value(phase)
        plan = shapes.plan_net(net_param, self.phase, device=device, level=level, stages=stages,
                               input_shapes=input_shapes)
        self.name = plan.net_param.name
        self.layers = torch.nn.ModuleList(step.layer for step in plan.layers)
        self.layer_by_name: Dict[str, Layer] = {layer.name: layer for layer in self.layers}
        self.blob_shapes = dict(plan.blob_shapes)
        self.outputs: List[str] = list(plan.outputs)
        self.register_buffer("_device_probe", torch.empty(0, device=device), persistent=False)
        self._slot: Dict[str, int] = {name: i for i, name in enumerate(plan.blob_shapes)}
        self._steps = self._build_steps(plan)
        self._output_slots = tuple(self._slot[name] for name in self.outputs)
        self._fill_blobs(seed)
        self.learnable_params = self._share_and_collect_params()
        self.blobs: Dict[str, torch.Tensor] = {}

    @classmethod
    def from_prototxt(cls, path: Union[str, Path], phase: PhaseLike = "TEST", **kwargs) -> "Net":
        return cls(io.read_net(path), phase, **kwargs)

    # -- construction ----------------------------------------------------------------------------
    def _build_steps(self, plan: shapes.NetPlan) -> List[_Step]:
        last_read: Dict[int, int] = {}
        for index, step in enumerate(plan.layers):
            for name in step.bottoms:
                last_read[self._slot[name]] = index
        keep = {self._slot[name] for name in plan.outputs}
        steps = []
        readers_since_write: Dict[str, int] = {}
        from_source = set()
        for index, step in enumerate(plan.layers):
            layer, lp = step.layer, step.layer.lp
            # Caffe in-place (top == bottom): overwrite the tensor when no other layer has read
            # it since it was produced (autograd may hold it) and it is not the caller's input
            layer.overwrite_bottom = (layer.supports_in_place and list(lp.top) == list(lp.bottom)
                                      and readers_since_write.get(lp.bottom[0]) == 0
                                      and lp.bottom[0] not in from_source)
            for name in step.bottoms:
                readers_since_write[name] = readers_since_write.get(name, 0) + 1
            for name in step.tops:
                readers_since_write[name] = 0
                if layer.is_source:
                    from_source.add(name)
            if len(lp.propagate_down) not in (0, len(lp.bottom)):
                raise LayerError(f"layer '{lp.name}': propagate_down needs 0 or {len(lp.bottom)} "
                                 f"entries, has {len(lp.propagate_down)}")
            weights = top_loss_weights(layer)
            detach = tuple(not flag for flag in lp.propagate_down) if len(lp.propagate_down) \
                else (False,) * len(lp.bottom)
            bottom_slots = tuple(self._slot[name] for name in step.bottoms)
            free = tuple(sorted({s for s in bottom_slots if last_read.get(s) == index and s not in keep}))
            host = tuple(i in layer.host_bottoms for i in range(len(bottom_slots)))
            steps.append(_Step(layer, bottom_slots, tuple(self._slot[n] for n in step.tops),
                               detach, weights, free, host=host))
        return self._fuse_batchnorm_scale(steps)

    @staticmethod
    def _fuse_batchnorm_scale(steps: List[_Step]) -> List[_Step]:
        """Run each BatchNorm followed directly by an in-place, per-channel Scale with learned
        blobs (how Caffe nets spell an affine BatchNorm) as one ``native_batch_norm`` call:
        the same values and gradients, one pass over the activations less (timings:
        docs/performance.md, "Training step"). The Scale layer keeps its blobs and its name; only
        the separate pass over the activations goes."""
        fused: List[_Step] = []
        for step in steps:
            previous = fused[-1] if fused else None
            scale = step.layer
            if (previous is not None and previous.affine is None
                    and previous.layer.caffe_type == "BatchNorm" and scale.caffe_type == "Scale"
                    and len(scale.lp.bottom) == 1 and list(scale.lp.top) == list(scale.lp.bottom)
                    and step.bottom_slots == previous.top_slots
                    and not any(step.detach) and not any(step.loss_weights)
                    and not any(previous.loss_weights) and _per_channel(scale)):
                previous.affine = scale
                previous.free_after = tuple(sorted(set(previous.free_after) | set(step.free_after)))
                continue
            fused.append(step)
        return fused

    def _fill_blobs(self, seed: Optional[int]) -> None:
        """Fill every blob with its layer's filler, in layer then blob order, from one generator
        seeded by ``seed`` (default: drawn from torch's global RNG, so torch.manual_seed works)."""
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        generator = torch.Generator().manual_seed(seed)
        for layer in self.layers:
            for i, (blob, filler) in enumerate(zip(layer.blobs, layer.blob_fillers)):
                try:
                    fill(blob.data, filler, generator)
                except ValueError as err:                    # an unknown or unfit filler
                    raise layer.error(f"blob {i}: {err}") from None

    def _share_and_collect_params(self) -> List[LearnableParam]:
        """Apply ParamSpec sharing by name and return the owned blobs in Caffe's order."""
        owners: Dict[str, LearnableParam] = {}
        learnable: List[LearnableParam] = []
        for layer in self.layers:
            lp = layer.lp
            if len(lp.param) > len(layer.blobs):
                raise LayerError(f"layer '{lp.name}': {len(lp.param)} param entries for "
                                 f"{len(layer.blobs)} parameter blobs")
            for i, blob in enumerate(layer.blobs):
                spec = lp.param[i] if i < len(lp.param) else caffe_pb2.ParamSpec()
                lr_mult, decay_mult = spec.lr_mult, spec.decay_mult
                if not blob.requires_grad:                       # BatchNorm statistics
                    if spec.HasField("lr_mult") and spec.lr_mult != 0:
                        raise LayerError(f"layer '{lp.name}': blob {i} holds statistics, not weights; "
                                         "its lr_mult must be 0")
                    lr_mult = 0.0
                if spec.name and spec.name in owners:
                    owner = owners[spec.name]
                    self._check_shared(lp.name, i, spec, blob, owner)
                    layer.blobs[i] = owner.blob
                    continue
                entry = LearnableParam(lp.name, i, blob, lr_mult, decay_mult,
                                       statistics=not blob.requires_grad)
                if spec.name:
                    owners[spec.name] = entry
                blob.requires_grad_(lr_mult != 0)
                learnable.append(entry)
        return learnable

    @staticmethod
    def _check_shared(layer_name: str, index: int, spec, blob, owner: LearnableParam) -> None:
        if tuple(blob.shape) != tuple(owner.blob.shape):
            mode = "PERMISSIVE sharing of different shapes is not supported" \
                if spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE else "shapes differ"
            raise LayerError(f"layer '{layer_name}': shared param '{spec.name}' ({mode}): "
                             f"{tuple(blob.shape)} vs {tuple(owner.blob.shape)} in layer '{owner.layer}'")
        for field in ("lr_mult", "decay_mult"):
            if spec.HasField(field) and getattr(spec, field) != getattr(owner, field):
                raise LayerError(f"layer '{layer_name}': shared param '{spec.name}' sets {field} "
                                 f"{getattr(spec, field)}, its owner '{owner.layer}' has "
                                 f"{getattr(owner, field)}")

    # -- running ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    @property
    def params(self) -> Dict[str, List[torch.nn.Parameter]]:
        """Parameter blobs by layer name, in Caffe order (weights, then bias)."""
        return {layer.name: list(layer.blobs) for layer in self.layers if len(layer.blobs)}

    @property
    def data_layers(self) -> List[DataLayer]:
        """The layers that read their own data (AnnotatedData ...), in net order."""
        return [layer for layer in self.layers if isinstance(layer, DataLayer)]

    @property
    def loss_weights(self) -> Dict[str, float]:
        """Loss weight of every top that is part of the objective (:func:`top_loss_weights`, as
        the execution plan recorded it)."""
        return {top: weight for step in self._steps
                for top, weight in zip(step.layer.lp.top, step.loss_weights) if weight}

    @property
    def inputs(self) -> List[str]:
        """Tops of source layers (Input, data layers): what ``forward`` accepts as keywords."""
        return [top for layer in self.layers if layer.is_source for top in layer.lp.top]

    def forward(self, keep_blobs: bool = False, **inputs: torch.Tensor) -> NetOutputs:
        """Run every layer once. ``inputs`` feed source-layer tops by name (required for Input
        layers, optional for data layers, which otherwise read their own source). Returns the
        output blobs (tops no later layer reads) and, as ``.loss``, the weighted objective.
        With ``keep_blobs=True`` every blob's last value stays in ``self.blobs``."""
        values: List[Optional[torch.Tensor]] = [None] * len(self._slot)
        unknown = set(inputs) - set(self.inputs)
        if unknown:
            raise KeyError(f"net '{self.name}' has no input named {', '.join(sorted(unknown))}; "
                           f"inputs: {', '.join(self.inputs) or 'none'}")
        device = self.device
        hosts: Dict[int, torch.Tensor] = {}         # source tops made on the host, before the move
        loss = None
        for step in self._steps:
            layer = step.layer
            if layer.is_source:
                tops = self._source_tops(layer, inputs)
            else:
                bottoms = [values[s].detach() if cut else values[s]
                           for s, cut in zip(step.bottom_slots, step.detach)]
                if any(step.host):
                    bottoms = [hosts.get(s, b) if h else b for s, b, h in zip(step.bottom_slots, bottoms, step.host)]
                tops = layer(*bottoms, *step.affine.blobs) if step.affine is not None \
                    else layer(*bottoms)
            if isinstance(tops, torch.Tensor):
                tops = (tops,)
            for slot, top, weight in zip(step.top_slots, tops, step.loss_weights):
                hosts.pop(slot, None)                      # an in-place layer rewrote it
                if layer.is_source and top.device != device:
                    hosts[slot] = top
                    top = top.to(device, non_blocking=True)
                values[slot] = top
                if weight:
                    term = top.sum() * weight
                    loss = term if loss is None else loss + term
            if not keep_blobs:
                for slot in step.free_after:
                    values[slot] = None
                    hosts.pop(slot, None)
        if keep_blobs:
            self.blobs = {name: values[slot] for name, slot in self._slot.items()}
        outputs = NetOutputs((name, values[slot]) for name, slot in zip(self.outputs, self._output_slots))
        outputs.loss = loss
        return outputs

    def _source_tops(self, layer: Layer, inputs: Dict[str, torch.Tensor]):
        names = list(layer.lp.top)
        if all(name in inputs for name in names):
            tops = [inputs[name] for name in names]
        elif any(name in inputs for name in names):
            raise KeyError(f"layer '{layer.name}': give all of its tops ({', '.join(names)}) or none")
        else:
            return layer()
        for name, tensor, shape in zip(names, tops, layer.top_shapes):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"input '{name}' must be a torch.Tensor, got {type(tensor).__name__}")
            if -1 not in shape and tuple(tensor.shape[1:]) != tuple(shape[1:]):
                raise ValueError(f"input '{name}' has shape {tuple(tensor.shape)}; the net was built for "
                                 f"{'x'.join(map(str, shape))} (any batch size). Build it with "
                                 f"input_shapes={{'{name}': (...)}} for another size")
        return tops

    # -- weights ---------------------------------------------------------------------------------
    def load_caffemodel(self, source: Union[str, Path, caffe_pb2.NetParameter],
                        prefix: str = "") -> List[str]:
        """Copy blobs from a .caffemodel by layer name, as Caffe's CopyTrainedLayersFrom: layers
        missing from the file keep their current values, file layers absent here are ignored, a
        blob count or shape mismatch raises WeightsError. Returns the names of the layers loaded.

        ``prefix``: file layer ``X`` goes to the net's layer ``prefix + X`` (a net holding a
        prefixed copy of another, e.g. ZoomInNet's frozen ``teacher/...`` layers, loads that
        net's own .caffemodel); the names returned are the net's."""
        weights = source if isinstance(source, caffe_pb2.NetParameter) else io.read_caffemodel(source)
        origin = "<NetParameter>" if isinstance(source, caffe_pb2.NetParameter) else str(source)
        loaded = []
        for src in weights.layer:
            name = prefix + src.name
            target = self.layer_by_name.get(name)
            if target is None or not len(src.blobs):
                continue
            if len(src.blobs) != len(target.blobs):
                raise WeightsError(f"{origin}: layer '{src.name}' has {len(src.blobs)} blobs, "
                                   f"the net's layer has {len(target.blobs)}")
            arrays = []
            for i, (blob, param) in enumerate(zip(src.blobs, target.blobs)):
                array = io.blob_to_array(blob)
                if not _shape_matches(blob, tuple(param.shape)):
                    raise WeightsError(f"{origin}: layer '{src.name}' blob {i}: file shape "
                                       f"{tuple(io.blob_shape(blob))}, net shape {tuple(param.shape)}")
                arrays.append(array.reshape(tuple(param.shape)))
            with torch.no_grad():
                for param, array in zip(target.blobs, arrays):
                    param.copy_(torch.from_numpy(array))
            loaded.append(name)
        return loaded

    def load_trained(self, path: Union[str, Path]) -> List[str]:
        """:meth:`load_caffemodel` for inference (detect, test): a file that fills no layer of
        this net is a WeightsError naming layers on both sides. Returns the names of the layers
        with parameters that the file left at their fillers."""
        loaded = self.load_caffemodel(path)
        learnable = [layer.name for layer in self.layers if len(layer.blobs)]
        if learnable and not loaded:
            raise WeightsError(f"{path}: no layer of the file matches a layer of net '{self.name}' "
                               f"({self.weights_mismatch(path)}); wrong .caffemodel for this net?")
        return [name for name in learnable if name not in loaded]

    def weights_mismatch(self, path: Union[str, Path]) -> str:
        """A few layer names with parameters on each side, for a .caffemodel that fills none."""
        def few(names: List[str]) -> str:
            return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "") \
                if names else "none"
        in_file = [lp.name for lp in io.read_caffemodel(path).layer if len(lp.blobs)]
        in_net = [layer.name for layer in self.layers if len(layer.blobs)]
        return f"file layers: {few(in_file)}; net layers: {few(in_net)}"

    def to_proto(self, with_blobs: bool = True) -> caffe_pb2.NetParameter:
        """The net's layers (as filtered for its phase) with their blobs, as Caffe's Net::ToProto."""
        net = caffe_pb2.NetParameter(name=self.name)
        for layer in self.layers:
            lp = net.layer.add()
            lp.CopyFrom(layer.lp)
            lp.phase = layer.phase
            del lp.blobs[:]
            if with_blobs:
                lp.blobs.extend(io.array_to_blob(b) for b in layer.blobs)
        return net

    def save_caffemodel(self, path: Union[str, Path]) -> None:
        """Write a .caffemodel (atomically) that Caffe and OpenCV read."""
        io.write_caffemodel(self.to_proto(), path)

    def share_weights_from(self, other: "Net") -> List[str]:
        """Use ``other``'s parameter blobs for same-named layers (Caffe's ShareTrainedLayersWith:
        how a test net sees the train net's weights). Returns the shared layer names."""
        shared = []
        for layer in self.layers:
            source = other.layer_by_name.get(layer.name)
            if source is None or not len(layer.blobs):
                continue
            if len(source.blobs) != len(layer.blobs):
                raise WeightsError(f"layer '{layer.name}': {len(source.blobs)} blobs in the source net, "
                                   f"{len(layer.blobs)} here")
            for i, blob in enumerate(source.blobs):
                if blob.shape != layer.blobs[i].shape:
                    raise WeightsError(f"layer '{layer.name}' blob {i}: {tuple(blob.shape)} in the "
                                       f"source net, {tuple(layer.blobs[i].shape)} here")
                layer.blobs[i] = blob
            shared.append(layer.name)
        return shared


def _per_channel(layer: Layer) -> bool:
    """A Scale layer's blobs are ``[C]`` vectors over axis 1 of its bottom ``[N, C, ...]``."""
    shape = layer.bottom_shapes[0]
    channel_view = (1, shape[1]) + (1,) * (len(shape) - 2) if len(shape) >= 2 else None
    return layer.view == channel_view and tuple(layer.blobs[0].shape) == (shape[1],)


def _shape_matches(blob: caffe_pb2.BlobProto, shape: Tuple[int, ...]) -> bool:
    """Caffe's Blob::ShapeEquals: legacy 4-D blobs match a shape of <= 4 axes padded with 1s."""
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        if len(shape) > 4:
            return False
        return (1,) * (4 - len(shape)) + shape == io.blob_shape(blob)
    return tuple(blob.shape.dim) == shape
