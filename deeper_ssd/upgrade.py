"""Caffe's load-time upgrades of old net files (UpgradeNetAsNeeded, src/caffe/util/upgrade_proto.cpp).

Applied in Caffe's order, each only when the net needs it:

1. **V0 layers** (``layers { layer { type: "conv" ... } }``, before 2014) become V1 layers: the
   lower-case type names become V1's enum, flat fields such as ``num_output``, ``kernelsize``,
   ``batchsize`` move into the per-type messages, ``scale``/``meanfile``/``cropsize``/``mirror``
   into ``transform_param``, and ``padding`` layers fold into the convolution or pooling after them.
   The net keeps only its name, inputs and ``force_backward``, as Caffe's UpgradeV0Net does.
2. **Data-layer transformation fields** of V1 Data/ImageData/WindowData layers (``scale``,
   ``mean_file``, ``crop_size``, ``mirror`` in the data message) move to ``transform_param``.
3. **V1 layers** (``layers { type: CONVOLUTION blobs_lr: 1 weight_decay: 1 }``) become
   LayerParameter: the enum type becomes its string, ``param``/``blob_share_mode``/``blobs_lr``/
   ``weight_decay`` become ``param { name share_mode lr_mult decay_mult }``, the per-type messages
   and blobs are kept.
4. **Net-level inputs** (``input`` with ``input_shape`` or ``input_dim``) become one ``Input`` layer
   named ``input``, first in the net; ``input`` alone (old .caffemodels) is dropped.
5. **BatchNorm** layers with exactly three ``param`` specs (the old way to freeze its statistics)
   lose them (its blobs are never learned).

Steps 4 and 5 are forms the SSD fork's own tools still write (its deploy files' ``input`` fields,
model_libs.py's BatchNorm ``param`` triples), so the readers in io.py leave them as written and
the shape plan applies them (``io.upgrade_net``); the other steps happen on read.

Where Caffe logs an error and goes on (a V0 field that does not apply to the layer's type), we
warn and go on; where Caffe aborts (an unknown V0 type, a bottom no layer makes), or would drop
layers (a net with both ``layer`` and ``layers``), CaffeFormatError says so. Caffe's tools
upgrade_net_proto_text / _binary are :func:`upgrade_file` (``deeper-ssd upgrade IN OUT``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Tuple

from . import io
from .proto import caffe_pb2

__all__ = ["upgrade_net", "log_upgrades", "upgrade_file", "V0_TYPES", "V1_TYPES"]

log = logging.getLogger(__name__)

V1 = caffe_pb2.V1LayerParameter

#: V0 type names -> V1 layer types (UpgradeV0LayerType); any other V0 type is an error
V0_TYPES = {
    "accuracy": V1.ACCURACY, "bnll": V1.BNLL, "concat": V1.CONCAT, "conv": V1.CONVOLUTION,
    "data": V1.DATA, "dropout": V1.DROPOUT, "euclidean_loss": V1.EUCLIDEAN_LOSS,
    "flatten": V1.FLATTEN, "hdf5_data": V1.HDF5_DATA, "hdf5_output": V1.HDF5_OUTPUT,
    "im2col": V1.IM2COL, "images": V1.IMAGE_DATA, "infogain_loss": V1.INFOGAIN_LOSS,
    "innerproduct": V1.INNER_PRODUCT, "lrn": V1.LRN,
    "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS, "pool": V1.POOLING,
    "relu": V1.RELU, "sigmoid": V1.SIGMOID, "softmax": V1.SOFTMAX,
    "softmax_loss": V1.SOFTMAX_LOSS, "split": V1.SPLIT, "tanh": V1.TANH,
    "window_data": V1.WINDOW_DATA,
}

#: V1 layer types -> LayerParameter type strings (UpgradeV1LayerType)
V1_TYPES = {
    V1.NONE: "", V1.ABSVAL: "AbsVal", V1.ACCURACY: "Accuracy", V1.ARGMAX: "ArgMax",
    V1.BNLL: "BNLL", V1.CONCAT: "Concat", V1.CONTRASTIVE_LOSS: "ContrastiveLoss",
    V1.CONVOLUTION: "Convolution", V1.DECONVOLUTION: "Deconvolution", V1.DATA: "Data",
    V1.DROPOUT: "Dropout", V1.DUMMY_DATA: "DummyData", V1.EUCLIDEAN_LOSS: "EuclideanLoss",
    V1.ELTWISE: "Eltwise", V1.EXP: "Exp", V1.FLATTEN: "Flatten", V1.HDF5_DATA: "HDF5Data",
    V1.HDF5_OUTPUT: "HDF5Output", V1.HINGE_LOSS: "HingeLoss", V1.IM2COL: "Im2col",
    V1.IMAGE_DATA: "ImageData", V1.INFOGAIN_LOSS: "InfogainLoss",
    V1.INNER_PRODUCT: "InnerProduct", V1.LRN: "LRN", V1.MEMORY_DATA: "MemoryData",
    V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss", V1.MVN: "MVN",
    V1.POOLING: "Pooling", V1.POWER: "Power", V1.RELU: "ReLU", V1.SIGMOID: "Sigmoid",
    V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss", V1.SILENCE: "Silence",
    V1.SOFTMAX: "Softmax", V1.SOFTMAX_LOSS: "SoftmaxWithLoss", V1.SPLIT: "Split",
    V1.SLICE: "Slice", V1.TANH: "TanH", V1.WINDOW_DATA: "WindowData", V1.THRESHOLD: "Threshold",
}

# V0 field -> {V0 type: "message.field" in the V1 layer}; the key None applies to every type.
# Fields Caffe's UpgradeV0LayerParameter does not read (new_num, new_channels) are absent.
_V0_FIELDS = {
    "num_output": {"conv": "convolution_param.num_output", "innerproduct": "inner_product_param.num_output"},
    "biasterm": {"conv": "convolution_param.bias_term", "innerproduct": "inner_product_param.bias_term"},
    "weight_filler": {"conv": "convolution_param.weight_filler",
                      "innerproduct": "inner_product_param.weight_filler"},
    "bias_filler": {"conv": "convolution_param.bias_filler", "innerproduct": "inner_product_param.bias_filler"},
    "pad": {"conv": "convolution_param.pad", "pool": "pooling_param.pad"},
    "kernelsize": {"conv": "convolution_param.kernel_size", "pool": "pooling_param.kernel_size"},
    "group": {"conv": "convolution_param.group"},
    "stride": {"conv": "convolution_param.stride", "pool": "pooling_param.stride"},
    "pool": {"pool": "pooling_param.pool"},
    "dropout_ratio": {"dropout": "dropout_param.dropout_ratio"},
    "local_size": {"lrn": "lrn_param.local_size"},
    "alpha": {"lrn": "lrn_param.alpha"},
    "beta": {"lrn": "lrn_param.beta"},
    "k": {"lrn": "lrn_param.k"},
    "source": {"data": "data_param.source", "hdf5_data": "hdf5_data_param.source",
               "images": "image_data_param.source", "window_data": "window_data_param.source",
               "infogain_loss": "infogain_loss_param.source"},
    "scale": {None: "transform_param.scale"},
    "meanfile": {None: "transform_param.mean_file"},
    "batchsize": {"data": "data_param.batch_size", "hdf5_data": "hdf5_data_param.batch_size",
                  "images": "image_data_param.batch_size", "window_data": "window_data_param.batch_size"},
    "cropsize": {None: "transform_param.crop_size"},
    "mirror": {None: "transform_param.mirror"},
    "rand_skip": {"data": "data_param.rand_skip", "images": "image_data_param.rand_skip"},
    "shuffle_images": {"images": "image_data_param.shuffle"},
    "new_height": {"images": "image_data_param.new_height"},
    "new_width": {"images": "image_data_param.new_width"},
    "concat_dim": {"concat": "concat_param.concat_dim"},
    "det_fg_threshold": {"window_data": "window_data_param.fg_threshold"},
    "det_bg_threshold": {"window_data": "window_data_param.bg_threshold"},
    "det_fg_fraction": {"window_data": "window_data_param.fg_fraction"},
    "det_context_pad": {"window_data": "window_data_param.context_pad"},
    "det_crop_mode": {"window_data": "window_data_param.crop_mode"},
    "hdf5_output_param": {"hdf5_output": "hdf5_output_param"},
}

# V1 data layers whose own message carried the transformation fields (NetNeedsDataUpgrade)
_DATA_TRANSFORM = {V1.DATA: "data_param", V1.IMAGE_DATA: "image_data_param",
                   V1.WINDOW_DATA: "window_data_param"}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def _assign(message, path: str, value) -> None:
    """Set ``message.<path>`` to ``value``: copy a message, append to a repeated field, set a scalar."""
    *parents, name = path.split(".")
    for parent in parents:
        message = getattr(message, parent)
    field = message.DESCRIPTOR.fields_by_name[name]
    if field.message_type is not None:
        getattr(message, name).CopyFrom(value)
    elif field.is_repeated:
        getattr(message, name).append(value)
    else:
        setattr(message, name, value)


def _fold_v0_padding(net: caffe_pb2.NetParameter, source: str) -> List[caffe_pb2.V1LayerParameter]:
    """UpgradeV0PaddingLayers: drop each V0 ``padding`` layer and give its pad and bottom to the
    conv/pool layer that reads it."""
    last_top = {name: None for name in net.input}
    layers = []
    for connection in net.layers:
        v0 = connection.layer
        current = None
        if v0.type != "padding":
            current = caffe_pb2.V1LayerParameter()
            current.CopyFrom(connection)
            layers.append(current)
        for j, blob in enumerate(connection.bottom):
            if blob not in last_top:
                raise io.CaffeFormatError(f"{source}: unknown blob input '{blob}' to V0 layer "
                                          f"'{v0.name}' (no earlier layer or net input makes it)")
            maker = last_top[blob]
            if maker is None or maker.layer.type != "padding":
                continue
            if v0.type not in ("conv", "pool") or len(connection.bottom) != 1 \
                    or len(maker.bottom) != 1 or len(maker.top) != 1:
                raise io.CaffeFormatError(
                    f"{source}: V0 padding layer '{maker.layer.name}' must have one bottom and one top "
                    f"and feed a single-input conv or pool layer, not '{v0.name}' ({v0.type})")
            if current is not None:
                current.layer.pad = maker.layer.pad
                current.bottom[j] = maker.bottom[0]
        for blob in connection.top:
            last_top[blob] = connection
    return layers


def _v0_to_v1_layer(connection: caffe_pb2.V1LayerParameter, source: str, problems: List[str]):
    """UpgradeV0LayerParameter: one V0 layer (inside a V1 shell) as a V1 layer."""
    out = caffe_pb2.V1LayerParameter(bottom=connection.bottom, top=connection.top)
    if not connection.HasField("layer"):
        return out
    v0 = connection.layer
    if v0.HasField("name"):
        out.name = v0.name
    if v0.HasField("type"):
        if v0.type not in V0_TYPES:
            raise io.CaffeFormatError(f"{source}: V0 layer '{v0.name}' has unknown type '{v0.type}'")
        out.type = V0_TYPES[v0.type]
    out.blobs.extend(v0.blobs)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    for field, value in v0.ListFields():
        targets = _V0_FIELDS.get(field.name)
        if targets is None:
            continue
        target = targets.get(None, targets.get(v0.type))
        if target is None:
            problems.append(f"V0 layer '{v0.name}': parameter {field.name} does not apply to type "
                            f"'{v0.type}'; ignored")
            continue
        _assign(out, target, value)
    return out


def _upgrade_v0(net: caffe_pb2.NetParameter, source: str, problems: List[str]) -> caffe_pb2.NetParameter:
    """UpgradeV0Net: a V1 net with the name, inputs and force_backward of ``net``."""
    layers = _fold_v0_padding(net, source)
    out = caffe_pb2.NetParameter()
    if net.HasField("name"):
        out.name = net.name
    out.layers.extend(_v0_to_v1_layer(layer, source, problems) for layer in layers)
    out.input.extend(net.input)
    out.input_dim.extend(net.input_dim)
    if net.HasField("force_backward"):
        out.force_backward = net.force_backward
    return out


def _needs_data_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return any(getattr(layer, _DATA_TRANSFORM[layer.type]).HasField(f)
               for layer in net.layers if layer.type in _DATA_TRANSFORM for f in _TRANSFORM_FIELDS)


def _upgrade_data_transform(net: caffe_pb2.NetParameter) -> None:
    """UpgradeNetDataTransformation, in place."""
    for layer in net.layers:
        if layer.type not in _DATA_TRANSFORM:
            continue
        params = getattr(layer, _DATA_TRANSFORM[layer.type])
        for field in _TRANSFORM_FIELDS:
            if params.HasField(field):
                setattr(layer.transform_param, field, getattr(params, field))
                params.ClearField(field)


def _v1_to_layer(v1: caffe_pb2.V1LayerParameter, problems: List[str]) -> caffe_pb2.LayerParameter:
    """UpgradeV1LayerParameter."""
    layer = caffe_pb2.LayerParameter(bottom=v1.bottom, top=v1.top, include=v1.include,
                                     exclude=v1.exclude, blobs=v1.blobs, loss_weight=v1.loss_weight)
    if v1.HasField("name"):
        layer.name = v1.name
    if v1.HasField("type"):
        layer.type = V1_TYPES[v1.type]

    def spec(i):
        while len(layer.param) <= i:
            layer.param.add()
        return layer.param[i]
    for i, name in enumerate(v1.param):
        spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        spec(i).share_mode = mode              # V1's DimCheckMode has ParamSpec's numbers
    for i, lr in enumerate(v1.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        spec(i).decay_mult = decay
    for field, value in v1.ListFields():
        if field.name.endswith("_param"):
            getattr(layer, field.name).CopyFrom(value)
    if v1.HasField("layer"):
        problems.append(f"V1 layer '{v1.name}' also holds a V0 layer; the V0 part is ignored")
    return layer


def _upgrade_inputs(net: caffe_pb2.NetParameter, source: str) -> None:
    """UpgradeNetInput, in place: ``input`` + ``input_shape``/``input_dim`` -> an Input layer first.
    One ``input_shape`` may serve every input (a shorthand Caffe itself does not accept)."""
    if len(net.input_dim) and len(net.input_dim) != 4 * len(net.input):
        raise io.CaffeFormatError(f"{source}: input_dim needs 4 values per input "
                                  f"({len(net.input)} inputs, {len(net.input_dim)} values)")
    if len(net.input_shape) and len(net.input_shape) not in (1, len(net.input)):
        raise io.CaffeFormatError(f"{source}: {len(net.input_shape)} input_shape entries "
                                  f"for {len(net.input)} inputs")
    if len(net.input_shape) or len(net.input_dim):
        layer = caffe_pb2.LayerParameter(name="input", type="Input", top=net.input)
        for i in range(len(net.input)):
            shape = layer.input_param.shape.add()
            if len(net.input_shape):
                shape.CopyFrom(net.input_shape[min(i, len(net.input_shape) - 1)])
            else:
                shape.dim.extend(net.input_dim[4 * i: 4 * i + 4])
        layers = [layer] + list(net.layer)
        del net.layer[:]
        net.layer.extend(layers)
    for field in ("input", "input_shape", "input_dim"):
        net.ClearField(field)


def upgrade_net(net: caffe_pb2.NetParameter, source: str = "net",
                keep_fork_forms: bool = False) -> Tuple[caffe_pb2.NetParameter, List[str]]:
    """A copy of ``net`` with Caffe's load-time upgrades applied, and the names of those that
    were needed (empty when the net was current). ``keep_fork_forms=True`` leaves the two forms
    the SSD fork's own tools still write as written: net-level inputs and BatchNorm's three
    ``param`` specs (steps 4 and 5; docs/decisions.md). Warnings name what Caffe would log as
    problems."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    done, problems = [], []
    if any(layer.HasField("layer") for layer in out.layers):
        out = _upgrade_v0(out, source, problems)
        done.append("V0 layers")
    if _needs_data_upgrade(out):
        _upgrade_data_transform(out)
        done.append("data-layer transformation fields")
    if len(out.layers):
        if len(out.layer):
            raise io.CaffeFormatError(
                f"{source}: the net has both 'layer' and legacy 'layers' entries; Caffe's upgrade "
                "would drop the 'layer' ones. Keep one form")
        layers = [_v1_to_layer(v1, problems) for v1 in out.layers]
        out.ClearField("layers")
        out.layer.extend(layers)
        done.append("V1 layers")
    if not keep_fork_forms:
        if len(out.input):
            _upgrade_inputs(out, source)
            done.append("net-level inputs")
        frozen_bn = [layer for layer in out.layer if layer.type == "BatchNorm" and len(layer.param) == 3]
        for layer in frozen_bn:
            layer.ClearField("param")
        if frozen_bn:
            done.append("BatchNorm param specs")
    for problem in problems:
        log.warning("%s: %s", source, problem)
    return out, done


def log_upgrades(source: str, done: List[str]) -> None:
    """The one line that says a file was read in an old format and upgraded."""
    if done:
        log.warning("%s: upgraded %s as Caffe does on load (deeper-ssd upgrade writes the "
                    "upgraded file)", source, ", ".join(done))


def _is_binary(data: bytes) -> bool:
    """A prototxt holds no control bytes other than tab, newline and carriage return."""
    return bool(data.translate(None, bytes(range(32, 256)) + b"\t\n\r"))


def upgrade_file(src, dst) -> Tuple[bool, List[str]]:
    """Caffe's upgrade_net_proto_text / _binary: read ``src`` (text or binary, by its bytes),
    apply every upgrade and write ``dst`` in the same kind. Returns (binary?, upgrades done)."""
    src, dst = Path(src), Path(dst)
    try:
        binary = _is_binary(src.read_bytes())
    except OSError as err:
        raise io.CaffeFormatError(f"{src}: cannot read: {err.strerror or err}") from None
    raw = io.read_binary(src, caffe_pb2.NetParameter) if binary else io.read_text(src, caffe_pb2.NetParameter)
    net, done = upgrade_net(raw, str(src))
    (io.write_binary if binary else io.write_text)(net, dst)
    return binary, done
