"""deeper-ssd test (tools/test.py), the size buckets, the figures and plot-training-log."""
import json

import pytest
import torch

from deeper_ssd import cli
from deeper_ssd.eval import sizes
from deeper_ssd.eval.plots import parse_training_log
from deeper_ssd.layers import registry
from deeper_ssd.proto import caffe_pb2
from deeper_ssd.solver import Solver
from support.tiny_ssd import make_tiny, solver_param


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny SSD after 4 updates, tested by the trainer at the end (no display forward, so
    the in-memory net equals the snapshot)."""
    folder = tmp_path_factory.mktemp("tool")
    paths = make_tiny(folder)
    param = solver_param(paths, max_iter=4, test_interval=4, display=0, base_lr=0.02)
    log = []
    solver = Solver(param, log=log.append)
    solver.solve()
    solver.close()
    (folder / "train.log").write_text("".join(f"I1122 01:02:03.000004 42 deeper-ssd] {line}\n" for line in log))
    return paths, solver.last_test[0]["detection_eval"], f"{paths['prefix']}_iter_4.caffemodel", folder


def test_test_tool_reports_the_trainers_map_sizes_speed_and_writes_json_and_pr(trained, tmp_path, capsys):
    paths, trainer_map, weights, _ = trained
    assert cli.main(["test", "--model", str(paths["test"]), "--weights", weights, "--out", str(tmp_path),
                     "--name", "tiny"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["iterations"] == 2 and report["images"] == 8 and report["batch"] == 4   # 8 records
    assert report["mAP"] == pytest.approx(trainer_map, abs=1e-6)      # the solver's detection_eval
    assert set(report["mAP_by_version"]) == {"11point", "MaxIntegral", "Integral"}
    assert report["per_class"]["1"]["name"] == "drone"
    listed = (paths["data"] / "test.txt").read_text().split()[1::2]
    test_objects = sum((paths["data"] / xml).read_text().count("<object>") for xml in listed)
    assert report["per_class"]["1"]["objects"] == test_objects          # every test image once
    assert sum(b["objects"] for b in report["size_buckets"].values()) == test_objects
    assert list(report["size_buckets"]) == ["S", "M", "L", "XL"]
    speed = report["speed"]
    assert speed["images_per_s"] > 0 and speed["batch"] == 4 and speed["device"].startswith("cpu")
    assert speed["timed_images"] == 4                                  # first batch is warm-up
    curve = report["pr_curves"]["1"]
    assert len(curve["recall"]) == len(curve["precision"]) and curve["recall"] == sorted(curve["recall"])
    assert (tmp_path / "pr_curve.png").stat().st_size > 1000
    assert f"11point mAP {report['mAP']:.4f}" in out and "detection speed" in out


def test_compare_draws_several_models_on_one_plot(trained, tmp_path, capsys):
    paths, _, weights, _ = trained
    first = tmp_path / "a"
    assert cli.main(["test", "--model", str(paths["test"]), "--weights", weights, "--out", str(first),
                     "--ap-version", "MaxIntegral"]) == 0
    report = json.loads((first / "results.json").read_text())
    assert report["ap_version"] == "MaxIntegral" and report["mAP"] == report["mAP_by_version"]["MaxIntegral"]
    second = tmp_path / "b"
    assert cli.main(["test", "--model", str(paths["test"]), "--weights", weights, "--out", str(second),
                     "--iterations", "1", "--compare", str(first / "results.json")]) == 0
    assert json.loads((second / "results.json").read_text())["images"] == 4
    assert (second / "pr_curve.png").stat().st_size > 1000
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert cli.main(["test", "--model", str(paths["test"]), "--weights", weights, "--out", str(second),
                     "--iterations", "1", "--compare", str(bad)]) == 0       # no curves: only ours
    capsys.readouterr()
    no_eval = tmp_path / "no_eval.prototxt"
    no_eval.write_text(paths["test"].read_text().split('layer { name: "detection_eval"')[0])
    assert cli.main(["test", "--model", str(no_eval), "--weights", weights, "--out", str(second),
                     "--iterations", "1"]) == 2
    assert "has no DetectionEvaluate layer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# size buckets on a hand-made case

def _evaluate_layer(evaluate_difficult=False):
    lp = caffe_pb2.LayerParameter(name="detection_eval", type="DetectionEvaluate",
                                  bottom=["detection_out", "label"], top=["detection_eval"])
    p = lp.detection_evaluate_param
    p.num_classes, p.background_label_id, p.overlap_threshold = 2, 0, 0.5
    p.evaluate_difficult_gt = evaluate_difficult
    return registry.get("DetectionEvaluate")(lp, [(1, 1, -1, 7), (1, 1, -1, 8)], caffe_pb2.TEST)


def test_bucket_thresholds_are_table_2():
    assert sizes.BUCKETS == ("S", "M", "L", "XL")
    assert [sizes.bucket_of(r) for r in (0.0012, 0.00121, 0.01, 0.0101, 0.1, 0.11)] == \
        ["S", "M", "M", "L", "L", "XL"]


def test_objects_outside_a_bucket_are_ignored_like_difficult_ones():
    small = [0.10, 0.10, 0.13, 0.13]            # 0.09 % of the image: S
    large = [0.40, 0.40, 0.70, 0.70]            # 9 %: L
    label = torch.tensor([[0, 1, 0, *small, 0], [0, 1, 1, *large, 0]], dtype=torch.float32).view(1, 1, -1, 8)
    assert sizes.bucket_label_blob(label, "S")[0, 0, :, 7].tolist() == [0.0, 1.0]
    dets = torch.tensor([[0, 1, 0.9, *small], [0, 1, 0.8, 0.8, 0.1, 0.85, 0.15],
                         [0, 1, 0.7, *large], [0, 1, 0.6, 0.1, 0.5, 0.6, 0.95]]).view(1, 1, -1, 7)
    buckets = sizes.SizeBuckets(_evaluate_layer())
    buckets.add(dets, label)
    result = {r.bucket: r for r in buckets.results("11point")}
    assert result["S"].num_pos == {1: 1} and result["S"].mean_ap == pytest.approx(1.0)   # TP first
    assert result["L"].num_pos == {1: 1} and result["L"].mean_ap == pytest.approx(0.5)   # FP 0.8, TP 0.7
    assert result["M"].mean_ap is None and result["XL"].num_pos == {}
    assert result["S"].as_dict()["bounds"] == "<= 0.12 %"
    keep = sizes.SizeBuckets(_evaluate_layer(evaluate_difficult=True))
    hard = label.clone()
    hard[0, 0, 0, 7] = 1                                          # the small one is difficult
    keep.add(dets, hard)
    assert {r.bucket: r for r in keep.results()}["S"].num_pos == {1: 1}


# ---------------------------------------------------------------------------------------------
# training curves

def test_plot_training_log_reads_our_log_and_caffes(trained, tmp_path, capsys):
    _, trainer_map, _, folder = trained
    log = parse_training_log(folder / "train.log")
    assert log.tests["0:detection_eval"] == [(4, pytest.approx(trainer_map, abs=1e-5))]
    assert log.lr == [] and log.loss == []                                   # display 0
    caffe = tmp_path / "caffe.log"
    caffe.write_text(
        "I0101 10:00:00.0 1 solver.cpp:228] Iteration 0 (0 iter/s, 1.2s/10 iters), loss = 22.5\n"
        "I0101 10:00:00.0 1 sgd_solver.cpp:106] Iteration 0, lr = 0.001\n"
        "I0101 10:00:01.0 1 solver.cpp:228] Iteration 10 (1 iter/s, 1.0s/10 iters), loss = 9.25\n"
        "I0101 10:00:02.0 1 solver.cpp:433] Iteration 10, Testing net (#0)\n"
        "I0101 10:00:03.0 1 solver.cpp:546]     Test net output #0: detection_eval = 0.125\n")
    parsed = parse_training_log(caffe)
    assert parsed.loss == [(0, 22.5), (10, 9.25)] and parsed.tests == {"0:detection_eval": [(10, 0.125)]}
    assert cli.main(["plot-training-log", str(caffe), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    (tmp_path / "empty.log").write_text("nothing\n")
    assert cli.main(["plot-training-log", str(tmp_path / "empty.log")]) == 2
