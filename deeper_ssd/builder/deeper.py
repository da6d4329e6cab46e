"""Deeper SSD500 and its up-sampling / down-sampling modules (paper §3.2, Tables 1, 4, 6).

Deeper SSD500 = the SSD300 structure at 500x500 with conv7_2 at stride 1 (3x3/1/1, 16x16 kept)
and three more 1x1 + 3x3/1/0 pairs: conv8_2 … conv12_2 are 14, 12, 10, 8, 6; 9 prediction layers.

A :class:`Module` joins a low-level map and a high-level map into one more prediction layer:
each side runs its own chain of :class:`Stage` s (convolution, deconvolution or pooling), the low
side is optionally cropped to the high side's size (Caffe has no output padding: Crop is its way
of aligning maps), the two are joined by Concat or Eltwise SUM, and a ReLU follows. The
up-sampling modules (Table 4) enlarge the high map to the low map's size; the down-sampling
modules (Table 6) pool the low map and enlarge the high map ×2, and their output is normalised
(Normalize, scale 20) by the multibox head. Where the paper's strides and kernels cannot make
the sizes meet, the parameters below are the nearest that do; docs/errata.md lists each one
next to the paper's words.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

from .ssd import ExtraConv, FeatureNet, SSD300_EXTRAS, extra_pair

__all__ = ["DEEPER_SSD500_EXTRAS", "DEEPER_SSD500_SOURCES", "Stage", "conv", "deconv", "pool",
           "Module", "up_module", "down_module"]

#: conv6 as SSD300 (3x3/2/1: 32 → 16), conv7_2 3x3/1/1 (16 → 16), conv8_2 … conv12_2 3x3/1/0
DEEPER_SSD500_EXTRAS: Tuple[ExtraConv, ...] = (
    *extra_pair(6), *extra_pair(7, 1, 1),
    *(layer for i in range(8, 13) for layer in extra_pair(i, 1, 0)))
DEEPER_SSD500_SOURCES = ("conv4_3", "fc7", "conv6_2", "conv7_2", "conv8_2", "conv9_2",
                         "conv10_2", "conv11_2", "conv12_2")
assert SSD300_EXTRAS[:3] == DEEPER_SSD500_EXTRAS[:3]


@dataclass(frozen=True)
class Stage:
    """One layer of a module branch. ``kind`` is "conv", "deconv" or "pool" (MAX).
    ``num_output=None`` means "as many channels as the low-level map" (Eltwise joins)."""
    kind: str
    num_output: Optional[int] = None
    kernel_size: int = 1
    stride: int = 1
    pad: int = 0
    relu: bool = False


def conv(num_output, kernel_size, pad=0, relu=False) -> Stage:
    return Stage("conv", num_output, kernel_size, 1, pad, relu)


def deconv(num_output, kernel_size, stride, pad=0, relu=False) -> Stage:
    return Stage("deconv", num_output, kernel_size, stride, pad, relu)


def pool(kernel_size, stride) -> Stage:
    return Stage("pool", None, kernel_size, stride)


@dataclass(frozen=True)
class Module:
    """``name`` (up1 … down2) joins ``low`` (kept at its grid) and ``high``.

    Layers: ``<name>_<kind><k>`` for the low branch then the high branch (k counts per kind
    within the module; a stage's ReLU is ``<layer>_relu``), ``<name>_crop`` when
    ``crop_offset`` is set (low branch cropped to the high branch's H×W from that offset),
    the join ``<name>`` (Concat or Eltwise SUM, low first) and ``<name>_relu``. The output blob
    ``<name>`` is a prediction source; ``normalization`` != -1 makes the head normalise it."""
    name: str
    low: str
    high: str
    low_branch: Tuple[Stage, ...]
    high_branch: Tuple[Stage, ...]
    join: str = "concat"
    crop_offset: Optional[int] = None
    normalization: float = -1

    @property
    def output(self) -> str:
        return self.name

    def replace(self, **changes) -> "Module":
        return replace(self, **changes)

    def _branch(self, fn: FeatureNet, blob: str, stages: Sequence[Stage], counts: dict) -> str:
        for stage in stages:
            counts[stage.kind] = counts.get(stage.kind, 0) + 1
            name = f"{self.name}_{stage.kind}{counts[stage.kind]}"
            if stage.kind == "pool":
                blob = fn.pool(name, blob, stage.kernel_size, stage.stride)
                continue
            if stage.kind not in ("conv", "deconv"):
                raise ValueError(f"{self.name}: unknown stage kind {stage.kind!r}")
            exact = stage.num_output is None        # as many channels as the low map has
            blob = fn.conv(name, blob, fn.channels[self.low] if exact else stage.num_output,
                           stage.kernel_size, pad=stage.pad, stride=stage.stride,
                           deconv=stage.kind == "deconv", widen=not exact,
                           relu=f"{name}_relu" if stage.relu else None)
        return blob

    def build(self, fn: FeatureNet) -> str:
        """Add the module's layers to ``fn``; returns the output blob (N×C×H×W on the high
        branch's grid when cropping, else on the low map's grid)."""
        counts: dict = {}
        low = self._branch(fn, self.low, self.low_branch, counts)
        high = self._branch(fn, self.high, self.high_branch, counts)
        if self.crop_offset is not None:
            low = fn.crop(f"{self.name}_crop", low, high, self.crop_offset)
        fn.join(self.name, [low, high], self.join)
        fn.relu(f"{self.name}_relu", self.name)
        return self.name


def up_module(index: int, join: str = "concat") -> Module:
    """Up-sampling module 1, 2 or 3 (Table 4) with Concat or Eltwise-sum connection.

    1: conv4_3 (63×63×512) ← conv6_2 (16×16): 3x3x512 Deconv /2 pad 1 (31), 3x3x512 Conv pad 1,
       3x3x512 Deconv /2 (63), 3x3x512 Conv pad 1, ReLU — the paper's stride 3 cannot reach 63.
    2: fc7 (32×32×1024) ← conv10_2 (10×10): 3x3x512 Deconv /3 (30), 1x1x512 Conv pad 1 (32), ReLU.
    3: conv7_2 (16×16×256) ← conv12_2 (6×6): 1x1x128 Deconv /3 (16), 1x1x128 Conv, ReLU.
    For Eltwise the last convolution outputs the low map's channels (1024 for fc7, 256 for
    conv7_2) so that the sum is defined.
    """
    if join not in ("concat", "eltwise"):
        raise ValueError(f"join {join!r}: use 'concat' or 'eltwise'")

    def joined(channels):   # the last convolution: Table 4's width, or the low map's for a sum
        return channels if join == "concat" else None
    if index == 1:
        stages = (deconv(512, 3, 2, pad=1), conv(512, 3, pad=1), deconv(512, 3, 2),
                  conv(joined(512), 3, pad=1, relu=True))
        low, high = "conv4_3", "conv6_2"
    elif index == 2:
        stages = (deconv(512, 3, 3), conv(joined(512), 1, pad=1, relu=True))
        low, high = "fc7", "conv10_2"
    elif index == 3:
        stages = (deconv(128, 1, 3), conv(joined(128), 1, relu=True))
        low, high = "conv7_2", "conv12_2"
    else:
        raise ValueError(f"up-sampling module {index}: the paper has modules 1, 2 and 3")
    return Module(f"up{index}", low, high, (), stages, join)


def down_module(index: int, join: str = "eltwise") -> Module:
    """Down-sampling module 1 or 2 (Table 6) with Eltwise-sum or Concat connection; the head
    normalises the output (Normalize, scale 20).

    1: conv4_3 (63×63) → Pool 2x2/2 (32), 3x3x256 Conv pad 1, 1x1x512 Conv, 1x1x256 Conv, ReLU,
       cropped to 23×23 from offset 4; conv9_2 (12×12) → 1x1x256 Deconv /2 (23), ReLU.
    2: fc7 (32×32) → Pool 2x2/2 (16), 3x3x512 Conv pad 1, 1x1x256 Conv, 1x1x256 Conv, ReLU,
       cropped to 11×11 from offset 2; conv12_2 (6×6) → 1x1x256 Deconv /2 (11), ReLU.
    The crops are centred (offset floor((32 − 23)/2) = 4, floor((16 − 11)/2) = 2); for module 1
    offset 4 also aligns the receptive-field centres exactly (both maps then have stride 16).
    """
    if index == 1:
        low, high, convs, offset = "conv4_3", "conv9_2", (256, 512, 256), 4
    elif index == 2:
        low, high, convs, offset = "fc7", "conv12_2", (512, 256, 256), 2
    else:
        raise ValueError(f"down-sampling module {index}: the paper has modules 1 and 2")
    low_branch = (pool(2, 2), conv(convs[0], 3, pad=1), conv(convs[1], 1), conv(convs[2], 1, relu=True))
    return Module(f"down{index}", low, high, low_branch, (deconv(256, 1, 2, relu=True),), join,
                  crop_offset=offset, normalization=20)

