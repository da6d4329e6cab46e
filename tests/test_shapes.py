"""Static shape inference and the `deeper-ssd sizes` table."""
import json
import subprocess
import sys

import pytest

from deeper_ssd import io, shapes
from deeper_ssd.layers import LayerError, UnknownLayerType
from deeper_ssd.proto import caffe_pb2
from deeper_ssd.builder.netspec import L, NetSpec, P, TEST, TRAIN


def _sizes(*args):
    return subprocess.run([sys.executable, "-m", "deeper_ssd.cli", "sizes", *map(str, args)],
                          capture_output=True, text=True)


def test_ssd300_reference_sizes(reference_dir):
    proc = _sizes(reference_dir / "ssd300_official" / "deploy.prototxt", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    table = json.loads(proc.stdout)
    by_name = {row["name"]: row for row in table["layers"]}
    expected = {"conv4_3": [1, 512, 38, 38], "fc7": [1, 1024, 19, 19], "conv6_2": [1, 512, 10, 10],
                "conv7_2": [1, 256, 5, 5], "conv8_2": [1, 256, 3, 3], "conv9_2": [1, 256, 1, 1],
                "pool3": [1, 256, 38, 38], "mbox_priorbox": [1, 2, 34928]}
    for name, shape in expected.items():
        assert by_name[name]["shapes"] == [shape], name
    assert 34928 // 4 == 8732
    assert by_name["fc6"]["geometry"] == "3x3/1/6/d6"
    assert table["total"]["params"] == 26285486      # SSD300 VOC: 26.3 M


def test_ssd512_reference_prior_count(reference_dir):
    rows = shapes.infer_shapes(io.read_net(reference_dir / "ssd512_reconstructed" / "deploy.prototxt"))
    priors = next(r for r in rows if r.name == "mbox_priorbox").shapes[0]
    assert priors == (1, 2, 24564 * 4)


def test_table_formats_and_input_override(reference_dir):
    deploy = reference_dir / "ssd300_official" / "deploy.prototxt"
    md = _sizes(deploy).stdout
    assert md.splitlines()[0].startswith("| layer") and "| total" in md and "M learnable parameters" in md
    csv_text = _sizes(deploy, "--format", "csv", "--input", "4,3,300,300").stdout
    conv1 = next(line for line in csv_text.splitlines() if line.startswith("conv1_1,"))
    assert conv1.split(",")[3] == "4x64x300x300"
    assert csv_text.splitlines()[-1].startswith("total,")


def _mismatched_net(kind):
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 32, 32]))
    n.a = L.Convolution(n.data, num_output=8, kernel_size=3, pad=1)
    n.b = L.Convolution(n.data, num_output=8, kernel_size=3, stride=2)
    if kind == "Concat":
        n.out = L.Concat(n.a, n.b)
    elif kind == "Eltwise":
        n.out = L.Eltwise(n.a, n.b, operation=P.Eltwise.SUM)
    else:
        n.out = L.Crop(n.b, n.a)
    return n.to_proto("bad")


@pytest.mark.parametrize("kind", ["Concat", "Eltwise", "Crop"])
def test_mismatched_bottoms_exit_2_with_layer_bottoms_and_shapes(kind, tmp_path):
    path = tmp_path / "bad.prototxt"
    io.write_net(_mismatched_net(kind), path)
    proc = _sizes(path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"layer 'out' ({kind})" in lines[0]
    assert "1x8x32x32" in lines[0] and "1x8x15x15" in lines[0]
    assert "'a'" in lines[0] and "'b'" in lines[0]


def test_phase_filtering_and_stage_rules():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.train_only = L.ReLU(n.data, include=dict(phase=TRAIN))
    n.test_only = L.Sigmoid(n.data, include=dict(phase=TEST))
    n.staged = L.TanH(n.data, include=dict(stage=["deploy"]))
    n.not_quick = L.Dropout(n.data, exclude=dict(stage=["quick"]))
    n.leveled = L.Softmax(n.data, include=dict(min_level=2))
    net = n.to_proto()
    names = lambda **kw: [s.layer.name for s in shapes.plan_net(net, device="meta", **kw).layers]
    assert names() == ["data", "test_only", "not_quick"]
    assert names(stages=["deploy", "quick"], level=3) == ["data", "test_only", "staged", "leveled"]
    assert [s.layer.name for s in shapes.plan_net(net, caffe_pb2.TRAIN, device="meta").layers] == \
        ["data", "train_only", "not_quick"]


def test_net_structure_errors():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=1)
    net = n.to_proto()
    net.layer[1].bottom[0] = "missing"
    with pytest.raises(LayerError, match="layer 'conv' \\(Convolution\\): unknown bottom blob 'missing'"):
        shapes.plan_net(net, device="meta")
    net.layer[1].bottom[0] = "data"
    net.layer[1].type = "Convolutionn"
    with pytest.raises(UnknownLayerType, match="unknown layer type 'Convolutionn'; supported types: .*Convolution"):
        shapes.plan_net(net, device="meta")


def test_top_produced_twice_is_refused():
    text = """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "a" type: "ReLU" bottom: "x" top: "y" }
layer { name: "b" type: "Sigmoid" bottom: "x" top: "y" }
"""
    net = io.parse_text(text, caffe_pb2.NetParameter())
    with pytest.raises(LayerError, match="top blob 'y' is produced by multiple sources"):
        shapes.plan_net(net, device="meta")


def test_outputs_are_unconsumed_blobs_after_in_place_chains():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=1)
    n.relu = L.ReLU(n.conv, in_place=True)
    n.pool = L.Pooling(n.relu, kernel_size=2, stride=2)
    n.side = L.Sigmoid(n.conv)
    plan = shapes.plan_net(n.to_proto(), device="meta")
    assert sorted(plan.outputs) == ["pool", "side"]
