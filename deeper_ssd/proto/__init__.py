"""The Caffe schema (``caffe.proto``) and its generated Python module.

``from deeper_ssd.proto import caffe_pb2`` gives the message classes (``caffe_pb2.NetParameter``
...). The generated module is committed; ``python -m deeper_ssd.proto.regenerate`` rebuilds it
from the .proto with the protoc bundled in grpcio-tools (no system protoc needed), and
``--check`` reports drift without writing.
"""
from . import caffe_pb2

__all__ = ["caffe_pb2"]
