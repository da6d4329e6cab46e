"""SSD network construction in the style of the SSD fork's own generator.

The pieces mirror ``python/caffe/model_libs.py`` and ``examples/ssd/ssd_pascal.py`` of
weiliu89/caffe (docs/semantics.md, "SSD300 reference settings"): ``ConvBNLayer``
(:meth:`FeatureNet.conv`), ``VGGNetBody(fully_conv, reduced, dilated, dropout=False)``
(:func:`vgg16_reduced`), ``AddExtraLayers`` (:func:`add_extra_layers`), ``CreateMultiBoxHead``
(:func:`multibox_head`) and the script's data/loss/test/deploy assembly (:class:`SSDModel`).
With the SSD300/SSD512 VOC0712 settings the result equals the fork's prototxt message for
message; :mod:`deeper_ssd.builder.deeper` adds the Deeper SSD layers and modules on top.

Knobs beyond the fork: a width multiplier for every feature convolution, BatchNorm + Scale after
each feature convolution (the fork's ``use_batchnorm`` form of ConvBNLayer; the prediction
convolutions never get it), explicit prior sizes/ratios/steps, and the input size.

Shapes are ``N x C x H x W``; the prediction sources are ordered by decreasing map size (ties in
network order) and the prior rules below are applied along that order.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .. import shapes
from ..proto import caffe_pb2
from .netspec import TEST, TRAIN, L, NetSpec, P, Top
from .solver import SolverSettings

__all__ = [
    "FeatureNet", "ExtraConv", "SSD300_EXTRAS", "SSD512_EXTRAS", "SSD_SOURCES", "vgg16_reduced",
    "extra_pair", "add_extra_layers", "PriorSpec", "ratio_rule_sizes", "default_aspect_ratios",
    "default_step",
    "priors_per_cell", "multibox_head", "Dataset", "TrainTransform", "Detection", "Matching", "SSDModel",
    "SSDPlan", "PredictionLayer", "FrozenMap",
]

XAVIER = dict(type="xavier")
#: the weight filler of the fork's ConvBNLayer (model_libs.py) for convolutions followed by BatchNorm
FORK_BATCHNORM_FILLER = dict(type="gaussian", std=0.01)
ZERO = dict(type="constant", value=0)


class FrozenMap(Mapping):
    """A read-only, hashable mapping: the dict-valued fields of the frozen settings classes
    (equal to a dict with the same items)."""

    def __init__(self, items=()):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


# ---------------------------------------------------------------------------------------------
# ConvBNLayer and the bookkeeping every builder needs

class FeatureNet:
    """A :class:`NetSpec` under construction plus, for every blob the builder made, its channel
    count and its cumulative stride relative to the input (a Fraction: a deconvolution divides
    it). ``width`` scales the ``num_output`` of feature convolutions; ``batchnorm`` puts the
    fork's BatchNorm + Scale pair after each of them, those convolutions drawing their weights
    from ``batchnorm_filler`` (the fork's ConvBNLayer: gaussian std 0.01) and BatchNorm
    averaging its statistics with ``moving_average_fraction`` (the fork's 0.999). A ``frozen``
    net learns nothing: every parameter blob gets ``lr_mult: 0 decay_mult: 0`` and BatchNorm
    uses its stored statistics (a distillation teacher).

    Builders read blobs through :meth:`top`; a head that must sit between a blob and its
    readers registers :meth:`before_read`."""

    def __init__(self, net: NetSpec, data: str = "data", width: float = 1.0, batchnorm: bool = False,
                 batchnorm_filler: Optional[dict] = None, moving_average_fraction: float = 0.999,
                 frozen: bool = False):
        if width <= 0:
            raise ValueError(f"width multiplier must be positive, got {width}")
        if not 0 <= moving_average_fraction < 1:
            raise ValueError(f"moving_average_fraction must be in [0, 1), got {moving_average_fraction}")
        self.net, self.data, self.width, self.batchnorm = net, data, width, batchnorm
        self.batchnorm_filler = dict(batchnorm_filler or FORK_BATCHNORM_FILLER)
        self.moving_average_fraction = moving_average_fraction
        self.frozen = frozen
        self.channels: Dict[str, int] = {data: 3}
        self.stride: Dict[str, Fraction] = {data: Fraction(1)}
        self._last: Dict[str, Top] = {data: net[data]}
        self._before_read: Dict[str, Callable[[Top], Top]] = {}
        self._replaced: set = set()

    def top(self, blob: str) -> Top:
        """The Top a layer reading ``blob`` reads: the latest one writing it (after its in-place
        ReLU/BatchNorm/Scale), or what a :meth:`before_read` hook put in its place."""
        hook = self._before_read.pop(blob, None)
        if hook is not None:
            self._last[blob] = hook(self._last[blob])
            self._replaced.add(blob)
        return self._last[blob]

    def before_read(self, blob: str, build: Callable[[Top], Top]) -> None:
        """When a layer first reads ``blob`` (its in-place layers done), ``build(top)`` adds
        layers and returns the Top that this reader and every later one reads instead."""
        self._before_read[blob] = build

    def params(self, *specs: dict) -> List[dict]:
        """ParamSpecs for a layer's parameter blobs: ``specs``, or all zero when frozen."""
        return [dict(lr_mult=0, decay_mult=0) for _ in specs] if self.frozen else list(specs)

    def freeze(self, blobs: int) -> dict:
        """Keywords for a layer that writes no ParamSpec: ``blobs`` zero ones when frozen."""
        return dict(param=self.params(*[{}] * blobs)) if self.frozen else {}

    def widen(self, num_output: int) -> int:
        return max(1, int(round(num_output * self.width)))

    def _record(self, name: str, top: Top, channels: int, stride: Fraction) -> None:
        self.net[name] = top
        self._last[name] = top
        self.channels[name], self.stride[name] = channels, stride

    def in_place(self, layer_name: str, blob: str, top: Top) -> None:
        """Register an in-place layer (ReLU, BatchNorm, Scale) named ``layer_name`` on ``blob``."""
        if blob in self._replaced:
            raise ValueError(f"'{blob}' is rewritten in place by {layer_name} after a head took its "
                             "place for its readers; attach the head to a blob that is final when read")
        self.net[layer_name] = top
        self._last[blob] = top

    def conv(self, name: str, bottom: str, num_output: int, kernel_size: int, *,
             pad: Optional[int] = None, stride: Optional[int] = None, dilation: Optional[int] = None,
             relu: Optional[str] = None, deconv: bool = False, feature: bool = True,
             widen: bool = True, lr_mult: float = 1) -> str:
        """ConvBNLayer: a Convolution (or Deconvolution) ``name`` reading ``bottom``; ``pad``,
        ``stride`` and ``dilation`` are written only when given (the fork's VGG body and its
        ConvBNLayer write different subsets). ``feature`` convolutions are widened (unless
        ``widen=False``: ``num_output`` is then exact) and get BatchNorm when the net has it;
        prediction convolutions pass ``feature=False``.
        ``relu`` names an in-place ReLU. Returns ``name`` (the top blob)."""
        batchnorm = feature and self.batchnorm
        if feature and widen:
            num_output = self.widen(num_output)
        kwargs = dict(num_output=num_output, kernel_size=kernel_size)
        for key, value in (("pad", pad), ("stride", stride), ("dilation", dilation)):
            if value is not None:
                kwargs[key] = value
        if batchnorm:
            kwargs.update(param=self.params(dict(lr_mult=lr_mult, decay_mult=1)), bias_term=False,
                          weight_filler=dict(self.batchnorm_filler))
        else:
            kwargs.update(param=self.params(dict(lr_mult=lr_mult, decay_mult=1),
                                            dict(lr_mult=2 * lr_mult, decay_mult=0)),
                          weight_filler=XAVIER, bias_filler=ZERO)
        layer = L.Deconvolution if deconv else L.Convolution
        s = Fraction(stride or 1)
        self._record(name, layer(self.top(bottom), **kwargs), num_output,
                     self.stride[bottom] / s if deconv else self.stride[bottom] * s)
        if batchnorm:
            statistics = dict(use_global_stats=True) if self.frozen else {}
            self.in_place(f"{name}_bn", name, L.BatchNorm(
                self._last[name], in_place=True, param=[dict(lr_mult=0, decay_mult=0)] * 3,
                eps=0.001, moving_average_fraction=self.moving_average_fraction, **statistics))
            self.in_place(f"{name}_scale", name, L.Scale(
                self._last[name], in_place=True, bias_term=True,
                param=self.params(*[dict(lr_mult=lr_mult, decay_mult=0)] * 2),
                filler=dict(type="constant", value=1.0), bias_filler=dict(type="constant", value=0.0)))
        if relu:
            self.relu(relu, name)
        return name

    def relu(self, layer_name: str, blob: str) -> None:
        self.in_place(layer_name, blob, L.ReLU(self._last[blob], in_place=True))

    def pool(self, name: str, bottom: str, kernel_size: int, stride: int,
             pad: Optional[int] = None) -> str:
        """MAX pooling (Caffe rounds up)."""
        kwargs = dict(pool=P.Pooling.MAX, kernel_size=kernel_size, stride=stride)
        if pad is not None:
            kwargs["pad"] = pad
        self._record(name, L.Pooling(self.top(bottom), **kwargs), self.channels[bottom],
                     self.stride[bottom] * stride)
        return name

    def crop(self, name: str, bottom: str, reference: str, offset: int) -> str:
        """Crop ``bottom`` to ``reference``'s height and width, starting ``offset`` cells in."""
        self._record(name, L.Crop(self.top(bottom), self.top(reference), axis=2, offset=[offset]),
                     self.channels[bottom], self.stride[bottom])
        return name

    def join(self, name: str, bottoms: Sequence[str], how: str) -> str:
        """Concat (channels add up) or Eltwise SUM (channels must agree) of ``bottoms``; the
        result lives on the first bottom's grid."""
        tops = [self.top(b) for b in bottoms]
        if how == "concat":
            top, channels = L.Concat(*tops, axis=1), sum(self.channels[b] for b in bottoms)
        elif how == "eltwise":
            top, channels = L.Eltwise(*tops, operation=P.Eltwise.SUM), self.channels[bottoms[0]]
        else:
            raise ValueError(f"join {how!r}: use 'concat' or 'eltwise'")
        self._record(name, top, channels, self.stride[bottoms[0]])
        return name


# ---------------------------------------------------------------------------------------------
# VGG16 reduced (fully_conv, reduced, dilated, no dropout) and the extra layers

def vgg16_reduced(fn: FeatureNet, bottom: Optional[str] = None) -> str:
    """conv1_1 … fc7 of the fork's VGGNetBody(fully_conv=True, reduced=True, dilated=True,
    dropout=False): five 3x3/1/1 blocks with 2x2/2 MAX pools (ceil rounding), pool5 3x3/1/1,
    fc6 3x3 dilation 6 pad 6 (1024), fc7 1x1 (1024). 300x300 input → conv4_3 38x38,
    fc7 19x19; 500 → 63, 32. Returns "fc7"."""
    blob = bottom or fn.data
    blocks = ((1, 64, 2), (2, 128, 2), (3, 256, 3), (4, 512, 3), (5, 512, 3))
    for block, channels, depth in blocks:
        for i in range(1, depth + 1):
            # the fork writes `dilation: 1` explicitly on conv5_x (dilate_pool4 support)
            blob = fn.conv(f"conv{block}_{i}", blob, channels, 3, pad=1, relu=f"relu{block}_{i}",
                           dilation=1 if block == 5 else None)
        if block < 5:
            blob = fn.pool(f"pool{block}", blob, 2, 2)
    fn.pool("pool5", blob, 3, 1, pad=1)
    fn.conv("fc6", "pool5", 1024, 3, pad=6, dilation=6, relu="relu6")
    return fn.conv("fc7", "fc6", 1024, 1, relu="relu7")


@dataclass(frozen=True)
class ExtraConv:
    """One extra feature convolution (ConvBNLayer with ReLU ``<name>_relu``)."""
    name: str
    num_output: int
    kernel_size: int
    pad: int
    stride: int


def extra_pair(index: int, inner_stride: int = 2, inner_pad: int = 1,
               kernel: int = 3) -> Tuple[ExtraConv, ExtraConv]:
    """conv<i>_1 (1x1, 128 or 256) and conv<i>_2 (k x k, 256 or 512), as ssd_pascal.py."""
    wide = index == 6
    return (ExtraConv(f"conv{index}_1", 256 if wide else 128, 1, 0, 1),
            ExtraConv(f"conv{index}_2", 512 if wide else 256, kernel, inner_pad, inner_stride))


SSD300_EXTRAS: Tuple[ExtraConv, ...] = (*extra_pair(6), *extra_pair(7), *extra_pair(8, 1, 0),
                                        *extra_pair(9, 1, 0))
SSD512_EXTRAS: Tuple[ExtraConv, ...] = (*extra_pair(6), *extra_pair(7), *extra_pair(8), *extra_pair(9),
                                        *extra_pair(10, 1, 1, kernel=4))
SSD_SOURCES = ("conv4_3", "fc7", "conv6_2", "conv7_2", "conv8_2", "conv9_2")


def add_extra_layers(fn: FeatureNet, extras: Sequence[ExtraConv], bottom: str = "fc7") -> str:
    """AddExtraLayers: each ExtraConv after the previous one, with in-place ReLU."""
    for extra in extras:
        bottom = fn.conv(extra.name, bottom, extra.num_output, extra.kernel_size, pad=extra.pad,
                         stride=extra.stride, relu=f"{extra.name}_relu")
    return bottom


# ---------------------------------------------------------------------------------------------
# priors

@dataclass(frozen=True)
class PriorSpec:
    """PriorBox settings of one prediction layer (one min size, optional max size)."""
    min_size: float
    max_size: Optional[float]
    aspect_ratios: Tuple[float, ...]
    step: float


def ratio_rule_sizes(input_size: int, count: int, min_ratio: int = 20, max_ratio: int = 90,
                     first: Tuple[float, float] = (10, 20)) -> List[Tuple[float, float]]:
    """The fork's min_ratio/max_ratio rule (ssd_pascal.py:308-317): ``step = floor((max_ratio -
    min_ratio) / (count - 2))``; layer ``i >= 1`` gets ``min = input·r_i/100`` and ``max =
    input·(r_i + step)/100`` with ``r_i = min_ratio + (i - 1)·step``; layer 0 gets
    ``first = (min %, max %)``. The script loops ``range(min_ratio, max_ratio + 1, step)``, which
    yields one ratio too many for 11 and 14 layers; taking the first ``count - 1`` ratios is the
    same rule wherever the script works. SSD300: (30, 60), (60, 111) … (264, 315)."""
    if count < 3:
        raise ValueError(f"the ratio rule needs at least 3 prediction layers, got {count}")
    step = int(math.floor((max_ratio - min_ratio) / (count - 2)))
    sizes = [(input_size * first[0] / 100., input_size * first[1] / 100.)]
    for i in range(count - 1):
        ratio = min_ratio + i * step
        sizes.append((input_size * ratio / 100., input_size * (ratio + step) / 100.))
    return sizes


def default_aspect_ratios(count: int) -> List[Tuple[float, ...]]:
    """SSD300/SSD512's pattern: [2] on the first and the last two layers, [2, 3] between."""
    return [(2.,) if i == 0 or i >= count - 2 else (2., 3.) for i in range(count)]


def default_step(input_size: int, map_size: int, stride: Fraction) -> float:
    """A map whose cells tile the image at its cumulative stride (``ceil(input / stride) ==
    map_size``) uses that stride; a map shrunk by unpadded convolutions spreads its cells over
    the image: ``input / map_size``. Reproduces SSD300's 8, 16, 32, 64, 100, 300 and SSD512's
    8 … 256, 512."""
    if stride.denominator == 1 and math.ceil(input_size / stride) == map_size:
        return float(stride)
    return input_size / map_size


def priors_per_cell(spec: PriorSpec, flip: bool = True) -> int:
    """CreateMultiBoxHead's count: (1 + [max] + ratios) · (2 with flip, for the ratios)."""
    return 1 + (spec.max_size is not None) + len(spec.aspect_ratios) * (2 if flip else 1)


# ---------------------------------------------------------------------------------------------
# CreateMultiBoxHead

def multibox_head(fn: FeatureNet, sources: Sequence[str], priors: Sequence[PriorSpec],
                  normalizations: Sequence[float], num_classes: int, *, share_location: bool = True,
                  flip: bool = True, clip: bool = False, variance=(0.1, 0.1, 0.2, 0.2),
                  offset: float = 0.5, kernel_size: int = 3, pad: int = 1,
                  lr_mult: float = 1, upsample: int = 1,
                  img_size: Optional[int] = None) -> Tuple[Top, Top, Top]:
    """For each source S: optional ``S_norm`` (Normalize, value != -1), ``S_mbox_loc`` /
    ``S_mbox_conf`` (3x3/1/1 convolutions, P·4 and P·classes outputs) each with ``_perm``
    (N×H×W×C) and ``_flat`` (N×HWC), and ``S_mbox_priorbox`` (1×2×HWP·4); then ``mbox_loc``
    (N×ΣHWP·4), ``mbox_conf`` (N×ΣHWP·classes) and ``mbox_priorbox`` (1×2×ΣHWP·4).

    ``upsample`` > 1: the three read ``S_up`` = Upsample(S) (nearest, that factor) instead of
    ``S`` (ZoomInNet's layer adaption); ``img_size`` is written into every PriorBox."""
    if not (len(sources) == len(priors) == len(normalizations)):
        raise ValueError("sources, priors and normalizations must have the same length")
    n = fn.net
    locs, confs, boxes = [], [], []
    for source, spec, norm in zip(sources, priors, normalizations):
        ratios = list(spec.aspect_ratios)
        if any(r == 1 for r in ratios) or len(set(ratios)) != len(ratios):
            raise ValueError(f"{source}: aspect ratios {ratios} must be distinct and not 1 (the "
                             "PriorBox layer drops those, the head width would not)")
        if norm != -1:
            name = f"{source}_norm"
            fn._record(name, L.Normalize(fn.top(source), scale_filler=dict(type="constant", value=norm),
                                         across_spatial=False, channel_shared=False, **fn.freeze(1)),
                       fn.channels[source], fn.stride[source])
            source = name
        read = source
        if upsample != 1:
            read = f"{source}_up"
            fn._record(read, L.Upsample(fn.top(source), scale=upsample), fn.channels[source],
                       fn.stride[source] / upsample)
        per_cell = priors_per_cell(spec, flip)
        outputs = (("loc", per_cell * 4 * (1 if share_location else num_classes), locs),
                   ("conf", per_cell * num_classes, confs))
        for kind, num_output, collected in outputs:
            name = fn.conv(f"{source}_mbox_{kind}", read, num_output, kernel_size, pad=pad,
                           stride=1, feature=False, lr_mult=lr_mult)
            n[f"{name}_perm"] = L.Permute(fn.top(name), order=[0, 2, 3, 1])
            n[f"{name}_flat"] = L.Flatten(n[f"{name}_perm"], axis=1)
            collected.append(n[f"{name}_flat"])
        prior = dict(min_size=[spec.min_size], clip=clip, variance=list(variance), offset=offset)
        if spec.max_size is not None:
            prior["max_size"] = [spec.max_size]
        if ratios:
            prior.update(aspect_ratio=ratios, flip=flip)
        prior["step"] = spec.step
        if img_size is not None:
            prior["img_size"] = img_size
        n[f"{source}_mbox_priorbox"] = L.PriorBox(fn.top(read), fn.top(fn.data), **prior)
        boxes.append(n[f"{source}_mbox_priorbox"])
    n.mbox_loc = L.Concat(*locs, axis=1)
    n.mbox_conf = L.Concat(*confs, axis=1)
    n.mbox_priorbox = L.Concat(*boxes, axis=2)
    return n.mbox_loc, n.mbox_conf, n.mbox_priorbox


# ---------------------------------------------------------------------------------------------
# data, loss, detection settings

@dataclass(frozen=True)
class Dataset:
    """Where a model's data lives and what DetectionOutput/DetectionEvaluate need of it.
    ``name_size_file`` and ``result_directory`` (save_output_param, ``{size}`` is replaced by
    the input size) are optional; without them evaluation runs on normalised boxes and no
    result files are written."""
    name: str
    num_classes: int
    label_map_file: str
    train_source: str
    test_source: str
    num_test_image: int
    name_size_file: Optional[str] = None
    result_directory: Optional[str] = None


@dataclass(frozen=True)
class TrainTransform:
    """The SSD training augmentation (ssd_pascal.py:89-211); fork values by default.
    ``random_crop=False`` keeps only the whole-image batch_sampler (no crop samplers), the
    expansion still applies when ``expand_prob`` > 0."""
    mirror: bool = True
    mean_value: Tuple[float, ...] = (104, 117, 123)
    expand_prob: float = 0.5
    max_expand_ratio: float = 4.0
    distort: bool = True
    random_crop: bool = True
    min_jaccard_overlaps: Tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    min_crop_scale: float = 0.3


@dataclass(frozen=True)
class Detection:
    """DetectionOutput / DetectionEvaluate settings (fork defaults; the paper uses NMS 0.5)."""
    nms_threshold: float = 0.45
    top_k: int = 400
    keep_top_k: int = 200
    confidence_threshold: float = 0.01
    overlap_threshold: float = 0.5


@dataclass(frozen=True)
class Matching:
    """MultiBoxLoss matching and hard-negative mining (fork defaults). A prior is positive at
    IoU >= ``overlap_threshold`` with a ground-truth box (besides each box's best prior); only
    priors under ``neg_overlap`` with every box may be mined as negatives, ``neg_pos_ratio``
    of them per positive. ``use_difficult_gt=False`` leaves ``difficult`` boxes out of the
    ground truth (the fork's default keeps them as positives)."""
    overlap_threshold: float = 0.5
    neg_overlap: float = 0.5
    neg_pos_ratio: float = 3.0
    use_difficult_gt: bool = True


def _batch_samplers(t: TrainTransform) -> list:
    sampler = dict(min_scale=t.min_crop_scale, max_scale=1.0, min_aspect_ratio=0.5, max_aspect_ratio=2.0)
    samplers = [dict(max_sample=1, max_trials=1)]
    if not t.random_crop:
        return samplers
    samplers += [dict(sampler=sampler, sample_constraint=dict(min_jaccard_overlap=j), max_sample=1,
                      max_trials=50) for j in t.min_jaccard_overlaps]
    samplers.append(dict(sampler=sampler, sample_constraint=dict(max_jaccard_overlap=1.0),
                         max_sample=1, max_trials=50))
    return samplers


def _transform_param(size: int, train: bool, t: TrainTransform) -> dict:
    modes = ["LINEAR", "AREA", "NEAREST", "CUBIC", "LANCZOS4"] if train else ["LINEAR"]
    resize = dict(prob=1, resize_mode="WARP", height=size, width=size, interp_mode=modes)
    param = dict(mean_value=list(t.mean_value), resize_param=resize)
    if not train:
        return param
    param.update(mirror=t.mirror, emit_constraint=dict(emit_type="CENTER"))
    if t.distort:
        param["distort_param"] = dict(
            brightness_prob=0.5, brightness_delta=32, contrast_prob=0.5, contrast_lower=0.5,
            contrast_upper=1.5, hue_prob=0.5, hue_delta=18, saturation_prob=0.5,
            saturation_lower=0.5, saturation_upper=1.5, random_order_prob=0.0)
    if t.expand_prob > 0:
        param["expand_param"] = dict(prob=t.expand_prob, max_expand_ratio=t.max_expand_ratio)
    return param


# ---------------------------------------------------------------------------------------------
# the model

@dataclass(frozen=True)
class PredictionLayer:
    """One prediction source as planned: its blob, map size, priors and normalisation."""
    source: str
    map_size: int
    channels: int
    prior: PriorSpec
    normalization: float

    @property
    def head_input(self) -> str:
        """The blob the head reads: ``<source>_norm`` when normalised."""
        return self.source if self.normalization == -1 else f"{self.source}_norm"

    @property
    def num_priors(self) -> int:
        return self.map_size * self.map_size * priors_per_cell(self.prior)


@dataclass(frozen=True)
class SSDPlan:
    """What a model's features give at its input size: the prediction layers in head order."""
    layers: Tuple[PredictionLayer, ...]

    @property
    def num_priors(self) -> int:
        return sum(layer.num_priors for layer in self.layers)


@dataclass(frozen=True)
class SSDModel:
    """Everything that defines one SSD-family detector and its train/test/deploy nets.

    ``sources`` are the base prediction blobs (before module outputs); ``modules`` are objects
    with ``name``, ``normalization`` and ``build(fn) -> output blob`` (see
    :mod:`deeper_ssd.builder.deeper`); each module output becomes one more prediction layer.
    ``prior_sizes``, ``aspect_ratios`` and ``steps`` override the rules above (in head order).
    ``normalizations`` maps a source to its Normalize scale (a dict is accepted and frozen:
    models are hashable and compare by value).

    Each net is one build pass through :class:`NetSpec` (:meth:`_net`): ``_input``, a
    :class:`FeatureNet` with ``_attach`` before :meth:`features`, :meth:`multibox`, then the
    loss (``_finish_train`` after it) or the detection layers. The heads of
    :mod:`deeper_ssd.builder.heads` are subclasses that override these steps.
    """
    name: str
    net_name: str
    input_size: int
    dataset: Dataset
    extras: Tuple[ExtraConv, ...] = SSD300_EXTRAS
    sources: Tuple[str, ...] = SSD_SOURCES
    modules: Tuple = ()
    width: float = 1.0
    batchnorm: bool = False
    batchnorm_filler: Tuple[Tuple[str, object], ...] = tuple(FORK_BATCHNORM_FILLER.items())
    bn_moving_average_fraction: float = 0.999
    min_ratio: int = 20
    max_ratio: int = 90
    first_ratios: Tuple[float, float] = (10, 20)
    prior_sizes: Optional[Tuple[Tuple[float, Optional[float]], ...]] = None
    aspect_ratios: Optional[Tuple[Tuple[float, ...], ...]] = None
    steps: Optional[Tuple[float, ...]] = None
    normalizations: Dict[str, float] = FrozenMap({"conv4_3": 20})     # given as a dict, kept frozen
    batch_size: int = 8
    test_batch_size: int = 8
    transform: TrainTransform = TrainTransform()
    detection: Detection = Detection()
    matching: Matching = Matching()
    solver: Optional[SolverSettings] = None

    def __post_init__(self):
        object.__setattr__(self, "normalizations", FrozenMap(self.normalizations))

    def replace(self, **changes) -> "SSDModel":
        return dataclasses.replace(self, **changes)

    # -- features ---------------------------------------------------------------------------
    def features(self, fn: FeatureNet) -> List[str]:
        """Body, extra layers and modules on ``fn``; returns the prediction sources in network
        order (base sources, then one output per module)."""
        vgg16_reduced(fn)
        add_extra_layers(fn, self.extras)
        return list(self.sources) + [module.build(fn) for module in self.modules]

    def feature_builder(self, n: NetSpec, frozen: bool = False) -> FeatureNet:
        """A FeatureNet on ``n`` (whose ``data`` is the image) with this model's width and
        BatchNorm settings."""
        return FeatureNet(n, width=self.width, batchnorm=self.batchnorm,
                          batchnorm_filler=dict(self.batchnorm_filler),
                          moving_average_fraction=self.bn_moving_average_fraction, frozen=frozen)

    def feature_net(self, batch: int = 1) -> Tuple[caffe_pb2.NetParameter, FeatureNet, List[str]]:
        """The features alone behind an Input layer (what shape checks and Table 1 use)."""
        n = NetSpec()
        n.data = L.Input(shape=dict(dim=[batch, 3, self.input_size, self.input_size]))
        fn = self.feature_builder(n)
        sources = self.features(fn)
        return n.to_proto(f"{self.net_name}_features"), fn, sources

    def plan(self) -> SSDPlan:
        """Run static shape inference over the features (refusing any Concat/Eltwise/Crop whose
        inputs disagree, with the layer name and shapes) and lay out the prediction layers:
        ordered by decreasing map size, priors by the rules unless overridden."""
        return self.planned()[0]

    def planned(self) -> Tuple[SSDPlan, Dict[str, Tuple[int, ...]]]:
        """:meth:`plan` and the blob shapes it found: every feature blob at batch 1, and each
        prediction layer's head input (``<source>_norm``: its source's shape)."""
        net, fn, sources = self.feature_net()
        blob_shapes = dict(shapes.plan_net(net, caffe_pb2.TEST, device="meta").blob_shapes)
        sizes = {s: blob_shapes[s][2] for s in sources}
        for s in sources:
            if blob_shapes[s][2] != blob_shapes[s][3]:
                raise ValueError(f"{self.name}: prediction source {s} is not square: {blob_shapes[s]}")
        ordered = sorted(sources, key=lambda s: (-sizes[s], sources.index(s)))
        count = len(ordered)
        norms = {**self.normalizations, **{m.output: m.normalization for m in self.modules}}
        prior_sizes = self.prior_sizes or ratio_rule_sizes(
            self.input_size, count, self.min_ratio, self.max_ratio, self.first_ratios)
        ratios = self.aspect_ratios or default_aspect_ratios(count)
        steps = self.steps or [default_step(self.input_size, sizes[s], fn.stride[s]) for s in ordered]
        for what, values in (("prior_sizes", prior_sizes), ("aspect_ratios", ratios), ("steps", steps)):
            if len(values) != count:
                raise ValueError(f"{self.name}: {len(values)} {what} for {count} prediction layers")
        layers = tuple(
            PredictionLayer(s, sizes[s], blob_shapes[s][1],
                            PriorSpec(mn, mx, tuple(float(r) for r in ar), step), norms.get(s, -1))
            for s, (mn, mx), ar, step in zip(ordered, prior_sizes, ratios, steps))
        blob_shapes.update({layer.head_input: blob_shapes[layer.source] for layer in layers})
        return SSDPlan(layers), blob_shapes

    # -- the nets ---------------------------------------------------------------------------
    # One build pass per net through NetSpec. A head (builder/heads.py) is a subclass that adds
    # its layers in this pass by overriding the steps below.

    def transform_param(self, train: bool, size: Optional[int] = None) -> dict:
        """The data layer's TransformationParameter fields (resizing to ``size``, default S)."""
        return _transform_param(size or self.input_size, train, self.transform)

    def annotated_data(self, train: bool, size: int, name: str = "data") -> Tuple[Top, Top]:
        """The AnnotatedData layer ``name`` resizing to ``size``: its (image, label) tops."""
        data = self.dataset
        return L.AnnotatedData(
            name=name, ntop=2, include=dict(phase=TRAIN if train else TEST),
            transform_param=self.transform_param(train, size),
            data_param=dict(source=data.train_source if train else data.test_source,
                            batch_size=self.batch_size if train else self.test_batch_size,
                            backend="LMDB"),
            annotated_data_param=dict(batch_sampler=_batch_samplers(self.transform) if train else [{}],
                                      label_map_file=data.label_map_file))

    def _input(self, n: NetSpec, phase: str) -> None:
        """The input layers: ``n.data`` (N x 3 x S x S) and ``n.label``."""
        n.data, n.label = self.annotated_data(phase != "test", self.input_size)

    def _attach(self, fn: FeatureNet, plan: SSDPlan, phase: str) -> None:
        """Called before the features are built (:meth:`FeatureNet.before_read` hooks); no-op."""

    def multibox(self, fn: FeatureNet, plan: SSDPlan) -> List[Top]:
        """CreateMultiBoxHead over the planned prediction layers: (loc, conf, priorbox)."""
        return list(multibox_head(fn, [l.source for l in plan.layers], [l.prior for l in plan.layers],
                                  [l.normalization for l in plan.layers], self.dataset.num_classes))

    def _finish_train(self, n: NetSpec, fn: FeatureNet, plan: SSDPlan, phase: str) -> None:
        """Called after the MultiBoxLoss of a train net; no-op."""

    def _net(self, phase: str, plan: SSDPlan) -> caffe_pb2.NetParameter:
        """The net of ``phase``: ``test``, ``deploy`` or a train phase (``train…``)."""
        if phase == "deploy":
            # ssd_pascal.py's deploy net: the test net without its data and evaluation layers,
            # with the net-level (legacy) input fields.
            net = self._net("test", plan)
            del net.layer[0]
            del net.layer[-1]
            net.name = f"{self.net_name}_deploy"
            net.input.append("data")
            net.input_shape.add().dim.extend([1, 3, self.input_size, self.input_size])
            return net
        n = NetSpec()
        size, data = self.input_size, self.dataset
        self._input(n, phase)
        fn = self.feature_builder(n)
        self._attach(fn, plan, phase)
        self.features(fn)
        mbox = self.multibox(fn, plan)
        if phase != "test":
            n.mbox_loss = L.MultiBoxLoss(
                *mbox, n.label, include=dict(phase=TRAIN), propagate_down=[True, True, False, False],
                loss_param=dict(normalization="VALID"),
                multibox_loss_param=dict(
                    loc_loss_type="SMOOTH_L1", conf_loss_type="SOFTMAX", loc_weight=1.0,
                    num_classes=data.num_classes, share_location=True, match_type="PER_PREDICTION",
                    overlap_threshold=self.matching.overlap_threshold, use_prior_for_matching=True,
                    background_label_id=0, use_difficult_gt=self.matching.use_difficult_gt,
                    neg_pos_ratio=self.matching.neg_pos_ratio, neg_overlap=self.matching.neg_overlap,
                    code_type="CENTER_SIZE",
                    ignore_cross_boundary_bbox=False, mining_type="MAX_NEGATIVE"))
            self._finish_train(n, fn, plan, phase)
            return n.to_proto(f"{self.net_name}_{phase}")
        det = self.detection
        n.mbox_conf_reshape = L.Reshape(n.mbox_conf, shape=dict(dim=[0, -1, data.num_classes]))
        n.mbox_conf_softmax = L.Softmax(n.mbox_conf_reshape, axis=2)
        n.mbox_conf_flatten = L.Flatten(n.mbox_conf_softmax, axis=1)
        output = dict(num_classes=data.num_classes, share_location=True, background_label_id=0,
                      nms_param=dict(nms_threshold=det.nms_threshold, top_k=det.top_k),
                      code_type="CENTER_SIZE", keep_top_k=det.keep_top_k,
                      confidence_threshold=det.confidence_threshold)
        if data.result_directory:
            output["save_output_param"] = dict(
                output_directory=data.result_directory.format(size=size),
                output_name_prefix="comp4_det_test_",
                output_format="VOC", label_map_file=data.label_map_file,
                name_size_file=data.name_size_file or "", num_test_image=data.num_test_image)
        n.detection_out = L.DetectionOutput(mbox[0], n.mbox_conf_flatten, mbox[2],
                                            include=dict(phase=TEST), detection_output_param=output)
        evaluate = dict(num_classes=data.num_classes, background_label_id=0,
                        overlap_threshold=det.overlap_threshold, evaluate_difficult_gt=False)
        if data.name_size_file:
            evaluate["name_size_file"] = data.name_size_file
        n.detection_eval = L.DetectionEvaluate(n.detection_out, n.label, include=dict(phase=TEST),
                                               detection_evaluate_param=evaluate)
        return n.to_proto(f"{self.net_name}_test")

    def nets(self) -> Dict[str, caffe_pb2.NetParameter]:
        """``{"train", "test", "deploy"}`` NetParameters. The features are shape-checked by
        :meth:`plan`, the whole deploy net (heads, priors, detection) once more here; the
        train and test nets differ from it only in their data, loss and evaluation layers."""
        plan = self.plan()
        nets = {phase: self._net(phase, plan) for phase in ("train", "test", "deploy")}
        shapes.plan_net(nets["deploy"], caffe_pb2.TEST, device="meta")
        return nets
