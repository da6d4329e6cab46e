"""Bad input gets one clear line and exit status 2, never a traceback or a half-written result;
one test per failure class (readers, create-data, settings, generate, draw, detect, train)."""
import math
import os
import shutil
import stat
from pathlib import Path

import pytest

from deeper_ssd import cli, io
from deeper_ssd.proto import caffe_pb2

FIXTURES = Path(__file__).resolve().parent / "fixtures"

TINY_NET = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 2 kernel_size: 3 } }
"""


def run(capsys, *argv):
    """``deeper-ssd ARGV`` in this process: (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    """Exit status 2 and exactly one stderr line holding every needle (case-insensitive)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# readers

def test_binary_file_given_as_prototxt_says_it_looks_binary(tmp_path, capsys):
    weights = tmp_path / "w.caffemodel"
    net = io.parse_text(TINY_NET, caffe_pb2.NetParameter())
    net.layer[1].blobs.add().data.extend([0.5, -1.25, 3.0e-7])
    io.write_caffemodel(net, weights)
    code, out, err = run(capsys, "sizes", weights)
    one_line_error(code, err, str(weights), "looks binary", ".caffemodel")
    assert not out


def test_empty_prototxt_is_an_error_not_an_empty_table(tmp_path, capsys):
    empty = tmp_path / "empty.prototxt"
    empty.write_text("# nothing here\n")
    code, out, err = run(capsys, "sizes", empty)
    one_line_error(code, err, str(empty), "no layers")
    assert not out


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomically_written_files_keep_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        io.write_net(io.parse_text(TINY_NET, caffe_pb2.NetParameter()), tmp_path / "net.prototxt")
        io.atomic_write_bytes(tmp_path / "x.caffemodel", b"\0")
    finally:
        os.umask(previous)
    for name in ("net.prototxt", "x.caffemodel"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


# ---------------------------------------------------------------------------------------------
# create-data

@pytest.fixture
def voc_root(tmp_path):
    """A dataset root: the fixture photo + XML, a list of one entry and the VOC label map."""
    shutil.copy(FIXTURES / "voc_dining.jpg", tmp_path / "img.jpg")
    shutil.copy(FIXTURES / "voc_dining.xml", tmp_path / "img.xml")
    (tmp_path / "list.txt").write_text("img.jpg img.xml\n")
    shutil.copy(FIXTURES / "labelmap_voc.prototxt", tmp_path / "labelmap.prototxt")
    return tmp_path


def create_data(root, *extra):
    return ["create-data", root, root / "list.txt", root / "db", "--anno-type", "detection",
            "--label-map-file", root / "labelmap.prototxt", "--encoded", *extra]


def test_create_data_refuses_a_label_map_with_a_duplicate_label(voc_root, capsys):
    labelmap = voc_root / "labelmap.prototxt"
    labelmap.write_text(labelmap.read_text() + 'item { name: "drone" label: 3 display_name: "drone" }\n')
    code, out, err = run(capsys, *create_data(voc_root))
    one_line_error(code, err, "labelmap.prototxt", "duplicate label 3")
    assert not (voc_root / "db").exists()


def test_truncated_jpeg_in_a_list_names_the_entry(voc_root, capfd):
    data = (voc_root / "img.jpg").read_bytes()
    (voc_root / "bad.jpg").write_bytes(data[:len(data) * 2 // 3])
    (voc_root / "list.txt").write_text("img.jpg img.xml\nbad.jpg img.xml\n")
    code = cli.main([str(a) for a in create_data(voc_root)])
    out, err = capfd.readouterr()
    one_line_error(code, err, "bad.jpg", "truncated JPEG")
    assert not (voc_root / "db").exists()
    code = cli.main([str(a) for a in create_data(voc_root, "--skip-bad")])
    out, err = capfd.readouterr()
    assert code == 0 and "Premature end" not in err
    assert [line for line in err.splitlines() if "bad.jpg" in line and "truncated" in line]
    code = cli.main(["data-info", str(voc_root / "db")])
    assert "1 record" in capfd.readouterr().out


# ---------------------------------------------------------------------------------------------
# generate --set / --head-set, generate's names, draw, a solver without its net

@pytest.mark.parametrize("setting, expected", [
    ("input_size=abc", "expects an integer >= 1"),
    ("width=abc", "expects a number > 0"),
    ("aspect_ratios=3", "expects a tuple ((number, ...), ...) or None"),
    ("steps=abc", "expects a tuple (number, ...) or None"),
    ("batch_size=0", "expects an integer >= 1"),
    ("bn_moving_average_fraction=1", "< 1"),
])
def test_generate_checks_each_setting_against_its_type_and_range(tmp_path, capsys, setting, expected):
    code, out, err = run(capsys, "generate", "ssd300", "--set", setting, "--out", tmp_path / "p")
    line = one_line_error(code, err, setting.split("=")[0], expected)
    assert line.count("ssd300") == 1, line
    assert not (tmp_path / "p").exists()


def test_generate_checks_head_settings(tmp_path, capsys):
    code, out, err = run(capsys, "generate", "ssd300", "--head", "srtod", "--head-set", "ste_width=abc",
                         "--out", tmp_path / "p")
    one_line_error(code, err, "ste_width", "expects a number > 0")
    assert not (tmp_path / "p").exists()


def test_generate_checks_every_name_before_writing(tmp_path, capsys):
    code, out, err = run(capsys, "generate", "ssd300", "ssd301", "--out", tmp_path / "p")
    one_line_error(code, err, "ssd301")
    assert not (tmp_path / "p").exists()


def test_a_model_error_names_the_model_once(tmp_path, capsys):
    code, out, err = run(capsys, "generate", "ssd300", "--set", "steps=(8, 16)", "--out", tmp_path / "p")
    line = one_line_error(code, err, "2 steps for 6 prediction layers")
    assert line.count("ssd300") == 1, line


def test_draw_refuses_a_net_whose_shapes_fail(tmp_path, capsys):
    net = tmp_path / "bad.prototxt"
    net.write_text(TINY_NET.replace("kernel_size: 3", "kernel_size: 11"))
    code, out, err = run(capsys, "draw", net, tmp_path / "bad.png")
    one_line_error(code, err, "bad.prototxt", "layer 'conv'", "too small")
    assert not (tmp_path / "bad.png").exists()


def test_a_solver_whose_net_is_missing_leaves_no_log(tmp_path, capsys):
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{tmp_path}/nothere.prototxt"\nbase_lr: 0.1\nmax_iter: 1\n'
                      f'snapshot_prefix: "{tmp_path}/run/snap"\nsolver_mode: CPU\n')
    code, out, err = run(capsys, "train", "--solver", solver)
    one_line_error(code, err, "nothere.prototxt")
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())
    assert not list(tmp_path.glob("**/*.log"))


# ---------------------------------------------------------------------------------------------
# detect: non-finite detections, weights that fit no layer, no output folder on failure

@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    """The tiny SSD as a deploy net (64x64 Input, BatchNorm) and its freshly filled weights
    (BatchNorm statistics all zero: the boxes come out infinite)."""
    from support.tiny_ssd import tiny_net
    from deeper_ssd.net import Net
    folder = tmp_path_factory.mktemp("deploy")
    net = io.parse_text(tiny_net("TEST", "unused", "unused", batch=1), caffe_pb2.NetParameter())
    layers = [lp for lp in net.layer if lp.type not in ("AnnotatedData", "DetectionEvaluate")]
    del net.layer[:]
    net.layer.add(name="data", type="Input", top=["data"]).input_param.shape.add().dim.extend([1, 3, 64, 64])
    net.layer.extend(layers)
    io.write_net(net, folder / "deploy.prototxt")
    Net.from_prototxt(folder / "deploy.prototxt").save_caffemodel(folder / "fresh.caffemodel")
    other = io.parse_text(TINY_NET, caffe_pb2.NetParameter())
    Net(other).save_caffemodel(folder / "other.caffemodel")
    return folder


def test_detect_drops_non_finite_detections_with_a_count(deploy, tmp_path, capsys):
    import json
    code, out, err = run(capsys, "detect", FIXTURES / "voc_dining.jpg", "--model", deploy / "deploy.prototxt",
                         "--weights", deploy / "fresh.caffemodel", "--out", tmp_path / "det",
                         "--threshold", "0")
    assert code == 0, err
    warning = [line for line in err.splitlines() if "non-finite" in line]
    assert len(warning) == 1 and "dropped" in warning[0] and int(warning[0].split()[1]) > 0, err
    [report] = json.loads((tmp_path / "det" / "detections.json").read_text())
    assert all(all(map(math.isfinite, (d["score"], d["xmin"], d["ymin"], d["xmax"], d["ymax"])))
               for d in report["detections"])


def test_detect_refuses_weights_that_match_no_layer(deploy, tmp_path, capsys):
    code, out, err = run(capsys, "detect", FIXTURES / "voc_dining.jpg", "--model", deploy / "deploy.prototxt",
                         "--weights", deploy / "other.caffemodel", "--out", tmp_path / "det")
    one_line_error(code, err, "other.caffemodel", "no layer of the file matches", "conv")
    assert not (tmp_path / "det").exists()


def test_detect_leaves_no_output_folder_when_writing_fails(deploy, tmp_path, monkeypatch):
    import numpy as np
    from deeper_ssd import detect

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(detect, "draw", broken)
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(OSError):
        detect.write_outputs([Path("a.jpg")], [image], [[]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Caffe's spellings, help without torch

REPO = FIXTURES.parent.parent


@pytest.mark.parametrize("argv, command, expected", [
    (["-solver", "s.prototxt", "-weights", "w.caffemodel", "-snapshot", "x.solverstate"], "train",
     ["--solver", "s.prototxt", "--weights", "w.caffemodel", "--snapshot", "x.solverstate"]),
    (["-solver=s.prototxt", "--weights=a,b", "-gpu", "0,1", "-sigint_effect", "snapshot"], "train",
     ["--solver=s.prototxt", "--weights=a,b", "--gpus", "0,1", "--sigint-effect", "snapshot"]),
    (["--solver", "s.prototxt", "-gpu=1"], "train", ["--solver", "s.prototxt", "--device", "cuda:1"]),
    (["-model", "t.prototxt", "-weights", "w", "-iterations", "5", "-gpu", "0,1"], "test",
     ["--model", "t.prototxt", "--weights", "w", "--iterations", "5", "--device", "cuda:0"]),
    (["-h"], "test", ["-h"]),
])
def test_gflags_spellings_become_ours(argv, command, expected):
    from deeper_ssd.caffe_flags import translate
    assert translate(argv, command) == expected


def test_gpu_all_means_every_visible_gpu(monkeypatch):
    import torch
    from deeper_ssd.caffe_flags import translate
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert translate(["-solver", "s", "-gpu", "all"], "train") == ["--solver", "s", "--gpus", "0,1,2"]
    assert translate(["-gpu=all"], "test") == ["--device", "cuda:0"]


@pytest.mark.parametrize("tool, argv, needle", [
    ("train.py", ["-solver", "nothere_solver.prototxt"], "nothere_solver.prototxt"),
    ("test.py", ["-model", "nothere_test.prototxt", "-weights=w.caffemodel", "-iterations", "2"],
     "nothere_test.prototxt"),
])
def test_tools_accept_caffe_spellings(tmp_path, tool, argv, needle):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, str(REPO / "tools" / tool), *argv], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    one_line_error(result.returncode, result.stderr, needle, "cannot read")


def test_help_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, contextlib, io\n"
            "from deeper_ssd import cli\n"
            "for argv in [[]] + [[name] for name in cli._COMMANDS]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            cli.main(argv + ['--help'])\n"
            "        except SystemExit as stop:\n"
            "            assert stop.code == 0, argv\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:3])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_test_refuses_weights_that_match_no_layer(deploy, tmp_path, capsys):
    from support.tiny_ssd import tiny_net
    net = tmp_path / "test.prototxt"
    net.write_text(tiny_net("TEST", str(tmp_path / "no_lmdb"), str(tmp_path / "no_labelmap"), batch=1))
    code, out, err = run(capsys, "test", "--model", net, "--weights", deploy / "other.caffemodel",
                         "--out", tmp_path / "results")
    one_line_error(code, err, "other.caffemodel", "no layer of the file matches", "conv1")
    assert not (tmp_path / "results").exists()


def test_a_cuda_device_this_machine_lacks_is_one_line(deploy, tmp_path, capsys):
    code, out, err = run(capsys, "detect", FIXTURES / "voc_dining.jpg", "--model", deploy / "deploy.prototxt",
                         "--weights", deploy / "fresh.caffemodel", "--out", tmp_path / "det",
                         "--device", "cuda:99")
    one_line_error(code, err, "cuda:99")
    code, out, err = run(capsys, "detect", FIXTURES / "voc_dining.jpg", "--model", deploy / "deploy.prototxt",
                         "--weights", deploy / "fresh.caffemodel", "--device", "gpu0")
    one_line_error(code, err, "gpu0", "cpu, cuda or cuda:N")
    assert not (tmp_path / "det").exists()


# ---------------------------------------------------------------------------------------------
# what the fuzz test (tests/test_fuzz.py) found

@pytest.mark.parametrize("edit, needles", [
    (("dim: 3 dim: 8", "dim: -1 dim: 8"), ["layer 'data'", "must be positive"]),
    (("dim: 3 dim: 8", "dim: 0 dim: 8"), ["layer 'data'", "must be positive"]),
    (("kernel_size: 3", 'kernel_size: 3 weight_filler { type: "nonsense" }'), ["layer 'conv'", "nonsense"]),
])
def test_nets_that_cannot_be_built_are_one_line(tmp_path, capsys, edit, needles):
    from deeper_ssd.net import Net
    from deeper_ssd.errors import LayerError
    net = tmp_path / "net.prototxt"
    net.write_text(TINY_NET.replace(*edit))
    with pytest.raises(LayerError) as err:
        Net.from_prototxt(net)
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize("layer, needle", [
    ('layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { eps: -1 } }',
     "eps must be >= 0"),
    ('layer { name: "prior" type: "PriorBox" bottom: "conv" bottom: "data" top: "prior" '
     'prior_box_param { min_size: 4 aspect_ratio: 0 } }', "aspect_ratio must be positive"),
])
def test_layer_settings_that_cannot_work_are_one_line(tmp_path, capsys, layer, needle):
    net = tmp_path / "net.prototxt"
    net.write_text(TINY_NET + layer + "\n")
    code, out, err = run(capsys, "sizes", net)
    one_line_error(code, err, needle)


def test_a_caffemodel_with_a_damaged_name_is_one_line(tmp_path, capsys):
    net = io.parse_text(TINY_NET, caffe_pb2.NetParameter())
    data = net.SerializeToString().replace(b"conv", b"c\xffnv")
    (tmp_path / "bad.caffemodel").write_bytes(data)
    with pytest.raises(io.CaffeFormatError, match=r"layer\[1\]\.name is not UTF-8"):
        io.read_caffemodel(tmp_path / "bad.caffemodel")


def test_a_sample_set_without_drones_reports_zero_shares():
    from deeper_ssd.data.sample import SampleReport
    report = SampleReport("out", 1, 1, {"S": 0, "M": 0, "L": 0, "XL": 0}, 0.1)
    assert report.shares() == {"S": 0.0, "M": 0.0, "L": 0.0, "XL": 0.0} and "0 drones" in report.summary()


@pytest.mark.parametrize("field, value", [("momentum2", 2.0), ("momentum", 1.0)])
def test_adam_refuses_moments_outside_0_1(field, value):
    from deeper_ssd.solver import SolverTypeError, make_rule
    param = caffe_pb2.SolverParameter(type="Adam", base_lr=0.001, momentum=0.9)
    setattr(param, field, value)
    with pytest.raises(SolverTypeError, match=f"Adam needs 0 <= {field} < 1"):
        make_rule(param, [])


def test_train_takes_a_sigterm_effect():
    parser = cli.build_parser()
    assert parser.parse_args(["train", "--solver", "s"]).sigterm_effect == "stop"
    assert parser.parse_args(["train", "--solver", "s", "--sigterm-effect", "none"]).sigterm_effect == "none"
