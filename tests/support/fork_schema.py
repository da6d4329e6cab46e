"""The SSD fork's compiled schema, as shipped in the package index's ``caffe-ssd`` 0.1 wheel.

That wheel's ``caffe/proto/caffe_pb2.py`` was generated from weiliu89/caffe's ``ssd`` branch; it
cannot be imported (its ``caffe`` package loads a compiled ``_caffe.so``, and its old-style
descriptor calls are rejected by protobuf >= 4), so the serialized ``FileDescriptorProto`` is read
out of the module's source instead. ``tests/fixtures/ssd_fork_caffe_proto.pb`` holds those bytes,
so the schema test needs neither the network nor the package:

    pip download --no-deps caffe-ssd==0.1 -d /tmp/cs
    python tests/support/fork_schema.py /tmp/cs/caffe_ssd-0.1-py3-none-any.whl   # rewrites it
"""
import ast
import sys
import zipfile
from pathlib import Path

from google.protobuf import descriptor_pb2

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ssd_fork_caffe_proto.pb"
PB2_IN_WHEEL = "caffe/proto/caffe_pb2.py"


def serialized_from_pb2(source: str) -> bytes:
    """The ``serialized_pb`` bytes of a protoc-generated ``*_pb2.py`` (old or new style)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg == "serialized_pb":
            value = node.value.args[0] if isinstance(node.value, ast.Call) else node.value
            text = value.value
            return text.encode("latin1") if isinstance(text, str) else text
    raise ValueError("no serialized_pb in the generated module")


def serialized_from_wheel(wheel) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return serialized_from_pb2(archive.read(PB2_IN_WHEEL).decode("latin1"))


def fork_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The fork's caffe.proto as a FileDescriptorProto (from the committed fixture)."""
    return descriptor_pb2.FileDescriptorProto.FromString(FIXTURE.read_bytes())


if __name__ == "__main__":
    FIXTURE.write_bytes(serialized_from_wheel(sys.argv[1]))
    print(f"wrote {FIXTURE}")
