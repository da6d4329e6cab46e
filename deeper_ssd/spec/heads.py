"""Heads attached to zoo models: SR-TOD (issue 8); ZoomInNet keeps its own section.

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
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

from .. import shapes
from ..proto import caffe_pb2
from .netspec import TRAIN, L, NetSpec
from .ssd import SSDModel

__all__ = ["SRTOD_THRESHOLDS", "SRTOD", "SRTODModel", "with_srtod", "srtod_layers", "attach_srtod",
           "committed_variants"]


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
    code's optimizer decays t; ``lr_mult 0`` is the paper's "Fixed T"). ``init``: ``"pytorch"``
    (the code's nn.Conv/nn.Linear defaults, U(±1/sqrt(fan_in))) or ``"xavier"`` (SSD's
    convention, biases 0). ``channels``: the Up blocks' widths (default: halving).
    """
    source: str = "conv4_3"
    initial_threshold: float = SRTOD_THRESHOLDS["DroneSwarms"]
    threshold_gradient: str = "ZERO"
    ste_width: float = 0.01
    threshold_lr_mult: float = 1.0
    threshold_decay_mult: float = 1.0
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


def srtod_layers(head: SRTOD, feature: str, feature_shape: Sequence[int], image: str,
                 image_shape: Sequence[int], mean_value: Sequence[float], scale: float,
                 train: bool) -> List[caffe_pb2.LayerParameter]:
    """The head's layers for feature blob ``feature`` (``N x C x h x w``) and image blob ``image``
    (``N x 3 x H x W``, the data blob with transform ``mean_value``/``scale``). The DGFE output
    is ``<feature>_dgfe``; the loss is added only when ``train``."""
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
    threshold = dict(lr_mult=head.threshold_lr_mult, decay_mult=head.threshold_decay_mult)
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
        feature, image = _srtod_feature(self, self.head.source), "data"
        blob_shapes = shapes.plan_net(plain["deploy"], caffe_pb2.TEST, device="meta").blob_shapes
        data_layer = next(layer for layer in plain["test"].layer if layer.type == "AnnotatedData")
        transform = data_layer.transform_param
        nets = {}
        for phase, net in plain.items():
            layers = srtod_layers(self.head, feature, blob_shapes[feature], image, blob_shapes[image],
                                  transform.mean_value, transform.scale, train=phase == "train")
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
