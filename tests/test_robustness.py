"""Bad input gets one clear line and exit status 2, never a traceback or a half-written result;
one test per failure class (readers, create-data, settings, generate, draw, detect, train)."""
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
