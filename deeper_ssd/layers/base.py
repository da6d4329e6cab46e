"""The Layer base class: one Caffe layer type = one subclass holding its parameter parsing,
its static shape rule and its torch forward.

A subclass sets ``caffe_type`` (the registered type string) and implements

* ``setup(bottom_shapes) -> top_shapes``: read ``self.lp`` (the LayerParameter), validate the
  bottom shapes, create learnable blobs with :meth:`add_blob`, return the top shapes.
  Shapes are tuples of ints; ``-1`` marks a dimension only known at run time (the number of
  ground-truth boxes or detections); ``()`` is a scalar (loss tops).
* ``forward(*bottoms) -> Tensor | tuple``: compute the tops from the bottom tensors. Read
  learnable blobs through ``self.blobs[i]`` only: the net replaces entries of that list when
  layers share parameters (ParamSpec names, test nets sharing the train net's weights).
* optionally ``macs()``: multiply-accumulates of one forward at the setup shapes.
* ``float32 = True`` for a type whose arithmetic carries Caffe's semantics (priors, box coding,
  normalisation; every loss layer is treated so): under autocast (``train --amp``) it computes in
  float32, its floating bottoms cast up and autocast off (docs/decisions.md, "Devices,
  multi-process stops, mixed precision").

Layers are constructed with ``device="meta"`` for shape-only work (``deeper_ssd.shapes``): blobs
then take no memory. Errors about a layer's configuration raise :class:`LayerError`, which
names the layer; the net builder and the CLI print it as one line.
"""
from __future__ import annotations

import math
from typing import ClassVar, List, Optional, Sequence, Tuple

import torch

from ..errors import LayerError
from ..proto import caffe_pb2

Shape = Tuple[int, ...]

__all__ = ["Layer", "LayerError", "Shape", "format_shape", "count", "canonical_axis"]


def format_shape(shape: Sequence[int]) -> str:
    """``(1, 3, 300, 300)`` -> ``1x3x300x300``; ``-1`` prints as ``?``; a scalar prints ``scalar``."""
    if len(shape) == 0:
        return "scalar"
    return "x".join("?" if d < 0 else str(d) for d in shape)


def count(shape: Sequence[int], start: int = 0, end: Optional[int] = None) -> int:
    """Product of ``shape[start:end]`` (1 for an empty range), like Caffe's Blob::count."""
    return math.prod(shape[start:end])


def canonical_axis(axis: int, num_axes: int, what: str = "axis") -> int:
    """Caffe's CanonicalAxisIndex: a negative axis counts from the end; out of range is an error."""
    if not -num_axes <= axis < num_axes:
        raise ValueError(f"{what} {axis} out of range for a {num_axes}-axis blob")
    return axis + num_axes if axis < 0 else axis


class Layer(torch.nn.Module):
    """Base of every layer type (see the module docstring for the contract)."""

    caffe_type: ClassVar[str] = ""
    #: allowed numbers of bottoms / tops (inclusive ranges); None = no bound
    num_bottoms: ClassVar[Tuple[int, Optional[int]]] = (1, 1)
    num_tops: ClassVar[Tuple[int, Optional[int]]] = (1, 1)
    #: loss layers weigh top 0 by 1 unless loss_weight says otherwise
    is_loss: ClassVar[bool] = False
    #: data-producing layers (AnnotatedData, Input ...): their tops may be fed by the caller
    is_source: ClassVar[bool] = False
    #: element-wise layers that can overwrite their bottom when the net says it is safe
    supports_in_place: ClassVar[bool] = False
    #: computes in float32 under autocast, as every loss layer does (see the module docstring)
    float32: ClassVar[bool] = False
    #: bottoms read on the host (Caffe's cpu_data): when a source layer made such a blob on the
    #: host for a net on another device, the Net passes the host tensor as well as moving it
    host_bottoms: ClassVar[Tuple[int, ...]] = ()

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: Sequence[Shape],
                 phase: int = caffe_pb2.TEST, device=None):
        super().__init__()
        self.lp = lp
        self.name = lp.name
        self.phase = phase
        self.device_for_blobs = torch.device(device) if device is not None else torch.device("cpu")
        self.bottom_shapes: List[Shape] = [tuple(int(d) for d in s) for s in bottom_shapes]
        self.blobs = torch.nn.ParameterList()
        self.blob_fillers: List[Optional[caffe_pb2.FillerParameter]] = []
        #: set by the Net: this Caffe in-place layer may overwrite its bottom tensor (nothing
        #: else has read it since it was produced, and it is not a caller's input)
        self.overwrite_bottom = False
        self._check_arity(len(self.bottom_shapes), len(lp.top))
        try:
            tops = self.setup(self.bottom_shapes)
        except LayerError:
            raise
        except (ValueError, TypeError, IndexError) as err:
            raise self.error(str(err)) from None
        self.top_shapes: List[Shape] = [tuple(int(d) for d in s) for s in tops]

    def __call__(self, *bottoms, **kwargs):
        kind = bottoms[0].device.type if bottoms and isinstance(bottoms[0], torch.Tensor) else None
        if (self.float32 or self.is_loss) and kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
            with torch.autocast(kind, enabled=False):
                return super().__call__(*(b.float() if isinstance(b, torch.Tensor) and b.is_floating_point()
                                          else b for b in bottoms), **kwargs)
        return super().__call__(*bottoms, **kwargs)

    # -- subclass API ----------------------------------------------------------------------------
    def setup(self, bottom_shapes: List[Shape]) -> List[Shape]:
        raise NotImplementedError

    def macs(self) -> int:
        """Multiply-accumulate operations of one forward pass at the setup shapes."""
        return 0

    # -- helpers for subclasses ------------------------------------------------------------------
    def error(self, message: str) -> LayerError:
        return LayerError(f"layer '{self.name}' ({self.caffe_type}): {message}")

    def add_blob(self, shape: Sequence[int], filler: Optional[caffe_pb2.FillerParameter] = None,
                 learnable: bool = True) -> torch.nn.Parameter:
        """Create the next parameter blob (Caffe order), uninitialised; ``filler`` fills it later."""
        if any(int(d) < 0 for d in shape):
            raise self.error(f"parameter blob {len(self.blobs)} would have shape {format_shape(shape)}: "
                             "a dimension it depends on (an input's channels?) is unknown or negative")
        blob = torch.nn.Parameter(
            torch.empty(tuple(shape), dtype=torch.float32, device=self.device_for_blobs),
            requires_grad=learnable)
        self.blobs.append(blob)
        self.blob_fillers.append(filler)
        return blob

    def _check_arity(self, bottoms: int, tops: int) -> None:
        for what, have, (low, high) in (("bottom", bottoms, self.num_bottoms),
                                        ("top", tops, self.num_tops)):
            if have < low or (high is not None and have > high):
                want = str(low) if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
                raise self.error(f"needs {want} {what}(s), has {have}")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, tops={[format_shape(s) for s in getattr(self, 'top_shapes', [])]}"
