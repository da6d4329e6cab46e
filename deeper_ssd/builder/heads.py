"""Heads attached to zoo models: SR-TOD (issue 8); ZoomInNet (issue 9) keeps its own section.

SR-TOD (Cao et al., ECCV 2024; shared/reference/heads-srtod-zoominnet.md A.6, option A) on an
SSD-family model: the prediction source ``source`` (default ``conv4_3``) plays the paper's P2.
Its head input ``F`` (``conv4_3_norm``: DGFE must follow Normalize, which would otherwise divide
the spatial enhancement out) feeds

* the reconstruction head: ``k`` Up blocks (Deconvolution 4/2/1 with bias, then twice
  Convolution 3/1/1 without bias + ReLU), ``k`` the fewest doublings that cover the input
  (3 at stride 8: 38 → 304, 63 → 504), channels halving per block (the paper's ``C/2``;
  512 → 256, 128, 64), Convolution 3/1/1 → 3 with bias, Sigmoid, and a top-left Crop to the
  input size when the doublings overshoot (304 → 300, 504 → 500);
* ``srtod_image`` = DenormalizeImage(data) with the data layer's own mean and scale,
  ``srtod_diffmap`` = DifferenceMap(reconstruction, image),
  ``F_dgfe`` = DGFE(F, diffmap), which replaces ``F`` as the input of ``F_mbox_loc``,
  ``F_mbox_conf`` and ``F_mbox_priorbox``;
* in the train net, ``srtod_loss`` = MSELoss(reconstruction, image) with ``loss_weight`` 1.

The head runs in the test and deploy nets too (DGFE needs the map); only the loss is train-only.
:func:`with_srtod` turns a zoo model into one whose ``nets()`` carry the head, so
``zoo.write_model``, ``summarize`` and the CLI work on it unchanged; the committed nets are
``prototxt/<model>_srtod`` for every zoo model (:func:`committed_variants`).
docs/decisions.md (SR-TOD) records each choice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import io, shapes
from ..proto import caffe_pb2
from .netspec import TRAIN, L, NetSpec, assign, param_field_for_type
from .solver import build_solver
from .ssd import SSDModel, SSDPlan

__all__ = ["SRTOD_THRESHOLDS", "SRTOD", "SRTODModel", "with_srtod", "srtod_layers", "attach_srtod",
           "committed_variants", "ZOOMIN_ALIGNMENTS", "ZoomIn", "ZoomInModel", "with_zoomin",
           "zoomin_teacher", "layer_adaption", "write_zoomin"]


# ---------------------------------------------------------------------------------------------
# SR-TOD

#: DGFE's initial threshold in the official configs (github Hiyuur/SR-TOD; the paper gives none),
#: in [0, 1] image units: 40/255, 4/255 (also the detector's constructor default), 3/255
SRTOD_THRESHOLDS = {"DroneSwarms": 0.1568627, "VisDrone": 0.0156862, "AI-TOD": 0.0117647}

_WEIGHT = dict(lr_mult=1, decay_mult=1)
_BIAS = dict(lr_mult=2, decay_mult=0)


@dataclass(frozen=True)
class SRTOD:
    """SR-TOD head settings.

    ``source``: the prediction source whose head input is reconstructed and enhanced.
    ``initial_threshold`` (image units): DroneSwarms' 40/255 by default, our data being drones.
    ``threshold_gradient``: ``"ZERO"`` (the official code) or ``"STRAIGHT_THROUGH"`` (half-width
    ``ste_width``). ``threshold_lr_mult``/``threshold_decay_mult``: the t blob's ParamSpec (the
    code's optimizer decays t; ``lr_mult 0`` is the paper's "Fixed T"). ``threshold_decay_mult``
    None (the default) is 1 under SGD/Nesterov and 0 under an adaptive solver (Adam, RMSProp,
    AdaGrad, AdaDelta), which would move a t that only weight decay touches by about lr per
    iteration instead of shrinking it slowly (docs/decisions.md, SR-TOD). ``init``: ``"pytorch"``
    (the code's nn.Conv/nn.Linear defaults, U(±1/sqrt(fan_in))) or ``"xavier"`` (SSD's
    convention, biases 0). ``channels``: the Up blocks' widths (default: halving).
    """
    source: str = "conv4_3"
    initial_threshold: float = SRTOD_THRESHOLDS["DroneSwarms"]
    threshold_gradient: str = "ZERO"
    ste_width: float = 0.01
    threshold_lr_mult: float = 1.0
    threshold_decay_mult: Optional[float] = None
    reduction_ratio: int = 16
    resize: str = "NEAREST"
    loss_weight: float = 1.0
    init: str = "pytorch"
    channels: Optional[Tuple[int, ...]] = None

    @property
    def suffix(self) -> str:
        """``_srtod`` on conv4_3, ``_srtod_<source>`` elsewhere."""
        return "_srtod" if self.source == "conv4_3" else f"_srtod_{self.source}"


def _fillers(init: str, fan_in: int, bias: bool) -> dict:
    """Convolution fillers: PyTorch's default U(±1/sqrt(fan_in)) for weight and bias, or xavier
    with zero bias."""
    if init == "pytorch":
        bound = 1.0 / math.sqrt(fan_in)
        uniform = dict(type="uniform", min=-bound, max=bound)
        return dict(weight_filler=uniform, **(dict(bias_filler=uniform) if bias else {}))
    if init == "xavier":
        return dict(weight_filler=dict(type="xavier"),
                    **(dict(bias_filler=dict(type="constant", value=0)) if bias else {}))
    raise ValueError(f"SR-TOD init {init!r}: use 'pytorch' or 'xavier'")


def _up_widths(head: SRTOD, channels: int, feature_hw: Sequence[int],
               image_hw: Sequence[int]) -> List[int]:
    """One width per Up block: enough ×2 blocks for the feature map to cover the image."""
    blocks = 1
    while min(d * 2 ** blocks - i for d, i in zip(feature_hw, image_hw)) < 0:
        blocks += 1
    if head.channels is None:
        return [max(1, channels // 2 ** k) for k in range(1, blocks + 1)]
    if len(head.channels) != blocks:
        raise ValueError(f"SR-TOD: {len(head.channels)} Up-block widths given, but "
                         f"{'x'.join(map(str, feature_hw))} -> {'x'.join(map(str, image_hw))} "
                         f"needs {blocks} blocks")
    return list(head.channels)


#: Caffe solver types whose step is normalised per parameter
ADAPTIVE_SOLVERS = ("Adam", "RMSProp", "AdaGrad", "AdaDelta")


def srtod_layers(head: SRTOD, feature: str, feature_shape: Sequence[int], image: str,
                 image_shape: Sequence[int], mean_value: Sequence[float], scale: float,
                 train: bool, solver_type: str = "SGD") -> List[caffe_pb2.LayerParameter]:
    """The head's layers for feature blob ``feature`` (``N x C x h x w``) and image blob ``image``
    (``N x 3 x H x W``, the data blob with transform ``mean_value``/``scale``). The DGFE output
    is ``<feature>_dgfe``; the loss is added only when ``train``. ``solver_type`` (Caffe's)
    decides the threshold's default decay_mult (see :class:`SRTOD`)."""
    _, channels, *feature_hw = feature_shape
    image_hw = list(image_shape[2:])
    n = NetSpec()
    n[feature] = L.Input(shape=dict(dim=list(feature_shape)))     # placeholders, dropped below
    n[image] = L.Input(shape=dict(dim=list(image_shape)))
    widths = _up_widths(head, channels, feature_hw, image_hw)
    x, width = n[feature], channels
    for k, out in enumerate(widths, 1):
        name = f"srtod_up{k}"
        n[f"{name}_deconv"] = x = L.Deconvolution(
            x, num_output=out, kernel_size=4, stride=2, pad=1, param=[_WEIGHT, _BIAS],
            **_fillers(head.init, out * 16, True))
        for j in (1, 2):
            n[f"{name}_conv{j}"] = x = L.Convolution(
                x, num_output=out, kernel_size=3, pad=1, bias_term=False, param=[_WEIGHT],
                **_fillers(head.init, out * 9, False))
            n[f"{name}_relu{j}"] = x = L.ReLU(x, in_place=True)
        width = out
    n.srtod_out = L.Convolution(x, num_output=3, kernel_size=3, pad=1, param=[_WEIGHT, _BIAS],
                                **_fillers(head.init, width * 9, True))
    if [d * 2 ** len(widths) for d in feature_hw] != image_hw:
        n.srtod_sigmoid = L.Sigmoid(n.srtod_out)
        n.srtod_recon = L.Crop(n.srtod_sigmoid, n[image], axis=2, offset=[0])
    else:
        n.srtod_recon = L.Sigmoid(n.srtod_out)
    n.srtod_image = L.DenormalizeImage(n[image], mean_value=list(mean_value), scale=scale)
    n.srtod_diffmap = L.DifferenceMap(n.srtod_recon, n.srtod_image)
    dgfe = dict(initial_threshold=head.initial_threshold, threshold_gradient=head.threshold_gradient,
                reduction_ratio=head.reduction_ratio, resize=head.resize)
    if head.threshold_gradient == "STRAIGHT_THROUGH":
        dgfe["ste_width"] = head.ste_width
    if head.init == "xavier":
        dgfe.update(weight_filler=dict(type="xavier"), bias_filler=dict(type="constant", value=0))
    decay = head.threshold_decay_mult
    if decay is None:
        decay = 0.0 if solver_type in ADAPTIVE_SOLVERS else 1.0
    threshold = dict(lr_mult=head.threshold_lr_mult, decay_mult=decay)
    n[f"{feature}_dgfe"] = L.DGFE(n[feature], n.srtod_diffmap, propagate_down=[True, False],
                                  param=[_WEIGHT, _BIAS, _WEIGHT, _BIAS, threshold], **dgfe)
    if train:
        n.srtod_loss = L.MSELoss(n.srtod_recon, n.srtod_image, propagate_down=[True, False],
                                 loss_weight=head.loss_weight, include=dict(phase=TRAIN))
    return [layer for layer in n.to_proto().layer if layer.type != "Input"]


def attach_srtod(net: caffe_pb2.NetParameter, layers: Sequence[caffe_pb2.LayerParameter],
                 feature: str) -> caffe_pb2.NetParameter:
    """A copy of ``net`` with ``layers`` (from :func:`srtod_layers`) inserted before the first
    layer reading ``feature``, and that reader and every later one reading ``<feature>_dgfe``."""
    readers = [i for i, layer in enumerate(net.layer)
               if feature in layer.bottom and feature not in layer.top]
    if not readers:
        raise ValueError(f"SR-TOD: no layer of net '{net.name}' reads '{feature}'")
    first = readers[0]
    rewriters = [layer.name for layer in net.layer[first:] if feature in layer.top]
    if rewriters:
        raise ValueError(f"SR-TOD: '{feature}' is rewritten in place by {', '.join(rewriters)} after "
                         "its first reader; attach the head to a blob that is final when read")
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    out.layer.extend(net.layer[:first])
    out.layer.extend(layers)
    for layer in net.layer[first:]:
        moved = out.layer.add()
        moved.CopyFrom(layer)
        moved.bottom[:] = [f"{feature}_dgfe" if b == feature else b for b in layer.bottom]
    return out


def _srtod_feature(model: SSDModel, source: str) -> str:
    """The blob ``source``'s prediction layer reads (``<source>_norm`` when normalised)."""
    by_source = {layer.source: layer for layer in model.plan().layers}
    if source not in by_source:
        raise ValueError(f"SR-TOD source {source!r} is not a prediction source of {model.name}; "
                         f"choose one of {', '.join(by_source)}")
    return by_source[source].head_input


@dataclass(frozen=True)
class SRTODModel(SSDModel):
    """An SSD-family model whose nets carry the SR-TOD head ``head`` (see the module docstring)."""
    head: SRTOD = SRTOD()

    def nets(self) -> Dict[str, caffe_pb2.NetParameter]:
        """The plain model's nets with the head attached; the deploy net is shape-checked."""
        plain = super().nets()
        head = self.head
        solver_type = self.solver.type if self.solver is not None else "SGD"
        feature, image = _srtod_feature(self, head.source), "data"
        blob_shapes = shapes.plan_net(plain["deploy"], caffe_pb2.TEST, device="meta").blob_shapes
        data_layer = next(layer for layer in plain["test"].layer if layer.type == "AnnotatedData")
        transform = data_layer.transform_param
        nets = {}
        for phase, net in plain.items():
            layers = srtod_layers(head, feature, blob_shapes[feature], image, blob_shapes[image],
                                  transform.mean_value, transform.scale, train=phase == "train",
                                  solver_type=solver_type)
            nets[phase] = attach_srtod(net, layers, feature)
        shapes.plan_net(nets["deploy"], caffe_pb2.TEST, device="meta")
        return nets


def with_srtod(model: SSDModel, head: SRTOD = SRTOD()) -> SRTODModel:
    """``model`` with the SR-TOD head; its name and net name get ``head.suffix``."""
    _srtod_feature(model, head.source)
    values = {f.name: getattr(model, f.name) for f in fields(SSDModel)}
    values.update(name=model.name + head.suffix, net_name=model.net_name + head.suffix)
    return SRTODModel(**values, head=head)


def committed_variants() -> List[str]:
    """Folders of prototxt/ that hold head variants: ``<model>_srtod`` for every zoo model
    (regenerated and compared by tests/test_srtod.py)."""
    from . import zoo
    return [name + SRTOD().suffix for name in zoo.names()]


# ---------------------------------------------------------------------------------------------
# ZoomInNet (issue 9): cross-scale distillation from a 2x-input teacher
# (shared/reference/heads-srtod-zoominnet.md B.8; docs/decisions.md "ZoomInNet" records each choice)

ZOOMIN_ALIGNMENTS = ("LA", "NONE")


@dataclass(frozen=True)
class ZoomIn:
    """ZoomInNet settings (each is a builder parameter; ``--head-set NAME=VALUE`` on the CLI).

    * ``alignment``: ``"LA"`` (layer adaption): each student head input ``H`` is upsampled 2x
      (nearest, ``H_up``) before its mbox convolutions and PriorBox, whose ``img_size`` becomes
      2S: the student predicts on the teacher's grid with the teacher's priors, and ``H_up`` is
      distilled against the teacher's ``H``. ``"NONE"``: the student is the plain model and the
      teacher's map is averaged 2x2/2 down to the student's grid (the paper's "SNet + CSKD").
    * ``pairs``: ``(student blob, teacher blob)`` to distil (teacher names without the prefix);
      default: every head input with itself where the aligned maps differ by at most
      ``max_size_difference`` cells (the larger one is cropped top-left; the others are
      skipped). Where channels differ a 1x1 Convolution adapts the student, in the loss branch.
    * ``loss_weight``: λ_distill of each pair's PositionAwareL2Loss (0.01, applied once; the
      pairs' losses add up).
    * ``teacher_prefix``: prefix of the teacher's layer and blob names in the distillation net.
    * ``teacher_prior_scale``: teacher prior pixel sizes = the student's × this (1: unchanged).
    * ``akdp`` / ``l2``: AKDPMaskParameter / PositionAwareL2LossParameter fields, e.g.
      ``{"std_mode": "POPULATION"}``; empty: the schema's defaults.
    """
    alignment: str = "LA"
    pairs: Optional[Tuple[Tuple[str, str], ...]] = None
    loss_weight: float = 0.01
    teacher_prefix: str = "teacher/"
    teacher_prior_scale: float = 1.0
    max_size_difference: int = 1
    akdp: Dict[str, object] = field(default_factory=dict)
    l2: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if self.alignment not in ZOOMIN_ALIGNMENTS:
            raise ValueError(f"ZoomInNet alignment {self.alignment!r}: use one of "
                             f"{', '.join(ZOOMIN_ALIGNMENTS)}")
        if not self.teacher_prefix:
            raise ValueError("ZoomInNet teacher_prefix must not be empty")
        if not self.teacher_prior_scale > 0 or self.max_size_difference < 0:
            raise ValueError(f"ZoomInNet teacher_prior_scale ({self.teacher_prior_scale}) must be > 0 and "
                             f"max_size_difference ({self.max_size_difference}) >= 0")


def _plain(model: SSDModel, **changes) -> SSDModel:
    """``model`` as a plain SSDModel (no head), with ``changes``."""
    values = {f.name: getattr(model, f.name) for f in fields(SSDModel)}
    values.update(changes)
    return SSDModel(**values)


def zoomin_teacher(model: SSDModel, settings: ZoomIn = ZoomIn()) -> SSDModel:
    """The teacher: ``model`` at input 2S named ``<name>_teacher``, with the student's prior pixel
    sizes (× ``teacher_prior_scale``) and aspect ratios level by level; its steps follow the
    default rule at 2S (the student's steps where the map doubles, ``2S / map`` elsewhere)."""
    plan = model.plan()
    scale = settings.teacher_prior_scale
    sizes = tuple((l.prior.min_size * scale, None if l.prior.max_size is None else l.prior.max_size * scale)
                  for l in plan.layers)
    teacher = _plain(model, name=f"{model.name}_teacher", net_name=f"{model.net_name}_teacher",
                     input_size=2 * model.input_size, prior_sizes=sizes, steps=None,
                     aspect_ratios=tuple(l.prior.aspect_ratios for l in plan.layers))
    order = [l.source for l in teacher.plan().layers]
    if order != [l.source for l in plan.layers]:
        raise ValueError(f"{model.name}: at {teacher.input_size}x{teacher.input_size} the prediction layers "
                         f"sort as {order}, at {model.input_size} as {[l.source for l in plan.layers]}; the "
                         "teacher's priors cannot follow the student's level by level")
    return teacher


def layer_adaption(net: caffe_pb2.NetParameter, plan: SSDPlan, image_size: int) -> caffe_pb2.NetParameter:
    """ZoomInNet's LA on a built SSD net: before ``H_mbox_loc`` each head input ``H`` gets
    ``H_up`` = Upsample(H) (2x nearest), which ``H_mbox_loc``, ``H_mbox_conf`` and
    ``H_mbox_priorbox`` read instead of ``H``; the PriorBoxes get ``img_size: image_size`` (2S)
    and keep their steps and pixel sizes, which makes them the teacher's priors. Returns a copy."""
    heads = {l.head_input for l in plan.layers}
    readers = {h: (f"{h}_mbox_loc", f"{h}_mbox_conf", f"{h}_mbox_priorbox") for h in heads}
    out = _copy(net)
    del out.layer[:]
    rewired = {h: 0 for h in heads}
    for layer in net.layer:
        head = layer.bottom[0] if len(layer.bottom) else None
        if head in heads and layer.name in readers[head]:
            if not rewired[head]:
                out.layer.append(_layer(f"{head}_up", "Upsample", [head], [f"{head}_up"], scale=2))
            rewired[head] += 1
            layer = _copy(layer)
            layer.bottom[0] = f"{head}_up"
            if layer.type == "PriorBox":
                layer.prior_box_param.img_size = image_size
        out.layer.add().CopyFrom(layer)
    missing = sorted(h for h, count in rewired.items() if count != len(readers[h]))
    if missing:
        raise ValueError(f"layer adaption: {', '.join(missing)} lack(s) the _mbox_loc/_mbox_conf/"
                         f"_mbox_priorbox layers of net '{net.name}'")
    return out


@dataclass(frozen=True)
class ZoomInModel(SSDModel):
    """The ZoomInNet student of an SSD-family model (see :class:`ZoomIn`). ``nets()``:

    * ``train``: the distillation net, in this layer order (so that the student's weights are
      filled exactly as in ``train_nodistill`` for one seed): ``data_2x`` + ``label``
      (AnnotatedData resized to 2S) and ``data`` = Pooling AVE 2x2/2 of ``data_2x``; the student
      (LA-adapted unless ``alignment: NONE``) with its MultiBoxLoss; the teacher's layers that
      the distilled blobs need, names prefixed, every parameter ``lr_mult: 0 decay_mult: 0``,
      BatchNorm on its stored statistics; the distillation branch: per pair sub-sampling
      (NONE), adapter and crops, one AKDPMask for all pairs (on the teacher's priors with LA,
      the student's with NONE), one PositionAwareL2Loss per pair (``propagate_down: true
      false false``);
    * ``train_nodistill``: the same without teacher and distillation (the baseline);
    * ``test``, ``deploy``: the student alone at S.

    :meth:`teacher` is the teacher model (its own nets and solver); :func:`write_zoomin`
    writes both.
    """
    zoomin: ZoomIn = ZoomIn()

    def student(self) -> SSDModel:
        return _plain(self)

    def teacher(self) -> SSDModel:
        return zoomin_teacher(self.student(), self.zoomin)

    def nets(self) -> Dict[str, caffe_pb2.NetParameter]:
        settings, student = self.zoomin, self.student()
        plan, teacher = student.plan(), self.teacher()
        plain = student.nets()
        size2 = teacher.input_size
        nets = {phase: layer_adaption(net, plan, size2) if settings.alignment == "LA" else _copy(net)
                for phase, net in plain.items()}
        nets["train_nodistill"] = _zoomed_input(nets.pop("train"), size2)
        teacher_train = teacher.nets()["train"]
        heads = [l.head_input for l in plan.layers]
        candidates = settings.pairs or tuple((h, h) for h in heads)
        branch = _teacher_branch(teacher_train, [t for _, t in candidates], settings)
        blob_shapes = shapes.plan_net(_extended(nets["train_nodistill"], branch), caffe_pb2.TRAIN,
                                      device="meta").blob_shapes
        pairs = _aligned_pairs(candidates, blob_shapes, settings, explicit=settings.pairs is not None)
        branch = _teacher_branch(teacher_train, [t for _, t in pairs], settings)
        train = _extended(nets["train_nodistill"], branch)
        train.layer.extend(_distill_branch(pairs, blob_shapes, settings))
        nets["train"] = train
        for phase, net in nets.items():
            net.name = f"{self.net_name}_{phase}"
        shapes.plan_net(train, caffe_pb2.TRAIN, device="meta")
        shapes.plan_net(nets["deploy"], caffe_pb2.TEST, device="meta")
        return {phase: nets[phase] for phase in ("train", "train_nodistill", "test", "deploy")}


def with_zoomin(model: SSDModel, settings: ZoomIn = ZoomIn()) -> ZoomInModel:
    """The ZoomInNet student of ``model``, named ``<name>_zoomin``."""
    values = {f.name: getattr(model, f.name) for f in fields(SSDModel)}
    values.update(name=f"{model.name}_zoomin", net_name=f"{model.net_name}_zoomin")
    return ZoomInModel(**values, zoomin=settings)


def write_zoomin(model: ZoomInModel, out: str = "prototxt") -> List[Path]:
    """Write the teacher (``<out>/<name>_teacher/{train,test,deploy,solver}.prototxt``) and the
    student (``<out>/<name>/{train,train_nodistill,test,deploy}.prototxt``, ``solver.prototxt``
    for the distillation, ``solver_nodistill.prototxt`` for the baseline). Returns the paths."""
    from . import zoo
    teacher = model.teacher()
    written = zoo.write_model(teacher, out)
    written += zoo.write_model(model, out)
    base = f"{out.rstrip('/')}/{model.name}"
    solver = build_solver(model.solver, f"{base}/train_nodistill.prototxt", f"{base}/test.prototxt",
                          model.dataset.num_test_image, model.test_batch_size,
                          f"snapshots/{model.name}/{model.name}_nodistill")
    path = Path(out) / model.name / "solver_nodistill.prototxt"
    io.write_solver(solver, path)
    return written + [path]


def _copy(message):
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate


def _layer(name: str, type_name: str, bottoms: Sequence[str], tops: Sequence[str],
           **params) -> caffe_pb2.LayerParameter:
    """A LayerParameter; keywords are LayerParameter fields or fields of the type's message."""
    layer = caffe_pb2.LayerParameter(name=name, type=type_name, bottom=list(bottoms), top=list(tops))
    type_field = param_field_for_type(type_name)
    for key, value in params.items():
        assign(layer if key in caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
               else getattr(layer, type_field), key, value)
    return layer


def _extended(net: caffe_pb2.NetParameter,
              layers: Sequence[caffe_pb2.LayerParameter]) -> caffe_pb2.NetParameter:
    out = _copy(net)
    out.layer.extend(layers)
    return out


def _zoomed_input(net: caffe_pb2.NetParameter, size2: int) -> caffe_pb2.NetParameter:
    """``net`` with its AnnotatedData layer resizing to ``size2`` into ``data_2x`` and a Pooling
    AVE 2x2/2 layer ``data`` after it: the rest of the net reads the same augmented image at
    half that size."""
    out = _copy(net)
    index = next((i for i, layer in enumerate(out.layer) if layer.type == "AnnotatedData"), None)
    if index is None or out.layer[index].top[0] != "data":
        raise ValueError(f"net '{net.name}' has no AnnotatedData layer writing 'data'")
    data = out.layer[index]
    if not data.transform_param.HasField("resize_param"):
        raise ValueError(f"data layer '{data.name}' has no resize_param: the 2x input size cannot be set")
    data.name = data.top[0] = "data_2x"
    data.transform_param.resize_param.height = data.transform_param.resize_param.width = size2
    out.layer.insert(index + 1, _layer("data", "Pooling", ["data_2x"], ["data"], pool="AVE",
                                       kernel_size=2, stride=2))
    return out


def _teacher_branch(teacher_train: caffe_pb2.NetParameter, blobs: Sequence[str],
                    settings: ZoomIn) -> List[caffe_pb2.LayerParameter]:
    """The teacher train net's layers needed for ``blobs`` (and, with LA, their PriorBoxes
    ``<blob>_mbox_priorbox``), data layer excepted: names and blobs prefixed (``data`` becomes
    ``data_2x``, ``label`` stays), every parameter blob ``lr_mult: 0 decay_mult: 0``
    (ParamSpec names prefixed too), BatchNorm ``use_global_stats: true``."""
    prefix = settings.teacher_prefix
    produced = {top for layer in teacher_train.layer for top in layer.top}
    wanted = set(blobs)
    if settings.alignment == "LA":
        wanted |= {f"{b}_mbox_priorbox" for b in blobs}
    unknown = sorted(b for b in wanted if b not in produced)
    if unknown:
        raise ValueError(f"teacher net '{teacher_train.name}' has no blob {', '.join(unknown)} (with LA a "
                         "distilled teacher blob must be a head input, whose priors give the mask)")
    counts = {step.layer.name: len(step.layer.blobs)
              for step in shapes.plan_net(teacher_train, caffe_pb2.TRAIN, device="meta").layers}
    keep = []
    for layer in reversed(teacher_train.layer):
        if layer.type == "AnnotatedData" or not wanted & set(layer.top):
            continue
        keep.append(layer)
        wanted |= set(layer.bottom)
    rename = lambda blob: {"data": "data_2x", "label": "label"}.get(blob, prefix + blob)
    branch = []
    for layer in reversed(keep):
        copy = _copy(layer)
        copy.name = prefix + layer.name
        copy.bottom[:] = [rename(b) for b in layer.bottom]
        copy.top[:] = [rename(t) for t in layer.top]
        for i in range(counts[layer.name]):
            spec = copy.param[i] if i < len(copy.param) else copy.param.add()
            spec.lr_mult, spec.decay_mult = 0, 0
            if spec.name:
                spec.name = prefix + spec.name
        if layer.type == "BatchNorm":
            copy.batch_norm_param.use_global_stats = True
        branch.append(copy)
    return branch


def _aligned_pairs(candidates, blob_shapes, settings: ZoomIn, explicit: bool) -> List[Tuple[str, str]]:
    """The candidates whose aligned maps differ by at most max_size_difference cells (an
    explicit pair that does not is an error)."""
    pairs, students = [], set()
    for student, teacher in candidates:
        if student in students:
            raise ValueError(f"ZoomInNet pairs: student blob {student} appears twice")
        s_hw, t_hw = _aligned_sizes(student, teacher, blob_shapes, settings)
        if max(abs(a - b) for a, b in zip(s_hw, t_hw)) <= settings.max_size_difference and \
                (all(a >= b for a, b in zip(s_hw, t_hw)) or all(a <= b for a, b in zip(s_hw, t_hw))):
            pairs.append((student, teacher))
            students.add(student)
        elif explicit:
            raise ValueError(f"ZoomInNet pair ({student}, {teacher}): aligned maps {s_hw} and {t_hw} "
                             f"differ by more than {settings.max_size_difference} cell(s)")
    if not pairs:
        raise ValueError("ZoomInNet: no student/teacher pair has maps of matching size")
    return pairs


def _aligned_sizes(student: str, teacher: str, blob_shapes, settings: ZoomIn):
    """Map sizes ``(h, w)`` of the student and teacher sides after LA / sub-sampling."""
    for name, blob in (("student", student), ("teacher", settings.teacher_prefix + teacher)):
        if blob not in blob_shapes:
            raise ValueError(f"ZoomInNet: the {name} net has no blob {blob}")
    s_hw = tuple(blob_shapes[student][2:])
    t_hw = tuple(blob_shapes[settings.teacher_prefix + teacher][2:])
    if settings.alignment == "LA":
        return tuple(2 * d for d in s_hw), t_hw
    return s_hw, tuple(-(-d // 2) for d in t_hw)         # AVE 2x2/2, ceil mode


def _distill_branch(pairs, blob_shapes, settings: ZoomIn) -> List[caffe_pb2.LayerParameter]:
    """Alignment, adapters and crops per pair, one AKDPMask over all pairs, one loss per pair."""
    prefix, la = settings.teacher_prefix, settings.alignment == "LA"
    prepare, grids, mask_crops, losses = [], [], [], []
    for student, teacher in pairs:
        s_blob, t_blob = student, prefix + teacher
        s_c, t_c = blob_shapes[student][1], blob_shapes[t_blob][1]
        if la:
            if f"{student}_up" not in blob_shapes:               # not a head input: LA here
                prepare.append(_layer(f"{student}_up", "Upsample", [student], [f"{student}_up"], scale=2))
            s_blob = f"{student}_up"
            grids.append((t_blob, f"{prefix}{teacher}_mbox_priorbox"))
        else:
            if f"{student}_mbox_priorbox" not in blob_shapes:
                raise ValueError(f"ZoomInNet (alignment NONE): student blob {student} is not a head input "
                                 "(the mask needs its priors)")
            sub = f"zoomin/{student}_teacher_sub"
            prepare.append(_layer(sub, "Pooling", [t_blob], [sub], pool="AVE", kernel_size=2, stride=2))
            t_blob = sub
            grids.append((student, f"{student}_mbox_priorbox"))
        if s_c != t_c:
            adapted = f"zoomin/{student}_adapt"
            prepare.append(_layer(adapted, "Convolution", [s_blob], [adapted], num_output=t_c, kernel_size=1,
                                  param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)],
                                  weight_filler=dict(type="xavier"),
                                  bias_filler=dict(type="constant", value=0)))
            s_blob = adapted
        mask = f"zoomin/mask_{student}"
        s_hw, t_hw = _aligned_sizes(student, teacher, blob_shapes, settings)
        crop = dict(axis=2, offset=[0])
        if s_hw > t_hw:                                          # the student side is larger
            cropped = f"zoomin/{student}_crop"
            prepare.append(_layer(cropped, "Crop", [s_blob, t_blob], [cropped], **crop))
            if not la:
                mask_crops.append(_layer(f"{mask}_crop", "Crop", [mask, t_blob], [f"{mask}_crop"], **crop))
                mask = f"{mask}_crop"
            s_blob = cropped
        elif t_hw > s_hw:
            cropped = f"zoomin/{student}_teacher_crop"
            prepare.append(_layer(cropped, "Crop", [t_blob, s_blob], [cropped], **crop))
            if la:
                mask_crops.append(_layer(f"{mask}_crop", "Crop", [mask, s_blob], [f"{mask}_crop"], **crop))
                mask = f"{mask}_crop"
            t_blob = cropped
        losses.append(_layer(f"zoomin/loss_{student}", "PositionAwareL2Loss", [s_blob, t_blob, mask],
                             [f"zoomin/loss_{student}"], loss_weight=settings.loss_weight,
                             propagate_down=[True, False, False], include=dict(phase=TRAIN),
                             **settings.l2))
    akdp = _layer("zoomin/akdp", "AKDPMask", [b for grid in grids for b in grid] + ["label"],
                  [f"zoomin/mask_{s}" for s, _ in pairs], include=dict(phase=TRAIN), **settings.akdp)
    return prepare + [akdp] + mask_crops + losses
