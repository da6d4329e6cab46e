"""deeper_ssd.pipelines as a library: train and test called from Python (no argument parsing),
bad input raised as UsageError; the declared data-layer interface and the loss-weight rule."""
import json

import pytest

from deeper_ssd import pipelines
from deeper_ssd.layers import LayerError
from deeper_ssd.layers.data import AnnotatedData, DataLayer, Input
from deeper_ssd.net import Net
from deeper_ssd.proto import caffe_pb2
from support.tiny_ssd import make_tiny, solver_param


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("pipelines"))


def test_train_then_test_from_python(tiny, tmp_path):
    from deeper_ssd import io
    io.write_solver(solver_param(tiny, snapshot_prefix=str(tmp_path / "lib"), max_iter=2, test_interval=2,
                                 display=1), tmp_path / "solver.prototxt")
    solver = pipelines.train(tmp_path / "solver.prototxt", progress=False, seed=3)
    assert solver.iter == 2 and solver.seed == 3
    log = (tmp_path / "lib.log").read_text()              # default log: <snapshot_prefix>.log
    assert "Training seed 3" in log and "Iteration 2, Testing net (#0)" in log
    lines, notes = [], []
    report = pipelines.test(tiny["test"], tmp_path / "lib_iter_2.caffemodel", out=tmp_path / "t",
                            echo=lines.append, note=notes.append)
    assert report == json.loads((tmp_path / "t" / "results.json").read_text())
    assert report["mAP"] == pytest.approx(solver.last_test[0]["detection_eval"], abs=1e-6)
    assert lines[0].startswith(f"lib_iter_2: {report['images']} images") and lines[-1].startswith("wrote ")
    assert pipelines.format_test_report(report).splitlines() == lines[:-1]
    assert notes == []                                     # 8 test records in batches of 4


def test_bad_input_raises_usage_error_instead_of_printing(tiny, tmp_path, capsys):
    with pytest.raises(pipelines.UsageError, match="not both"):
        pipelines.train(tiny["solver"], weights=["a.caffemodel"], snapshot="b.solverstate")
    no_eval = tmp_path / "no_eval.prototxt"
    no_eval.write_text(tiny["test"].read_text().split('layer { name: "detection_eval"')[0])
    with pytest.raises(pipelines.UsageError, match="has no DetectionEvaluate layer"):
        pipelines.test(no_eval, _weights(tiny, tmp_path), out=tmp_path, iterations=1)
    assert capsys.readouterr() == ("", "")
    from deeper_ssd import cli
    assert cli.UsageError is pipelines.UsageError          # the CLI's name for it still imports


def _weights(tiny, tmp_path):
    path = tmp_path / "init.caffemodel"
    Net.from_prototxt(tiny["test"], "TEST", seed=1).save_caffemodel(path)
    return path


def test_data_layers_are_declared_not_guessed(tiny):
    net = Net.from_prototxt(tiny["train"], "TRAIN")
    assert [layer.name for layer in net.data_layers] == ["data"]
    assert isinstance(net.data_layers[0], AnnotatedData) and isinstance(net.data_layers[0], DataLayer)
    assert net.data_layers[0].timing.batches == 0
    assert not issubclass(Input, DataLayer)                # fed by the caller, as in Caffe


def _loss_net(loss_weight=()):
    lp = caffe_pb2.NetParameter(name="w")
    lp.layer.add(name="x", type="Input", top=["x", "y"]).input_param.shape.add(dim=[2, 3])
    loss = lp.layer.add(name="loss", type="MSELoss", bottom=["x", "y"], top=["loss"])
    loss.loss_weight.extend(loss_weight)
    return lp


def test_loss_weights_are_caffes_rule_in_one_place():
    assert Net(_loss_net()).loss_weights == {"loss": 1.0}  # top 0 of a loss layer
    assert Net(_loss_net([0.25])).loss_weights == {"loss": 0.25}
    assert Net(_loss_net([0.0])).loss_weights == {}
    with pytest.raises(LayerError, match="loss_weight needs 0 or 1 entries"):
        Net(_loss_net([1.0, 2.0]))
