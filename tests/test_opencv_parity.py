"""Parity of the executor with OpenCV's Caffe importer on the reference SSD deploy nets."""
import numpy as np
import pytest

from support.opencv import compare_with_opencv


def test_ssd300_reference_deploy_matches_opencv(reference_dir):
    compared = compare_with_opencv(reference_dir / "ssd300_official" / "deploy.prototxt")
    assert compared >= 100          # every layer including priors and detection_out


def test_ssd512_reference_deploy_matches_opencv_outside_priors(reference_dir):
    # SSD512's prior sizes are not integers: OpenCV does not truncate them as Caffe does, so the
    # priors and detections are checked against Caffe itself in tests/test_priorbox.py
    compared = compare_with_opencv(reference_dir / "ssd512_reconstructed" / "deploy.prototxt")
    assert compared >= 90


def test_opencv_check_names_the_skipped_prior_layers_and_exits_zero(reference_dir, capsys):
    from deeper_ssd import cli
    assert cli.main(["opencv-check", str(reference_dir / "ssd512_reconstructed" / "deploy.prototxt")]) == 0
    out = capsys.readouterr().out
    assert "0 differ beyond rtol 0.0001" in out
    assert "not compared:" in out and "conv4_3_norm_mbox_priorbox" in out and "non-integer prior sizes" in out


def test_opencv_check_prints_every_layer_of_a_small_net(tmp_path, capsys):
    from deeper_ssd import cli
    net = tmp_path / "deploy.prototxt"
    net.write_text('name: "n" input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
                   'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
                   'convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 1 } } }\n'
                   'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n')
    assert cli.main(["opencv-check", str(net), "--all", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "2x4x6x6" in out and "\nrelu " in out and "2 layers compared, 0 differ" in out


def test_opencv_check_compares_a_batchnorm_net_whose_scale_runs_fused(tmp_path, capsys):
    from deeper_ssd import cli
    net = tmp_path / "deploy.prototxt"
    net.write_text('name: "n" input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
                   'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
                   'convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 1 } } }\n'
                   'layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }\n'
                   'layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true '
                   'filler { type: "uniform" min: 0.5 max: 2 } bias_filler { type: "gaussian" std: 1 } } }\n'
                   'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n')
    assert cli.main(["opencv-check", str(net), "--all"]) == 0
    out = capsys.readouterr().out
    assert "\nscale " in out and "\nrelu " in out and "3 layers compared, 0 differ" in out


def test_opencv_check_fails_and_names_a_differing_layer(monkeypatch, capsys):
    from deeper_ssd import cli, opencv_check
    rows = [opencv_check.LayerDifference("conv", "Convolution", (1, 4), 1e-7, 1.0),
            opencv_check.LayerDifference("detection_out", "DetectionOutput", (3, 7), float("inf"), 1.0,
                                         "3 detections, OpenCV 2")]
    monkeypatch.setattr(opencv_check, "compare", lambda *a, **k: opencv_check.Comparison(rows, []))
    assert cli.main(["opencv-check", "any.prototxt"]) == 1
    out = capsys.readouterr().out
    assert "detection_out" in out and "DIFFERS  3 detections, OpenCV 2" in out and "\nconv " not in out
    assert "1 differ beyond rtol" in out


def test_detections_are_compared_as_sets_except_each_class_lowest_score():
    from deeper_ssd.opencv_check import _detection_difference
    rows = np.array([[0, 1, 0.9, .1, .1, .2, .2], [0, 1, 0.8, .3, .3, .4, .4], [0, 1, 0.5, .5, .5, .6, .6],
                     [0, 2, 0.7, .1, .1, .3, .3]])
    assert _detection_difference("d", rows, rows[[1, 0, 3, 2]]).max_abs_diff == 0   # order is free
    other_tail = rows.copy()
    other_tail[2, 3:] = .7                 # class 1's lowest score went to another box: a cut-off tie
    diff = _detection_difference("d", rows, other_tail)
    assert diff.max_abs_diff == 0 and "1 vs OpenCV 1 lowest-score rows" in diff.note
    assert _detection_difference("d", rows, rows[[0, 1, 3]]).max_abs_diff == 0      # class 1 cut shorter
    moved = rows.copy()
    moved[0, 3] = .15                      # a box above its class's lowest score moved: reported
    assert _detection_difference("d", rows, moved).max_abs_diff == pytest.approx(.05)
    missing = _detection_difference("d", rows, rows[[0, 2, 3]])                     # 0.8 row missing
    assert missing.max_abs_diff == pytest.approx(.2) and "4 detections, OpenCV 3" in missing.note
    relabelled = rows.copy()
    relabelled[0, 1] = 2
    assert _detection_difference("d", rows, relabelled).max_abs_diff == pytest.approx(.2)
