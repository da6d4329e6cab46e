"""deeper-ssd time: Caffe's `caffe time` table — structure, counts and sane values (no timing
asserts)."""
import csv
import io as _io
import json
import math

import pytest

from deeper_ssd import io
from deeper_ssd.cli import main
from deeper_ssd.net import Net
from deeper_ssd.proto import caffe_pb2
from deeper_ssd.timing import format_timing, synthetic_inputs, time_net
from support.tiny_ssd import tiny_net

_DEPLOY = '''
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "best" type: "ArgMax" bottom: "conv" top: "best" argmax_param { axis: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 3 } }
'''


@pytest.fixture(scope="module")
def train_timing():
    text = tiny_net("TRAIN", "/nonexistent/lmdb", "/nonexistent/labelmap.prototxt")
    net = Net(io.parse_text(text, caffe_pb2.NetParameter()), "TRAIN", seed=0)
    return net, time_net(net, iterations=2)


def test_train_net_rows_name_every_layer_with_finite_times(train_timing):
    net, result = train_timing
    assert [r.name for r in result.layers] == [layer.name for layer in net.layers]
    assert [r.type for r in result.layers] == [layer.caffe_type for layer in net.layers]
    for r in result.layers:
        assert math.isfinite(r.forward_ms) and math.isfinite(r.backward_ms), r
        assert r.forward_ms >= 0 and r.backward_ms >= 0, r
    rows = {r.name: r for r in result.layers}
    assert rows["data"].note == "fed (synthetic input)" and rows["data"].forward_ms == 0
    assert rows["conv1_scale"].note == "fused into the layer before" and rows["conv1_scale"].forward_ms == 0
    assert rows["conv1"].forward_ms > 0 and rows["conv1"].backward_ms > 0 and rows["mbox_loss"].backward_ms > 0
    assert rows["conv2_mbox_priorbox"].backward_ms == 0                     # nothing to differentiate
    assert result.forward_ms > 0 and result.backward_ms > 0
    assert result.forward_backward_ms == pytest.approx(result.forward_ms + result.backward_ms)
    assert result.phase == "TRAIN" and result.iterations == 2 and result.device == "cpu"


def test_synthetic_labels_are_valid_boxes_for_every_image(train_timing):
    net, _ = train_timing
    inputs = synthetic_inputs(net, boxes_per_image=3)
    labels = inputs["label"].reshape(-1, 8)
    assert inputs["data"].shape == (4, 3, 64, 64) and labels.shape == (12, 8)
    assert labels[:, 0].tolist() == [i // 3 for i in range(12)]
    assert (labels[:, 1] >= 1).all() and (labels[:, 3] < labels[:, 5]).all() and (labels[:, 4] < labels[:, 6]).all()
    assert labels[:, 3:7].min() >= 0 and labels[:, 3:7].max() <= 1


def test_formats_carry_the_same_rows_and_totals(train_timing):
    net, result = train_timing
    table = format_timing(result, "md").splitlines()
    assert table[0] == ("TRAIN net on cpu, average of 2 iterations; inputs data 4x3x64x64, label 1x1x16x8; "
                        "backward from the loss")
    body = [line for line in table if line.startswith("| ")][1:]           # after the header row
    assert len(body) == len(net.layers) + 1 and body[-1].startswith("| **total** |")
    rows = list(csv.DictReader(_io.StringIO(format_timing(result, "csv"))))
    assert [r["layer"] for r in rows] == [layer.name for layer in net.layers] + ["total"]
    assert float(rows[-1]["forward_ms"]) == pytest.approx(result.forward_ms, abs=1e-4)
    data = json.loads(format_timing(result, "json"))
    assert len(data["layers"]) == len(net.layers) and data["total"]["backward_ms"] == result.backward_ms
    with pytest.raises(ValueError, match="unknown format"):
        format_timing(result, "xml")


def test_cli_time_deploy_with_input_override_and_force_backward(tmp_path, capsys):
    path = tmp_path / "deploy.prototxt"
    path.write_text("force_backward: true\n" + _DEPLOY)
    assert main(["time", str(path), "--phase", "TEST", "--iterations", "2", "--format", "json",
                 "--input", "2,3,12,12"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["phase"] == "TEST" and data["inputs"] == {"data": [2, 3, 12, 12]}
    assert data["backward_from"] == "every output (force_backward)"
    assert [r["name"] for r in data["layers"]] == ["data", "conv", "relu", "best", "fc"]
    rows = {r["name"]: r for r in data["layers"]}
    assert rows["best"]["backward_ms"] == 0 and rows["fc"]["backward_ms"] > 0 and data["total"]["backward_ms"] > 0


def test_a_net_without_loss_or_force_backward_has_no_backward_as_in_caffe(tmp_path, capsys):
    path = tmp_path / "deploy.prototxt"
    path.write_text(_DEPLOY)
    assert main(["time", str(path), "--iterations", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("TRAIN net on cpu, average of 1 iterations")           # Caffe's default phase
    assert "backward from nothing (no loss and no force_backward" in out
    layer_rows = out.strip().splitlines()[4:-1]
    assert len(layer_rows) == 5 and all(row.split("|")[4].strip() == "0.000" for row in layer_rows)


def test_cli_time_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    path = tmp_path / "deploy.prototxt"
    path.write_text(_DEPLOY)
    assert main(["time", str(path), "--iterations", "0"]) == 2
    assert "iterations must be at least 1" in capsys.readouterr().err
    assert main(["time", str(path), "--device", "tpu7"]) == 2
    assert "is not a torch device" in capsys.readouterr().err
    assert main(["time", str(tmp_path / "missing.prototxt")]) == 2
    assert "missing.prototxt: cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["time", str(path), "--input", "1,3,x"])
    assert exit_info.value.code == 2 and "not a shape like 1,3,300,300" in capsys.readouterr().err
