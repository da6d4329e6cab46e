"""Layer implementations: one class per Caffe type (params, static shape rule, torch forward)."""
from .base import Layer, LayerError, Shape, format_shape
from .registry import get, register, supported_types, UnknownLayerType

__all__ = ["Layer", "LayerError", "Shape", "format_shape", "get", "register", "supported_types",
           "UnknownLayerType"]
