"""Layers that produce the net's inputs: Input (fed by the caller) and AnnotatedData (LMDB)."""
from __future__ import annotations

from .base import Layer
from .registry import register


@register
class Input(Layer):
    """Tops with fixed shapes whose values the caller supplies: ``net.forward(data=tensor)``.
    ``input_param.shape`` holds one shape for all tops or one per top."""

    caffe_type = "Input"
    num_bottoms = (0, 0)
    num_tops = (1, None)
    is_source = True

    def setup(self, bottoms):
        shapes = [tuple(s.dim) for s in self.lp.input_param.shape]
        tops = len(self.lp.top)
        if len(shapes) not in (1, tops):
            raise ValueError(f"input_param has {len(shapes)} shapes for {tops} tops; give 1 or {tops}")
        return shapes * tops if len(shapes) == 1 else shapes

    def forward(self):
        raise RuntimeError(f"Input layer '{self.name}' has no data of its own: pass its tops "
                           f"({', '.join(self.lp.top)}) to Net.forward as keyword arguments")
