"""Read and write Caffe's file formats: net/solver/label-map prototxt, .caffemodel, .solverstate.

Text files are parsed against ``deeper_ssd/proto/caffe.proto``; a syntax or schema error raises
:class:`PrototxtError` naming ``file:line:column`` and the offending token. Binary files are
written atomically (temporary file in the same directory, fsync, rename), so an interrupted
write never leaves a half-written .caffemodel or .solverstate behind.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Union

from google.protobuf import message as _pb_message
from google.protobuf import text_format

from .proto import caffe_pb2

if TYPE_CHECKING:
    import numpy as np

PathLike = Union[str, os.PathLike]

__all__ = [
    "PrototxtError", "CaffeFormatError",
    "parse_text", "read_text", "write_text", "message_to_text",
    "read_net", "write_net", "read_solver", "write_solver", "read_labelmap", "write_labelmap",
    "read_caffemodel", "write_caffemodel", "read_solverstate", "write_solverstate",
    "read_binary", "write_binary", "atomic_write_bytes",
    "blob_to_array", "array_to_blob", "blob_shape", "upgrade_net",
]


class CaffeFormatError(ValueError):
    """A file is not a valid Caffe file of the expected kind (the message says why and where)."""


class PrototxtError(CaffeFormatError):
    """A text-format parse error located at ``source:line:column`` with the offending token."""

    def __init__(self, source: str, line: int, column: int, token: str, reason: str):
        self.source, self.line, self.column, self.token, self.reason = source, line, column, token, reason
        where = f"{source}:{line}:{column}" if line > 0 else source
        near = f" (at {token!r})" if token else ""
        super().__init__(f"{where}: {reason}{near}")


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[-+]?[\w.]+|\S')


def _locate(text: str, line: int, column: int, reason: str):
    """(line, column, token) of a parse error. protobuf reports an error at the end of the
    input (an unclosed brace) at the last token it read; report the end of file instead."""
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return line, column, ""
    match = _TOKEN.search(lines[line - 1], max(column - 1, 0))
    if match is None:
        return line, column, ""
    rest = "\n".join([lines[line - 1][match.end():]] + lines[line:])
    at_end = not re.sub(r"#.*", "", rest).strip()
    if at_end and reason.startswith("Expected") and ", got " not in reason:
        return len(lines), len(lines[-1]) + 1, ""
    return line, column, match.group(0)


def parse_text(text: str, message: _pb_message.Message, source: str = "<string>"):
    """Parse prototxt ``text`` into ``message`` (modified in place and returned).

    Raises PrototxtError (file:line:col + token) on any syntax or schema error.
    """
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as err:
        reason = str(err)
        reason = re.sub(r"^\d+:\d+ : ", "", reason)          # location is re-added below
        reason = re.sub(r"^'.*?': ", "", reason, count=1)    # protobuf sometimes echoes the line
        line, column, token = _locate(text, err.GetLine() or 0, err.GetColumn() or 0, reason)
        if not token and reason.startswith("Expected"):
            reason = reason.rstrip(".") + " before the end of the file"
        raise PrototxtError(source, line, column, token, reason.rstrip(".")) from None
    return message


def read_text(path: PathLike, message_type):
    """Parse the text file at ``path`` as ``message_type`` (a caffe_pb2 class)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CaffeFormatError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _looks_binary(path, message_type, f"byte 0x{data[err.start]:02x} at offset {err.start} "
                            "is not UTF-8") from None
    if "\0" in text:
        raise _looks_binary(path, message_type, f"NUL byte at offset {text.index(chr(0))}")
    return parse_text(text, message_type(), str(path))


def _looks_binary(path: Path, message_type, why: str) -> CaffeFormatError:
    kind = {"NetParameter": "net", "SolverParameter": "solver", "LabelMap": "label map"}.get(
        message_type.DESCRIPTOR.name, message_type.DESCRIPTOR.name)
    return CaffeFormatError(f"{path}: not a text {kind} prototxt, it looks binary ({why}); "
                            "is it a .caffemodel or .solverstate given where a prototxt is expected?")


def message_to_text(message) -> str:
    """Caffe-style prototxt text for ``message`` (two-space indent, enums by name)."""
    return text_format.MessageToString(message)


def write_text(message, path: PathLike) -> None:
    """Write ``message`` as prototxt, atomically."""
    atomic_write_bytes(path, message_to_text(message).encode())


def read_net(path: PathLike) -> caffe_pb2.NetParameter:
    """Parse a net prototxt (train/test/deploy); old formats (V0/V1 layers, data-layer
    transformation fields) are upgraded as Caffe does on load, with one log line
    (deeper_ssd/upgrade.py); net-level inputs and BatchNorm param triples, which the SSD fork
    still writes, stay as written until the net is planned (see :func:`upgrade_net`).
    A file with neither layers nor net-level inputs (empty, or not a net) is refused."""
    net = _upgraded(read_text(path, caffe_pb2.NetParameter), path)
    if not len(net.layer) and not len(net.input):
        raise CaffeFormatError(f"{path}: the net has no layers (an empty file, or not a net prototxt?)")
    return net


def write_net(net: caffe_pb2.NetParameter, path: PathLike) -> None:
    write_text(net, path)


def read_solver(path: PathLike) -> caffe_pb2.SolverParameter:
    return read_text(path, caffe_pb2.SolverParameter)


def write_solver(solver: caffe_pb2.SolverParameter, path: PathLike) -> None:
    write_text(solver, path)


def read_labelmap(path: PathLike) -> caffe_pb2.LabelMap:
    """Parse a LabelMap prototxt; names and labels must each be unique (as the SSD fork checks)."""
    labelmap = read_text(path, caffe_pb2.LabelMap)
    for field in ("name", "label"):
        seen = {}
        for item in labelmap.item:
            value = getattr(item, field)
            if value in seen:
                raise CaffeFormatError(f"{path}: duplicate {field} {value!r} in label map")
            seen[value] = item
    return labelmap


def write_labelmap(labelmap: caffe_pb2.LabelMap, path: PathLike) -> None:
    write_text(labelmap, path)


# ---------------------------------------------------------------------------------------------
# binary files

def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers only ever see the old or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())          # mkstemp's 0600 -> what open() would give
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    """The process's file mode creation mask (read by setting it and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_binary(path: PathLike, message_type):
    """Parse a binary protobuf file as ``message_type``; a clear error when it is not one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CaffeFormatError(f"{path}: cannot read: {err.strerror or err}") from None
    message = message_type()
    try:
        message.ParseFromString(data)
    except _pb_message.DecodeError as err:
        raise CaffeFormatError(
            f"{path}: not a binary {message_type.DESCRIPTOR.name} ({err}); "
            "is it a text prototxt or a truncated file?") from None
    where = _non_utf8_string(message)
    if where:
        raise CaffeFormatError(f"{path}: not a valid binary {message_type.DESCRIPTOR.name}: "
                               f"{where} is not UTF-8 text (a damaged file?)")
    return message


def _non_utf8_string(message, prefix: str = "") -> str:
    """The first string field of ``message`` whose bytes are not UTF-8 (protobuf hands those
    back as bytes), as ``layer[3].name``; "" when there is none."""
    from google.protobuf.descriptor import FieldDescriptor
    for field, value in message.ListFields():
        if field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
            continue                                        # blob data: never listed
        repeated = field.is_repeated
        values = list(value) if repeated else [value]
        for i, item in enumerate(values):
            name = f"{prefix}{field.name}" + (f"[{i}]" if repeated else "")
            if field.type == FieldDescriptor.TYPE_STRING and isinstance(item, bytes):
                return name
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                found = _non_utf8_string(item, name + ".")
                if found:
                    return found
    return ""


def write_binary(message, path: PathLike) -> None:
    atomic_write_bytes(path, message.SerializeToString())


def read_caffemodel(path: PathLike) -> caffe_pb2.NetParameter:
    """Read a .caffemodel (binary NetParameter with layer blobs), old formats upgraded as by
    :func:`read_net` (a V1 model's blobs then sit in ``layer`` like a current one's)."""
    return _upgraded(read_binary(path, caffe_pb2.NetParameter), path)


def _upgraded(net: caffe_pb2.NetParameter, path: PathLike) -> caffe_pb2.NetParameter:
    from . import upgrade          # upgrade.py builds on this module
    net, done = upgrade.upgrade_net(net, str(path), keep_fork_forms=True)
    upgrade.log_upgrades(str(path), done)
    return net


def write_caffemodel(net: caffe_pb2.NetParameter, path: PathLike) -> None:
    write_binary(net, path)


def read_solverstate(path: PathLike) -> caffe_pb2.SolverState:
    return read_binary(path, caffe_pb2.SolverState)


def write_solverstate(state: caffe_pb2.SolverState, path: PathLike) -> None:
    write_binary(state, path)


# ---------------------------------------------------------------------------------------------
# blobs

_LEGACY_DIMS = ("num", "channels", "height", "width")


def blob_shape(blob: caffe_pb2.BlobProto) -> tuple:
    """Shape of a BlobProto: the legacy 4-D num/channels/height/width when any is set, else shape."""
    if any(blob.HasField(f) for f in _LEGACY_DIMS):
        return tuple(getattr(blob, f) for f in _LEGACY_DIMS)
    return tuple(blob.shape.dim)


def blob_to_array(blob: caffe_pb2.BlobProto, diff: bool = False) -> np.ndarray:
    """BlobProto -> numpy array (float64 when double_data/double_diff is used, else float32)."""
    import numpy as np                       # here: the command line's --help imports io, not numpy
    shape = blob_shape(blob)
    doubles = blob.double_diff if diff else blob.double_data
    values = np.asarray(doubles, dtype=np.float64) if len(doubles) else \
        np.asarray(blob.diff if diff else blob.data, dtype=np.float32)
    expected = int(np.prod(shape)) if shape else 1
    if values.size != expected:
        raise CaffeFormatError(f"blob of shape {shape} holds {values.size} values, expected {expected}")
    return values.reshape(shape)


def array_to_blob(array, diff=None) -> caffe_pb2.BlobProto:
    """numpy array (or torch tensor) -> BlobProto with ``shape`` and packed float32 ``data``."""
    import numpy as np
    array = np.asarray(_to_numpy(array), dtype=np.float32)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(array.shape)
    blob.data.extend(array.ravel().tolist())
    if diff is not None:
        blob.diff.extend(np.asarray(_to_numpy(diff), dtype=np.float32).ravel().tolist())
    return blob


def _to_numpy(value):
    detach = getattr(value, "detach", None)
    return detach().cpu().numpy() if detach is not None else value


# ---------------------------------------------------------------------------------------------
# upgrades Caffe applies when it loads a net

def upgrade_net(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """Return a copy with all of Caffe's load-time upgrades applied (deeper_ssd/upgrade.py),
    those the readers leave as written included: net-level ``input``/``input_shape``/``input_dim``
    become one ``Input`` layer named ``input`` placed first (as Caffe's UpgradeNetInput does) and
    a BatchNorm's three ``param`` specs go. Current nets come back equal."""
    from . import upgrade
    return upgrade.upgrade_net(net, f"net {net.name!r}")[0]
