"""deeper_ssd.io: prototxt parsing/writing with located errors, caffemodel and blob round trips."""
import os
import subprocess
import sys

import numpy as np
import pytest

from deeper_ssd import io
from deeper_ssd.proto import caffe_pb2


def _reference_files(reference_dir):
    files = sorted(reference_dir.glob("*/*.prototxt"))
    assert len(files) >= 8
    return files


def test_every_reference_prototxt_round_trips(reference_dir):
    for path in _reference_files(reference_dir):
        kind = caffe_pb2.SolverParameter if path.name == "solver.prototxt" else caffe_pb2.NetParameter
        message = io.read_text(path, kind)
        assert message.ByteSize() > 0, path
        again = io.parse_text(io.message_to_text(message), kind())
        assert again == message, path


def test_reference_deploy_has_legacy_input_upgraded_like_caffe(reference_dir):
    net = io.read_net(reference_dir / "ssd300_official" / "deploy.prototxt")
    assert list(net.input) == ["data"]
    upgraded = io.upgrade_net(net)
    first = upgraded.layer[0]
    assert (first.name, first.type, list(first.top)) == ("input", "Input", ["data"])
    assert list(first.input_param.shape[0].dim) == [1, 3, 300, 300]
    assert not len(upgraded.input) and len(upgraded.layer) == len(net.layer) + 1


@pytest.mark.parametrize("text,line,column,token,reason", [
    ('layer {\n  name: "a"\n  nmae: "b"\n}\n', 3, 3, "nmae", 'has no field named "nmae"'),
    ('layer {\n  pooling_param { pool: MAXX }\n}\n', 2, 25, "MAXX", "has no value named MAXX"),
    ('layer {\n  name: "a"\n', 2, 12, "", 'Expected "}" before the end of the file'),
    ('layer {\n  name: "a"\n}\n}\n', 4, 1, "}", "Expected identifier or number"),
    ('layer { convolution_param { num_output: -3 } }', 1, 41, "-3", "out of range"),
])
def test_parse_errors_name_line_column_and_token(text, line, column, token, reason):
    with pytest.raises(io.PrototxtError) as info:
        io.parse_text(text, caffe_pb2.NetParameter(), "net.prototxt")
    err = info.value
    assert (err.line, err.column) == (line, column)
    assert err.token == token
    assert reason in str(err)
    assert str(err).startswith(f"net.prototxt:{line}:{column}: ")


def test_text_file_given_as_binary_is_a_clear_error(tmp_path):
    path = tmp_path / "w.caffemodel"
    path.write_text('name: "not binary"\nlayer { name: "x" }\n')
    with pytest.raises(io.CaffeFormatError, match="not a binary NetParameter"):
        io.read_caffemodel(path)


def _model_with_blobs():
    net = caffe_pb2.NetParameter(name="m")
    conv = net.layer.add(name="conv", type="Convolution")
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    conv.blobs.append(io.array_to_blob(weights))
    conv.blobs.append(io.array_to_blob(np.arange(4, dtype=np.float32)))
    norm = net.layer.add(name="norm", type="Normalize")
    norm.blobs.append(io.array_to_blob(np.array(20.0, dtype=np.float32)))   # 0-axis scalar
    return net, weights


def test_caffemodel_round_trip_keeps_blob_shapes(tmp_path):
    net, weights = _model_with_blobs()
    path = tmp_path / "m.caffemodel"
    io.write_caffemodel(net, path)
    back = io.read_caffemodel(path)
    assert back == net
    assert io.blob_shape(back.layer[0].blobs[0]) == (4, 3, 3, 3)
    np.testing.assert_array_equal(io.blob_to_array(back.layer[0].blobs[0]), weights)
    assert io.blob_shape(back.layer[1].blobs[0]) == ()
    assert io.blob_to_array(back.layer[1].blobs[0]).shape == ()
    # Caffe writes value arrays packed: one length-delimited field, not one tag per float
    data_field_tag = (5 << 3) | 2
    assert bytes([data_field_tag]) in back.layer[0].blobs[0].SerializeToString()


def test_legacy_blob_dims_win_and_double_data_is_preferred():
    blob = caffe_pb2.BlobProto(num=2, channels=1, height=1, width=3)
    blob.shape.dim.extend([99])                       # ignored: legacy fields present
    blob.data.extend([0.0] * 6)
    blob.double_data.extend(np.arange(6, dtype=np.float64).tolist())
    array = io.blob_to_array(blob)
    assert array.shape == (2, 1, 1, 3) and array.dtype == np.float64
    np.testing.assert_array_equal(array.ravel(), np.arange(6))
    bad = caffe_pb2.BlobProto()
    bad.shape.dim.extend([2, 2])
    bad.data.extend([1.0, 2.0, 3.0])
    with pytest.raises(io.CaffeFormatError, match="holds 3 values, expected 4"):
        io.blob_to_array(bad)


def test_atomic_write_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "w.caffemodel"
    net, _ = _model_with_blobs()
    io.write_caffemodel(net, path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        io.write_caffemodel(caffe_pb2.NetParameter(name="other"), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.caffemodel"]


def test_labelmap_round_trip_and_duplicates(tmp_path):
    labelmap = caffe_pb2.LabelMap()
    for i, name in enumerate(["background", "drone"]):
        labelmap.item.add(name=name, label=i, display_name=name)
    path = tmp_path / "labelmap.prototxt"
    io.write_labelmap(labelmap, path)
    assert io.read_labelmap(path) == labelmap
    path.write_text('item { name: "a" label: 0 }\nitem { name: "b" label: 0 }\n')
    with pytest.raises(io.CaffeFormatError, match="duplicate label 0"):
        io.read_labelmap(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(io.CaffeFormatError, match="cannot read"):
        io.read_net(tmp_path / "nope.prototxt")


def test_cli_reports_malformed_prototxt_with_exit_2(tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text('name: "x"\nlayer {\n  name: "c"\n  type: "Convolution"\n  convolution_param { num_outputt: 3 }\n}\n')
    proc = subprocess.run([sys.executable, "-m", "deeper_ssd.cli", "sizes", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"{bad}:5:23:" in lines[0] and "num_outputt" in lines[0]


def test_caffe_reads_our_caffemodel_and_we_read_caffes(oracle, tmp_path):
    net_text = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 1 }
                      bias_filler { type: "gaussian" std: 1 } } }
layer { name: "norm" type: "Normalize" bottom: "conv" top: "norm"
  norm_param { across_spatial: false channel_shared: false scale_filler { type: "constant" value: 7 } } }
"""
    ours, weights = _model_with_blobs()
    del ours.layer[1].blobs[:]
    ours.layer[1].blobs.append(io.array_to_blob(np.arange(1, 5, dtype=np.float32)))
    io.write_caffemodel(ours, tmp_path / "ours.caffemodel")
    out = oracle.run("""
net = caffe.Net("net.prototxt", "ours.caffemodel", caffe.TEST)
out["w"] = net.params["conv"][0].data
out["s"] = net.params["norm"][0].data
fresh = caffe.Net("net.prototxt", caffe.TEST)
fresh.save("caffe.caffemodel")
out["caffe_file"] = np.frombuffer(open("caffe.caffemodel", "rb").read(), dtype=np.uint8)
out["caffe_w"] = fresh.params["conv"][0].data
""", {"net.prototxt": net_text, "ours.caffemodel": tmp_path / "ours.caffemodel"})
    np.testing.assert_array_equal(out["w"], weights)
    np.testing.assert_array_equal(out["s"], [1, 2, 3, 4])
    path = tmp_path / "caffe.caffemodel"
    path.write_bytes(out["caffe_file"].tobytes())
    theirs = io.read_caffemodel(path)
    conv = next(layer for layer in theirs.layer if layer.name == "conv")
    np.testing.assert_array_equal(io.blob_to_array(conv.blobs[0]), out["caffe_w"])
    assert io.parse_text(io.message_to_text(theirs), caffe_pb2.NetParameter()) == theirs
