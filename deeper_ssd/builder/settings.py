"""Checking builder settings (``generate --set NAME=VALUE``, ``--head-set``) against the type
annotation of the dataclass field or builder parameter they set, and against the range the
builder needs, before anything is built or written.

    check({"input_size": "abc"}, hints(SSDModel))
    SettingError: setting input_size='abc': expects an integer >= 1

Lists are accepted where a tuple is expected (and become tuples); an integer is accepted for a
number. Names without an annotation pass unchecked.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Callable, Dict, Optional, Tuple, Union

__all__ = ["SettingError", "RANGES", "hints", "check", "expects"]


class SettingError(ValueError):
    """A setting's value does not fit its field: ``setting NAME=VALUE: expects ...``."""


#: name -> (low, high, low inclusive, high inclusive); None = unbounded. A builder setting of
#: one of these names outside its range cannot give a working net or solver.
RANGES: Dict[str, Tuple[Optional[float], Optional[float], bool, bool]] = {
    **{name: (1, None, True, False) for name in (
        "input_size", "batch_size", "test_batch_size", "max_iter", "test_interval", "display",
        "average_loss", "iter_size", "reduction_ratio", "num_test_image")},
    **{name: (0, None, False, False) for name in ("width", "base_lr", "ste_width")},
    **{name: (0, 1, True, True) for name in (
        "expand_prob", "overlap_threshold", "neg_overlap", "nms_threshold", "confidence_threshold")},
    **{name: (0, 1, True, False) for name in (
        "bn_moving_average_fraction", "moving_average_fraction", "momentum", "momentum2")},
    **{name: (0, None, True, False) for name in ("weight_decay", "gamma", "snapshot", "neg_pos_ratio")},
}


def hints(target: Union[type, Callable]) -> Dict[str, Any]:
    """Resolved type annotations of a dataclass's fields or a function's parameters."""
    names = ({f.name for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target)
             else set(inspect.signature(target).parameters))
    try:
        resolved = typing.get_type_hints(target)
    except (NameError, TypeError):
        resolved = {}
    return {name: kind for name, kind in resolved.items() if name in names}


def check(settings: Dict[str, Any], annotations: Dict[str, Any]) -> Dict[str, Any]:
    """``settings`` with each value conformed to its annotation (lists -> tuples); raises
    SettingError naming the first setting that does not fit its type or range."""
    checked = {}
    for name, value in settings.items():
        kind = annotations.get(name)
        if kind is None:
            checked[name] = value
            continue
        try:
            checked[name] = _conform(value, kind)
            _check_range(name, checked[name])
        except _Mismatch:
            raise SettingError(f"setting {name}={value!r}: expects {expects(kind, name)}") from None
    return checked


class _Mismatch(Exception):
    pass


def _conform(value, kind):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any or kind is object:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is not type(None):
                try:
                    return _conform(value, arm)
                except _Mismatch:
                    pass
        raise _Mismatch
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if kind is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if kind in (tuple, Tuple) or origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise _Mismatch
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_conform(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_conform(v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        key, item = args or (Any, Any)
        return {_conform(k, key): _conform(v, item) for k, v in value.items()}
    if isinstance(kind, type):
        if isinstance(value, kind):
            return value
        raise _Mismatch
    return value


def _check_range(name: str, value) -> None:
    if name not in RANGES or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low, high, low_in, high_in = RANGES[name]
    if low is not None and (value < low or (value == low and not low_in)):
        raise _Mismatch
    if high is not None and (value > high or (value == high and not high_in)):
        raise _Mismatch


def _shape(kind) -> str:
    """A short notation of ``kind``: integer, number, True|False, string, (integer, ...),
    number or None."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Union:
        arms = [_shape(a) for a in args if a is not type(None)]
        return " or ".join(arms + (["None"] if type(None) in args else []))
    if kind in (tuple, Tuple):
        return "(...)"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"({_shape(args[0])}, ...)"
        return "(" + ", ".join(_shape(a) for a in args) + ")"
    if origin is dict:
        key, item = args or (Any, Any)
        return f"{{{_shape(key)}: {_shape(item)}}}"
    names = {int: "integer", float: "number", bool: "True|False", str: "string"}
    if kind in names:
        return names[kind]
    return getattr(kind, "__name__", str(kind))


def expects(kind, name: str = "") -> str:
    """What a value of annotation ``kind`` (and, by ``name``, range) looks like, in words."""
    text = _shape(kind)
    article = "an" if text[:1] in "aeiou" else "a"
    words = {"integer": "an integer", "number": "a number", "True|False": "True or False",
             "string": "a string"}
    if text in words:
        text = words[text]
    elif text.startswith("("):
        text = f"a tuple {text}"
    elif text.startswith("{"):
        text = f"a dict {text}"
    elif " or " not in text:
        text = f"{article} {text}"
    if name in RANGES:
        low, high, low_in, high_in = RANGES[name]
        bounds = []
        if low is not None:
            bounds.append(f"{'>=' if low_in else '>'} {low:g}")
        if high is not None:
            bounds.append(f"{'<=' if high_in else '<'} {high:g}")
        text += " " + " and ".join(bounds)
    return text
