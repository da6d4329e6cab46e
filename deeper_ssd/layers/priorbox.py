"""PriorBox: the default boxes of one feature map, with the SSD fork's semantics."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..proto import caffe_pb2
from .base import Layer, format_shape
from .registry import register


@register
class PriorBox(Layer):
    """Default boxes of one feature map (docs/semantics.md, "PriorBox").

    Bottoms: the feature map ``N x C x H x W`` and the input image ``N x 3 x img_h x img_w``
    (its size is used unless ``img_size``/``img_h``/``img_w`` are given). Top ``1 x 2 x HWP4``.

    Caffe's quirks kept here: ``min_size``/``max_size`` are truncated to integers before use; the
    per-cell order is ``min``, ``sqrt(min*max)``, then one box per non-unit ratio of the internal
    list ``[1, a1, 1/a1, a2, 1/a2, ...]`` (a ratio within 1e-6 of a listed one is skipped);
    cell centres and box sides are float32, the corner arithmetic is double, rounded to the
    output dtype at the end; ``clip`` clamps to [0, 1] after generation.

    OpenCV's extensions (docs/schema.md), with OpenCV's semantics: ``width``/``height`` give
    the boxes' sides in input pixels explicitly (used as given, not truncated; instead of
    min/max sizes and ratios), and ``offset_h``/``offset_w`` pairs replace ``offset`` with
    several centres per cell. Per cell the order is box, then offset:
    ``P = boxes x offsets`` priors per cell (docs/decisions.md for OpenCV's own count).
    """

    caffe_type = "PriorBox"
    float32 = True              # Caffe-semantic arithmetic, float32 under autocast
    num_bottoms = (2, 2)

    def setup(self, bottoms):
        p = self.lp.prior_box_param
        feature, image = bottoms
        if len(feature) != 4 or len(image) != 4:
            raise ValueError(f"bottoms must be 4-D (feature map, image); got "
                             f"{format_shape(feature)} and {format_shape(image)}")
        if len(p.width) != len(p.height):
            raise ValueError(f"{len(p.width)} width for {len(p.height)} height; give them in pairs")
        self.explicit_sides = [(float(w), float(h)) for w, h in zip(p.width, p.height)]
        if self.explicit_sides:
            if len(p.min_size) or len(p.max_size) or len(p.aspect_ratio):
                raise ValueError("width/height give the boxes explicitly: no min_size, max_size "
                                 "or aspect_ratio with them")
            if any(not (w > 0 and h > 0) for w, h in self.explicit_sides):
                raise ValueError(f"width and height must be positive, got {list(p.width)}, {list(p.height)}")
        elif not len(p.min_size):
            raise ValueError("must provide min_size (or width/height)")
        if any(not s > 0 for s in p.min_size):
            raise ValueError(f"min_size must be positive, got {list(p.min_size)}")
        self.min_sizes = [float(s) for s in p.min_size]
        ratios = [1.0]
        for ar in p.aspect_ratio:
            ar = float(np.float32(ar))
            if not ar > 0:
                raise ValueError(f"aspect_ratio must be positive, got {list(p.aspect_ratio)}")
            if any(abs(ar - r) < 1e-6 for r in ratios):
                continue
            ratios.append(ar)
            if p.flip:
                ratios.append(float(np.float32(1.0 / ar)))
        self.aspect_ratios = ratios
        self.max_sizes: List[float] = []
        if len(p.max_size):
            if len(p.max_size) != len(p.min_size):
                raise ValueError(f"{len(p.max_size)} max_size for {len(p.min_size)} min_size; "
                                 f"give one per min_size")
            for mn, mx in zip(p.min_size, p.max_size):
                if not mx > mn:
                    raise ValueError(f"max_size {mx} must be greater than min_size {mn}")
            self.max_sizes = [float(s) for s in p.max_size]
        if len(p.variance) > 1:
            if len(p.variance) != 4:
                raise ValueError(f"variance needs 1 or 4 values, got {len(p.variance)}")
        if any(not v > 0 for v in p.variance):
            raise ValueError(f"variance must be positive, got {list(p.variance)}")
        self.variance = [float(v) for v in p.variance] if len(p.variance) else [0.1]
        self.img_hw: Optional[Tuple[int, int]] = _height_width(p, "img_size", "img_h", "img_w")
        self.step_hw: Optional[Tuple[float, float]] = _height_width(p, "step", "step_h", "step_w")
        if len(p.offset_h) or len(p.offset_w):
            if p.HasField("offset"):
                raise ValueError("either offset or offset_h/offset_w should be specified; not both")
            if len(p.offset_h) != len(p.offset_w):
                raise ValueError(f"{len(p.offset_h)} offset_h for {len(p.offset_w)} offset_w; "
                                 "give them in pairs")
            self.offsets_hw = [(float(h), float(w)) for h, w in zip(p.offset_h, p.offset_w)]
        else:
            self.offsets_hw = [(p.offset, p.offset)]
        self.clip = p.clip
        self._prior_cache = {}
        self._box_sides = self._cell_box_sides()
        self.num_priors = len(self._box_sides) * len(self.offsets_hw)
        dim = feature[2] * feature[3] * self.num_priors * 4
        if dim <= 0:
            raise ValueError(f"feature map {format_shape(feature)} gives no prior")
        return [(1, 2, dim)]

    def _cell_box_sides(self) -> np.ndarray:
        """``B x 2`` float32 (width, height) of the boxes of one cell, in input pixels, in
        emission order; min/max sizes truncated to int as Caffe does, width/height as given."""
        if self.explicit_sides:
            return np.asarray(self.explicit_sides, dtype=np.float32)
        sides = []
        for s, raw_min in enumerate(self.min_sizes):
            mn = int(raw_min)
            sides.append((mn, mn))
            if self.max_sizes:
                mx = int(self.max_sizes[s])
                side = math.sqrt(mn * mx)                   # integer product, double sqrt
                sides.append((side, side))
            for ar in self.aspect_ratios:
                if abs(ar - 1.0) < 1e-6:
                    continue
                root = np.sqrt(np.float32(ar))             # float sqrt
                sides.append((np.float32(mn) * root, np.float32(mn) / root))
        return np.asarray(sides, dtype=np.float32)

    def priors(self, layer_hw: Tuple[int, int], img_hw: Tuple[int, int],
               dtype=torch.float32, device=None) -> torch.Tensor:
        """The top blob ``1 x 2 x (H W P 4)`` for a ``layer_hw`` feature map and ``img_hw`` input."""
        layer_h, layer_w = layer_hw
        img_h, img_w = self.img_hw or img_hw
        if self.step_hw is not None:
            step_h, step_w = (np.float32(s) for s in self.step_hw)
        else:
            step_h = np.float32(np.float32(img_h) / np.float32(layer_h))
            step_w = np.float32(np.float32(img_w) / np.float32(layer_w))
        f32 = dict(dtype=torch.float32, device=device)
        off_h, off_w = torch.tensor(self.offsets_hw, **f32).T                  # O each
        cx = (torch.arange(layer_w, **f32).view(-1, 1) + off_w) * float(step_w)  # W x O float32
        cy = (torch.arange(layer_h, **f32).view(-1, 1) + off_h) * float(step_h)  # H x O
        sides = torch.as_tensor(self._box_sides, device=device).double()        # B x 2
        half_w, half_h = sides[:, :1] / 2.0, sides[:, 1:] / 2.0                 # B x 1
        cxd = cx.double().view(1, layer_w, 1, -1)
        cyd = cy.double().view(layer_h, 1, 1, -1)
        shape = (layer_h, layer_w, len(self._box_sides), len(self.offsets_hw))
        boxes = torch.stack([((cxd - half_w) / img_w).expand(shape),
                             ((cyd - half_h) / img_h).expand(shape),
                             ((cxd + half_w) / img_w).expand(shape),
                             ((cyd + half_h) / img_h).expand(shape)], dim=-1).reshape(-1)
        boxes = boxes.to(dtype)
        if self.clip:
            boxes = boxes.clamp(0.0, 1.0)
        variances = torch.tensor((self.variance * 4)[:4], dtype=dtype, device=device)
        variances = variances.repeat(boxes.numel() // 4)
        return torch.stack([boxes, variances]).unsqueeze(0)

    #: distinct (feature size, image size, dtype, device) kept; more are rare (a few test sizes)
    CACHE_SIZE = 8

    def forward(self, feature, image):
        """The priors for these bottoms' sizes, computed once per (feature size, image size,
        dtype, device): they depend on nothing else, and recomputing them costs host-to-device
        copies and kernel launches every forward. The cached tensor is returned itself (no
        layer writes into a prior blob)."""
        key = (tuple(feature.shape[2:]), tuple(image.shape[2:]), feature.dtype, feature.device)
        cache = self._prior_cache
        top = cache.get(key)
        if top is None:
            if len(cache) >= self.CACHE_SIZE:
                cache.clear()
            top = cache[key] = self.priors(*key)
        return top


def _height_width(p: caffe_pb2.PriorBoxParameter, single: str, height: str, width: str):
    """``(height, width)`` from a PriorBoxParameter's ``single`` field or its ``height``/``width``
    pair (Caffe's checks: not both, all > 0); None when neither is set."""
    if p.HasField(height) or p.HasField(width):
        if p.HasField(single):
            raise ValueError(f"either {single} or {height}/{width} should be specified; not both")
        h, w = getattr(p, height), getattr(p, width)
        if not (h > 0 and w > 0):
            raise ValueError(f"{height} ({h}) and {width} ({w}) must both be > 0")
        return (h, w)
    if p.HasField(single):
        if not getattr(p, single) > 0:
            raise ValueError(f"{single} should be larger than 0")
        return (getattr(p, single),) * 2
    return None
