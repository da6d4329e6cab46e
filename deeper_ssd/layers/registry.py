"""Caffe type string -> Layer class.

Every module listed in ``_MODULES`` is imported on first use; each Layer subclass in them
registers itself with the ``@register`` decorator. A new layer family = a new module here.
"""
from __future__ import annotations

import importlib
from typing import Dict, Type

from .base import Layer, LayerError

__all__ = ["register", "get", "supported_types", "UnknownLayerType"]

_MODULES = ("vision", "common", "neuron", "dense", "blob_ops", "normalization", "loss", "data",
            "priorbox", "detection_output", "multibox_loss", "detection_evaluate", "srtod", "zoomin")
_REGISTRY: Dict[str, Type[Layer]] = {}
_loaded = False


class UnknownLayerType(LayerError):
    """A layer's type has no implementation here."""


def register(cls: Type[Layer]) -> Type[Layer]:
    """Class decorator: make ``cls`` the implementation of ``cls.caffe_type``."""
    if not cls.caffe_type:
        raise TypeError(f"{cls.__name__} has no caffe_type")
    if cls.caffe_type in _REGISTRY and _REGISTRY[cls.caffe_type] is not cls:
        raise TypeError(f"layer type {cls.caffe_type!r} registered twice "
                        f"({_REGISTRY[cls.caffe_type].__name__} and {cls.__name__})")
    _REGISTRY[cls.caffe_type] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for module in _MODULES:
        importlib.import_module(f"{__package__}.{module}")
    _loaded = True


def supported_types() -> list:
    _load()
    return sorted(_REGISTRY)


def get(type_name: str, layer_name: str = "?") -> Type[Layer]:
    """The class implementing ``type_name``; UnknownLayerType (listing the known ones) otherwise."""
    _load()
    cls = _REGISTRY.get(type_name)
    if cls is None:
        raise UnknownLayerType(f"layer '{layer_name}': unknown layer type {type_name!r}; "
                               f"supported types: {', '.join(sorted(_REGISTRY))}")
    return cls
