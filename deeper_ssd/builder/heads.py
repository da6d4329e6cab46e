"""Heads attached to zoo models, built in the model's own build pass (see
:class:`~deeper_ssd.builder.ssd.SSDModel`: a head is a subclass that adds its layers through the
build steps ``_input``, ``_attach``, ``multibox`` and ``_finish_train``).

SR-TOD (Cao et al., ECCV 2024; docs/srtod.md) on an SSD-family model: the prediction source
``source`` (default ``conv4_3``) plays the paper's P2. Its head input ``F`` (``conv4_3_norm``:
DGFE must follow Normalize, which would otherwise divide the spatial enhancement out) feeds

* the reconstruction head: ``k`` Up blocks (Deconvolution 4/2/1 with bias, then twice
  Convolution 3/1/1 without bias + ReLU), ``k`` the fewest doublings that cover the input
  (3 at stride 8: 38 → 304, 63 → 504), channels halving per block (the paper's ``C/2``;
  512 → 256, 128, 64), Convolution 3/1/1 → 3 with bias, Sigmoid, and a top-left Crop to the
  input size when the doublings overshoot (304 → 300, 504 → 500);
* ``srtod_image`` = DenormalizeImage(data) with the data layer's own mean and scale,
  ``srtod_diffmap`` = DifferenceMap(reconstruction, image),
  ``F_dgfe`` = DGFE(F, diffmap), which every layer reading ``F`` after it reads instead
  (``F_mbox_loc``, ``F_mbox_conf`` and ``F_mbox_priorbox``);
* in the train net, ``srtod_loss`` = MSELoss(reconstruction, image) with ``loss_weight`` 1.

The head is built when the first layer reads ``F`` (:meth:`FeatureNet.before_read`); it runs in
the test and deploy nets too (DGFE needs the map); only the loss is train-only.
:func:`with_srtod` turns a zoo model into one whose ``nets()`` carry the head, so
``zoo.write_model``, ``summarize`` and the CLI work on it unchanged; the committed nets are
``prototxt/<model>_srtod`` for every zoo model (:func:`committed_variants`).
docs/decisions.md ("SR-TOD self-reconstruction head") records each choice.

ZoomInNet (docs/zoominnet.md; docs/decisions.md, "ZoomInNet cross-scale distillation"):
cross-scale distillation from a 2x-input teacher, see :class:`ZoomIn` and :class:`ZoomInModel`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from .. import io, shapes
from ..proto import caffe_pb2
from .netspec import TRAIN, Function, L, NetSpec, P, Top, assign
from .solver import build_solver
from .ssd import FeatureNet, FrozenMap, PredictionLayer, SSDModel, SSDPlan, multibox_head

__all__ = ["SRTOD_THRESHOLDS", "SRTOD", "SRTODModel", "with_srtod", "srtod_head",
           "committed_variants", "ZOOMIN_ALIGNMENTS", "ZoomIn", "ZoomInModel", "with_zoomin",
           "zoomin_teacher", "write_zoomin"]


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

    def __post_init__(self):
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(self.channels))

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


def srtod_head(n: NetSpec, head: SRTOD, feature: str, top: Top, feature_shape: Sequence[int],
               image: Top, image_hw: Sequence[int], mean_value: Sequence[float], scale: float,
               train: bool, solver_type: str = "SGD") -> Top:
    """Add the head's layers to ``n`` for the feature blob ``feature`` (Top ``top``, shape
    ``C x h x w``) and the image ``image`` (``3 x H x W``, the data blob with transform
    ``mean_value``/``scale``); returns the DGFE output ``<feature>_dgfe``. The loss is added
    only when ``train``; ``solver_type`` (Caffe's) decides the threshold's default decay_mult
    (see :class:`SRTOD`)."""
    channels, *feature_hw = feature_shape
    image_hw = list(image_hw)
    widths = _up_widths(head, channels, feature_hw, image_hw)
    x, width = top, channels
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
        n.srtod_recon = L.Crop(n.srtod_sigmoid, image, axis=2, offset=[0])
    else:
        n.srtod_recon = L.Sigmoid(n.srtod_out)
    n.srtod_image = L.DenormalizeImage(image, mean_value=list(mean_value), scale=scale)
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
    n[f"{feature}_dgfe"] = enhanced = L.DGFE(top, n.srtod_diffmap, propagate_down=[True, False],
                                             param=[_WEIGHT, _BIAS, _WEIGHT, _BIAS, threshold], **dgfe)
    if train:
        n.srtod_loss = L.MSELoss(n.srtod_recon, n.srtod_image, propagate_down=[True, False],
                                 loss_weight=head.loss_weight, include=dict(phase=TRAIN))
    return enhanced


def _srtod_layer(model: SSDModel, source: str, plan: Optional[SSDPlan] = None) -> PredictionLayer:
    """The prediction layer of ``source`` (its head input is what the head enhances)."""
    by_source = {layer.source: layer for layer in (plan or model.plan()).layers}
    if source not in by_source:
        raise ValueError(f"SR-TOD source {source!r} is not a prediction source of {model.name}; "
                         f"choose one of {', '.join(by_source)}")
    return by_source[source]


@dataclass(frozen=True)
class SRTODModel(SSDModel):
    """An SSD-family model whose nets carry the SR-TOD head ``head`` (see the module docstring)."""
    head: SRTOD = SRTOD()

    def _attach(self, fn: FeatureNet, plan: SSDPlan, phase: str) -> None:
        """Build the head when the first layer reads the source's head input."""
        layer = _srtod_layer(self, self.head.source, plan)
        feature = layer.head_input
        transform = caffe_pb2.TransformationParameter()
        for key, value in self.transform_param(False).items():
            assign(transform, key, value)
        solver_type = self.solver.type if self.solver is not None else "SGD"
        fn.before_read(feature, lambda top: srtod_head(
            fn.net, self.head, feature, top, (fn.channels[feature], layer.map_size, layer.map_size),
            fn.top(fn.data), (self.input_size, self.input_size), transform.mean_value, transform.scale,
            train=phase != "test", solver_type=solver_type))


def with_srtod(model: SSDModel, head: SRTOD = SRTOD()) -> SRTODModel:
    """``model`` with the SR-TOD head; its name and net name get ``head.suffix``."""
    _srtod_layer(model, head.source)
    values = {f.name: getattr(model, f.name) for f in fields(SSDModel)}
    values.update(name=model.name + head.suffix, net_name=model.net_name + head.suffix)
    return SRTODModel(**values, head=head)


def committed_variants() -> List[str]:
    """Folders of prototxt/ that hold head variants: ``<model>_srtod`` for every zoo model
    (regenerated and compared by tests/test_srtod.py)."""
    from . import zoo
    return [name + SRTOD().suffix for name in zoo.names()]


# ---------------------------------------------------------------------------------------------
# ZoomInNet: cross-scale distillation from a 2x-input teacher
# (docs/zoominnet.md; docs/decisions.md, "ZoomInNet cross-scale distillation", records each choice)

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
    akdp: Dict[str, object] = FrozenMap()           # given as dicts, kept frozen (hashable)
    l2: Dict[str, object] = FrozenMap()

    def __post_init__(self):
        object.__setattr__(self, "akdp", FrozenMap(self.akdp))
        object.__setattr__(self, "l2", FrozenMap(self.l2))
        if self.pairs is not None:
            object.__setattr__(self, "pairs", tuple(tuple(pair) for pair in self.pairs))
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


@dataclass(frozen=True)
class ZoomInModel(SSDModel):
    """The ZoomInNet student of an SSD-family model (see :class:`ZoomIn`). ``nets()``:

    * ``train``: the distillation net, in this layer order (so that the student's weights are
      filled exactly as in ``train_nodistill`` for one seed): ``data_2x`` + ``label``
      (AnnotatedData resized to 2S) and ``data`` = Pooling AVE 2x2/2 of ``data_2x``; the student
      with its MultiBoxLoss, with layer adaption (LA) unless ``alignment: NONE``: each head input
      ``H`` is read through ``H_up`` = Upsample(H) (2x nearest) by ``H_mbox_loc``,
      ``H_mbox_conf`` and ``H_mbox_priorbox``, whose PriorBoxes get ``img_size: 2S`` and keep
      their steps and pixel sizes, which makes them the teacher's priors; the teacher's layers
      that the distilled blobs need, names prefixed, every parameter ``lr_mult: 0 decay_mult: 0``,
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
        """The four nets; the train and deploy nets are shape-checked."""
        plan = self.plan()
        nets = {phase: self._net(phase, plan) for phase in ("train", "train_nodistill", "test", "deploy")}
        shapes.plan_net(nets["train"], caffe_pb2.TRAIN, device="meta")
        shapes.plan_net(nets["deploy"], caffe_pb2.TEST, device="meta")
        return nets

    def _input(self, n: NetSpec, phase: str) -> None:
        """Train nets: the augmented image at 2S (``data_2x``) and ``data`` averaged 2x2/2 from it."""
        if phase == "test":
            return super()._input(n, phase)
        n.data_2x, n.label = self.annotated_data(True, 2 * self.input_size, name="data_2x")
        n.data = L.Pooling(n.data_2x, pool=P.Pooling.AVE, kernel_size=2, stride=2)

    def multibox(self, fn: FeatureNet, plan: SSDPlan) -> List[Top]:
        """With LA, the head inputs upsampled 2x and the priors laid out for 2S."""
        if self.zoomin.alignment != "LA":
            return super().multibox(fn, plan)
        return list(multibox_head(fn, [l.source for l in plan.layers], [l.prior for l in plan.layers],
                                  [l.normalization for l in plan.layers], self.dataset.num_classes,
                                  upsample=2, img_size=2 * self.input_size))

    def _finish_train(self, n: NetSpec, fn: FeatureNet, plan: SSDPlan, phase: str) -> None:
        """The distillation net: the frozen teacher's branch and the distillation branch."""
        if phase != "train":
            return
        settings, teacher = self.zoomin, self.teacher()
        t_plan, t_shapes = teacher.planned()
        _, s_shapes = self.planned()
        candidates = settings.pairs or tuple((l.head_input, l.head_input) for l in plan.layers)
        # the teacher's own build pass, frozen, on the student's 2S image; only the layers that
        # the distilled blobs need are moved into the student's net
        t = NetSpec()
        t.data = n.data_2x
        tfn = teacher.feature_builder(t, frozen=True)
        teacher.features(tfn)
        teacher.multibox(tfn, t_plan)
        _teacher_tops(teacher, t, tfn, [b for _, b in candidates], settings)
        pairs = _aligned_pairs(candidates, s_shapes, t_shapes, settings, explicit=settings.pairs is not None)
        tops = _teacher_tops(teacher, t, tfn, [b for _, b in pairs], settings)
        needed = _ancestors(tops.values())
        for key, top in t.tops.items():                     # in the teacher's order, prefixed
            if key != "data" and (top.fn if isinstance(top, Top) else top) in needed:
                n[settings.teacher_prefix + key] = top
        _distill_branch(n, fn, tops, pairs, plan, s_shapes, t_shapes, settings)


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


def _teacher_tops(teacher: SSDModel, t: NetSpec, tfn: FeatureNet, blobs: Sequence[str],
                  settings: ZoomIn) -> Dict[str, Top]:
    """The Tops of ``blobs`` (and, with LA, of their PriorBoxes ``<blob>_mbox_priorbox``) in the
    teacher's build ``t``, by teacher blob name."""
    wanted = list(blobs)
    if settings.alignment == "LA":
        wanted += [f"{b}_mbox_priorbox" for b in blobs]
    produced = {top for layer in t.to_proto().layer for top in layer.top}
    unknown = sorted(b for b in set(wanted) if b not in produced)
    if unknown:
        raise ValueError(f"teacher net '{teacher.net_name}_train' has no blob {', '.join(unknown)} (with LA "
                         "a distilled teacher blob must be a head input, whose priors give the mask)")
    return {b: tfn.top(b) if b in tfn.channels else t[b] for b in wanted}


def _ancestors(tops) -> Set[Function]:
    """The layer functions that ``tops`` depend on, theirs included."""
    seen: Set[Function] = set()
    stack = [top.fn for top in tops]
    while stack:
        fn = stack.pop()
        if fn not in seen:
            seen.add(fn)
            stack.extend(inp.fn for inp in fn.inputs)
    return seen


def _aligned_pairs(candidates, s_shapes, t_shapes, settings: ZoomIn,
                   explicit: bool) -> List[Tuple[str, str]]:
    """The candidates whose aligned maps differ by at most max_size_difference cells (an
    explicit pair that does not is an error)."""
    pairs, students = [], set()
    for student, teacher in candidates:
        if student in students:
            raise ValueError(f"ZoomInNet pairs: student blob {student} appears twice")
        s_hw, t_hw = _aligned_sizes(student, teacher, s_shapes, t_shapes, settings)
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


def _aligned_sizes(student: str, teacher: str, s_shapes, t_shapes, settings: ZoomIn):
    """Map sizes ``(h, w)`` of the student and teacher sides after LA / sub-sampling."""
    for name, blob, known in (("student", student, s_shapes), ("teacher", teacher, t_shapes)):
        if blob not in known:
            raise ValueError(f"ZoomInNet: the {name} net has no blob {blob}")
    s_hw, t_hw = tuple(s_shapes[student][2:]), tuple(t_shapes[teacher][2:])
    if settings.alignment == "LA":
        return tuple(2 * d for d in s_hw), t_hw
    return s_hw, tuple(-(-d // 2) for d in t_hw)         # AVE 2x2/2, ceil mode


def _distill_branch(n: NetSpec, fn: FeatureNet, teacher_tops: Dict[str, Top], pairs, plan: SSDPlan,
                    s_shapes, t_shapes, settings: ZoomIn) -> None:
    """Alignment, adapters and crops per pair, one AKDPMask over all pairs, one loss per pair."""
    la = settings.alignment == "LA"
    heads = {l.head_input for l in plan.layers}
    crop = dict(axis=2, offset=[0])
    grids, masked = [], []
    for student, teacher in pairs:
        s_top, t_top = fn.top(student), teacher_tops[teacher]
        if la:
            if student in heads:
                s_top = fn.top(f"{student}_up")
            else:                                                # not a head input: LA here
                n[f"{student}_up"] = s_top = L.Upsample(s_top, scale=2)
            grids += [t_top, teacher_tops[f"{teacher}_mbox_priorbox"]]
        else:
            if student not in heads:
                raise ValueError(f"ZoomInNet (alignment NONE): student blob {student} is not a head input "
                                 "(the mask needs its priors)")
            sub = f"zoomin/{student}_teacher_sub"
            n[sub] = t_top = L.Pooling(t_top, pool=P.Pooling.AVE, kernel_size=2, stride=2)
            grids += [s_top, n[f"{student}_mbox_priorbox"]]
        if s_shapes[student][1] != t_shapes[teacher][1]:
            n[f"zoomin/{student}_adapt"] = s_top = L.Convolution(
                s_top, num_output=t_shapes[teacher][1], kernel_size=1, param=[_WEIGHT, _BIAS],
                weight_filler=dict(type="xavier"), bias_filler=dict(type="constant", value=0))
        s_hw, t_hw = _aligned_sizes(student, teacher, s_shapes, t_shapes, settings)
        # the mask lies on the teacher's grid with LA, the student's with NONE: when that side is
        # cropped, its mask is cropped to the same reference
        mask_reference = None
        if s_hw > t_hw:                                          # the student side is larger
            n[f"zoomin/{student}_crop"] = s_top = L.Crop(s_top, t_top, **crop)
            mask_reference = None if la else t_top
        elif t_hw > s_hw:
            n[f"zoomin/{student}_teacher_crop"] = t_top = L.Crop(t_top, s_top, **crop)
            mask_reference = s_top if la else None
        masked.append((student, s_top, t_top, mask_reference))
    masks = L.AKDPMask(*grids, n.label, name="zoomin/akdp", ntop=len(pairs), include=dict(phase=TRAIN),
                       **settings.akdp)
    masks = [masks] if len(pairs) == 1 else list(masks)
    for (student, *_), mask in zip(masked, masks):
        n[f"zoomin/mask_{student}"] = mask
    for i, (student, _, _, reference) in enumerate(masked):
        if reference is not None:
            n[f"zoomin/mask_{student}_crop"] = masks[i] = L.Crop(masks[i], reference, **crop)
    for (student, s_top, t_top, _), mask in zip(masked, masks):
        n[f"zoomin/loss_{student}"] = L.PositionAwareL2Loss(
            s_top, t_top, mask, loss_weight=settings.loss_weight, propagate_down=[True, False, False],
            include=dict(phase=TRAIN), **settings.l2)
