"""A net builder in the style of Caffe's ``net_spec``: ``NetSpec``, ``L`` (layers) and ``P`` (enums).

    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 300, 300]))
    n.conv1 = L.Convolution(n.data, num_output=64, kernel_size=3, pad=1,
                            param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)],
                            weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    net_param = n.to_proto()          # caffe_pb2.NetParameter

Keyword arguments that name a ``LayerParameter`` field (``param``, ``include``, ``loss_weight``,
``propagate_down``, ``name``, any ``*_param``) go to the layer; every other keyword goes to the
layer type's own parameter message (``convolution_param`` for Convolution and Deconvolution,
``norm_param`` for Normalize ...), found through the schema. A keyword that fits neither is an
error naming the layer type and the keyword. ``ntop=k`` gives ``k`` tops; ``in_place=True``
writes the result into the (single) bottom blob.

Layer order and naming follow Caffe's net_spec: ``to_proto`` walks the assigned tops in
assignment order and emits each layer after its bottoms; a layer is named after the attribute
its first top was assigned to (or ``name=``), unassigned tops get ``<Type><k>``.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

from google.protobuf import message as _pb_message
from google.protobuf.descriptor import FieldDescriptor

from ..proto import caffe_pb2

__all__ = ["NetSpec", "L", "P", "Top", "TRAIN", "TEST", "assign", "param_field_for_type"]

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST

_LAYER_FIELDS = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
# Layer types whose parameter message is not named "<Type>Parameter".
_TYPE_ALIASES = {"Deconvolution": "Convolution", "SoftmaxWithLoss": "Softmax",
                 "SigmoidCrossEntropyLoss": "Loss", "EuclideanLoss": "Loss"}


def _param_fields_by_type() -> dict:
    """Map a layer type name (``Convolution``) to its LayerParameter field (``convolution_param``)."""
    table = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                type_name = type_name[: -len("Parameter")]
            table[type_name] = field.name
    for alias, target in _TYPE_ALIASES.items():
        if target in table:
            table.setdefault(alias, table[target])
    return table


_PARAM_FIELDS = _param_fields_by_type()


def param_field_for_type(layer_type: str):
    """The LayerParameter field holding ``layer_type``'s parameters, or None if it has none."""
    return _PARAM_FIELDS.get(layer_type)


def _enum_value(field: FieldDescriptor, value):
    if isinstance(value, str):
        enum_value = field.enum_type.values_by_name.get(value)
        if enum_value is None:
            names = ", ".join(field.enum_type.values_by_name)
            raise ValueError(f"{field.full_name}: {value!r} is not one of {names}")
        return enum_value.number
    return value


def assign(message: _pb_message.Message, key: str, value: Any) -> None:
    """Set ``message.key`` from a Python value: dicts fill sub-messages, lists fill repeated
    fields, a single value is appended to a repeated field, enum names are accepted as strings."""
    field = message.DESCRIPTOR.fields_by_name.get(key)
    if field is None:
        raise AttributeError(f"{message.DESCRIPTOR.name} has no field {key!r}")
    is_message = field.type == FieldDescriptor.TYPE_MESSAGE
    is_enum = field.type == FieldDescriptor.TYPE_ENUM
    if field.is_repeated:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        container = getattr(message, key)
        for item in values:
            if is_message:
                _fill(container.add(), item)
            else:
                container.append(_enum_value(field, item) if is_enum else item)
    elif is_message:
        _fill(getattr(message, key), value)
    else:
        setattr(message, key, _enum_value(field, value) if is_enum else value)


def _fill(message: _pb_message.Message, value) -> None:
    if isinstance(value, _pb_message.Message):
        message.CopyFrom(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            assign(message, key, item)
    else:
        raise TypeError(f"{message.DESCRIPTOR.name} needs a dict or a message, got {value!r}")


class Top:
    """One output blob of a layer function (``fn``), the ``n``-th of its tops."""

    def __init__(self, fn: "Function", n: int):
        self.fn, self.n = fn, n

    def __repr__(self):
        return f"<Top {self.n} of {self.fn.type_name}>"


class Function:
    """A layer not yet written out: its type, bottoms (Tops) and keyword parameters."""

    def __init__(self, type_name: str, inputs, params: dict):
        self.type_name = type_name
        for i, inp in enumerate(inputs):
            if not isinstance(inp, Top):
                raise TypeError(f"L.{type_name}: bottom {i} is {inp!r}, not a Top (a layer output)")
        self.inputs = list(inputs)
        self.ntop = params.pop("ntop", 1)
        self.in_place = params.pop("in_place", False)
        if self.in_place and len(self.inputs) != 1:
            raise ValueError(f"L.{type_name}: in_place needs exactly one bottom, got {len(self.inputs)}")
        self.params = params
        self._check_params()
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _check_params(self) -> None:
        """Fail now, at the call site, on a keyword that fits neither LayerParameter nor the type."""
        self._build_params(caffe_pb2.LayerParameter())

    def _build_params(self, layer: caffe_pb2.LayerParameter) -> None:
        type_field = param_field_for_type(self.type_name)
        for key, value in self.params.items():
            if key in _LAYER_FIELDS:
                assign(layer, key, value)
                continue
            if type_field is None:
                raise TypeError(f"L.{self.type_name}: unknown keyword {key!r} (this layer type has "
                                "no parameter message; pass LayerParameter fields only)")
            sub = getattr(layer, type_field)
            if key not in sub.DESCRIPTOR.fields_by_name:
                raise TypeError(f"L.{self.type_name}: unknown keyword {key!r}: neither a LayerParameter "
                                f"field nor a field of {sub.DESCRIPTOR.name} ({type_field})")
            assign(sub, key, value)

    def _top_name(self, top: Top, names: dict, autonames: Counter) -> str:
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = f"{top.fn.type_name}{autonames[top.fn.type_name]}"
        return names[top]

    def _name(self, names: dict, autonames: Counter) -> str:
        if self not in names:
            if self.ntop > 0:
                names[self] = self._top_name(self.tops[0], names, autonames)
            else:
                autonames[self.type_name] += 1
                names[self] = f"{self.type_name}{autonames[self.type_name]}"
        return names[self]

    def to_proto(self, layers: "OrderedDict", names: dict, autonames: Counter) -> None:
        """Emit this layer into ``layers`` (after its bottoms), once."""
        if self in layers:
            return
        bottoms = []
        for inp in self.inputs:
            inp.fn.to_proto(layers, names, autonames)
            bottoms.append(layers[inp.fn].top[inp.n])
        layer = caffe_pb2.LayerParameter(type=self.type_name)
        layer.bottom.extend(bottoms)
        if self.in_place:
            layer.top.extend(bottoms)
        else:
            layer.top.extend(self._top_name(top, names, autonames) for top in self.tops)
        layer.name = self._name(names, autonames)
        self._build_params(layer)
        layers[self] = layer


class NetSpec:
    """Named tops of a net under construction; ``to_proto()`` returns the NetParameter."""

    def __init__(self):
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name: str, value):
        if not isinstance(value, (Top, Function)):
            raise TypeError(f"NetSpec.{name}: expected a layer output (or a top-less layer such as "
                            f"Silence), got {value!r}")
        self.tops[name] = value

    def __getattr__(self, name: str) -> Top:
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(f"NetSpec has no top named {name!r}") from None

    def __setitem__(self, name: str, value):
        self.__setattr__(name, value)

    def __getitem__(self, name: str) -> Top:
        return self.__getattr__(name)

    def __contains__(self, name: str) -> bool:
        return name in self.tops

    def keys(self):
        return list(self.tops)

    def to_proto(self, name: str = "") -> caffe_pb2.NetParameter:
        names = {top: key for key, top in self.tops.items()}
        autonames: Counter = Counter()
        layers: OrderedDict = OrderedDict()
        for top in self.tops.values():
            (top.fn if isinstance(top, Top) else top).to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        if name:
            net.name = name
        net.layer.extend(layers.values())
        return net


class _Layers:
    """``L.<Type>(*bottoms, **params)`` makes a layer function of that Caffe type."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("__"):
            raise AttributeError(type_name)

        def make(*inputs, **params):
            fn = Function(type_name, inputs, params)
            if fn.ntop == 0:
                return fn
            return fn.tops[0] if fn.ntop == 1 else fn.tops
        make.__name__ = type_name
        return make


class _EnumNamespace:
    """Enum constants of one parameter message, e.g. ``P.Pooling.MAX``."""

    def __init__(self, descriptor):
        self._descriptor = descriptor

    def __getattr__(self, name: str) -> int:
        for enum in self._descriptor.enum_types:
            if name in enum.values_by_name:
                return enum.values_by_name[name].number
        raise AttributeError(f"{self._descriptor.name} has no enum constant {name!r}")


class _Params:
    """``P.<Name>`` resolves ``<Name>Parameter`` (or the message ``<Name>``) for enum constants."""

    def __getattr__(self, name: str) -> _EnumNamespace:
        for candidate in (f"{name}Parameter", name):
            descriptor = caffe_pb2.DESCRIPTOR.message_types_by_name.get(candidate)
            if descriptor is not None:
                return _EnumNamespace(descriptor)
        raise AttributeError(f"no parameter message {name}Parameter or {name} in caffe.proto")


L = _Layers()
P = _Params()
