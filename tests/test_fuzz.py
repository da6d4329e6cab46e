"""Fuzz: mutated prototxt, solver, label map, caffemodel, solverstate and LMDB records through the
readers and the ``sizes`` / ``data-info`` commands. Every outcome must be a result or a clean
error (UsageError, CaffeFormatError, LayerError: exit status 2 from the command line); any other
exception is a bug. Seeds are fixed, so a failure names the case that reproduces it."""
import random
import re
from pathlib import Path

import lmdb
import pytest

from deeper_ssd import cli, io
from deeper_ssd.data import annoset
from deeper_ssd.errors import LayerError, UsageError
from deeper_ssd.proto import caffe_pb2

CLEAN = (UsageError, io.CaffeFormatError, LayerError)

NET = """name: "fuzz"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2 weight_filler { type: "xavier" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { eps: 0.001 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "norm" type: "Normalize" bottom: "pool1" top: "norm"
  norm_param { across_spatial: false scale_filler { type: "constant" value: 20 } channel_shared: false } }
layer { name: "loc" type: "Convolution" bottom: "norm" top: "loc" convolution_param { num_output: 16 kernel_size: 3 pad: 1 } }
layer { name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" flatten_param { axis: 1 } }
layer { name: "conf" type: "Convolution" bottom: "norm" top: "conf" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf" top: "conf_flat" }
layer { name: "prior" type: "PriorBox" bottom: "norm" bottom: "data" top: "prior"
  prior_box_param { min_size: 8 max_size: 16 aspect_ratio: 2 flip: true clip: false
    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 4 offset: 0.5 } }
layer { name: "conf_reshape" type: "Reshape" bottom: "conf_flat" top: "conf_reshape"
  reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }
layer { name: "conf_softmax" type: "Softmax" bottom: "conf_reshape" top: "conf_softmax" softmax_param { axis: 2 } }
layer { name: "conf_out" type: "Flatten" bottom: "conf_softmax" top: "conf_out" }
layer { name: "concat" type: "Concat" bottom: "loc_flat" bottom: "loc_flat" top: "concat" concat_param { axis: 1 } }
layer { name: "elt" type: "Eltwise" bottom: "loc_flat" bottom: "loc_flat" top: "elt" eltwise_param { operation: SUM } }
layer { name: "detection_out" type: "DetectionOutput" bottom: "loc_flat" bottom: "conf_out" bottom: "prior"
  top: "detection_out" detection_output_param { num_classes: 2 share_location: true background_label_id: 0
    nms_param { nms_threshold: 0.45 top_k: 100 } code_type: CENTER_SIZE keep_top_k: 50 confidence_threshold: 0.01 } }
"""

SOLVER = """net: "train.prototxt"
test_iter: 2
test_interval: 100
base_lr: 0.001
lr_policy: "multistep"
stepvalue: 80
gamma: 0.1
momentum: 0.9
weight_decay: 0.0005
max_iter: 120
snapshot: 40
snapshot_prefix: "snap/fuzz"
solver_mode: CPU
type: "SGD"
"""

LABELMAP = """item { name: "none_of_the_above" label: 0 display_name: "background" }
item { name: "drone" label: 1 display_name: "drone" }
item { name: "bird" label: 2 display_name: "bird" }
"""

_TOKENS = ["{", "}", ":", '"', "layer", "layers", "-1", "0", "1e40", "nan", "-inf", "4294967296",
           "num_output", "kernel_size", "dim", "top", "bottom", "#", "\\", "\x00", "\xff", "\u00e9",
           "type: \"Convolution\"", "include { phase: TRAIN }", "shape { dim: 0 }", "axis: -9",
           "stride: 0", "pad: -3", "group: 3", "dilation: 0", "order: 7", "aspect_ratio: 0",
           "min_size: 0", "max_size: 2", "step: -1", "variance: 0", "eps: -1", "pool: STOCHASTIC"]


def mutate_text(text: str, rng: random.Random) -> bytes:
    """One to four edits: a token inserted, a span deleted or duplicated, a number replaced, the
    text truncated, or raw bytes flipped."""
    data = text
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        at = rng.randrange(len(data) + 1)
        if kind == 0:
            data = data[:at] + " " + rng.choice(_TOKENS) + " " + data[at:]
        elif kind == 1:
            data = data[:at] + data[at + rng.randint(1, 40):]
        elif kind == 2:
            span = data[at:at + rng.randint(1, 80)]
            data = data[:at] + span + data[at:]
        elif kind == 3:
            numbers = [i for i, c in enumerate(data) if c.isdigit()]
            if numbers:
                i = rng.choice(numbers)
                data = data[:i] + rng.choice(["0", "-1", "999999999", "1e-30", "3.5", "-7"]) + data[i + 1:]
        elif kind == 4:
            data = data[:at]
    raw = bytearray(data.encode("utf-8", errors="surrogatepass"))
    if rng.random() < 0.1 and raw:
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    return bytes(raw)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Byte flips, a truncation, a deleted or duplicated span."""
    raw = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(4)
        at = rng.randrange(len(raw) + 1)
        if kind == 0 and raw:
            raw[min(at, len(raw) - 1)] = rng.randrange(256)
        elif kind == 1:
            del raw[at:]
        elif kind == 2:
            del raw[at:at + rng.randint(1, 16)]
        else:
            raw[at:at] = raw[at:at + rng.randint(1, 16)]
    return bytes(raw)


def run_cli(argv, capsys):
    """``deeper-ssd ARGV``: a result (0) or a clean error (2, one stderr line)."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert "Traceback" not in err and len([l for l in err.splitlines() if "error:" in l]) == 1, err


def clean(fn, *args):
    """``fn(*args)``: a result or a clean error."""
    try:
        return fn(*args)
    except CLEAN:
        return None


class _Guard:
    """Fails the test naming the case when anything but a clean error escapes."""

    def __init__(self, seed, what):
        self.seed, self.what = seed, what

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None and not issubclass(kind, (AssertionError, KeyboardInterrupt)):
            pytest.fail(f"{self.what}, seed {self.seed}: {kind.__name__}: {value}")
        return False


def test_mutated_net_prototxt_through_the_reader_and_sizes(tmp_path, capsys):
    path = tmp_path / "net.prototxt"
    for seed in range(120):
        path.write_bytes(mutate_text(NET, random.Random(seed)))
        with _Guard(seed, "net prototxt"):
            clean(io.read_net, path)
            run_cli(["sizes", path], capsys)


_NUMBER = re.compile(r"(?<![\w.])-?\d+(\.\d+)?(?![\w.])")
_EDGES = ["0", "-1", "2", "3", "7", "1000", "0.5", "-0.5", "1e-9", "64", "33"]


def test_edge_numbers_through_net_construction_and_forward():
    """Numbers of the net replaced by edge values (0, negative, odd, huge): building the net
    and a forward pass on zeros give a result or a clean error (small shapes only)."""
    import math
    import torch
    from deeper_ssd import shapes
    from deeper_ssd.net import Net
    for seed in range(80):
        rng = random.Random(40_000 + seed)
        text = NET
        for _ in range(rng.randint(1, 3)):
            match = rng.choice(list(_NUMBER.finditer(text)))
            text = text[:match.start()] + rng.choice(_EDGES) + text[match.end():]
        with _Guard(seed, "net numbers"):
            try:
                net = io.parse_text(text, caffe_pb2.NetParameter())
                rows = shapes.infer_shapes(net, caffe_pb2.TEST)
                if max(math.prod(s) for r in rows for s in r.shapes if s) > 2e6:
                    continue
                built = Net(net, "TEST", seed=0)
                built(**{top: torch.zeros(built.blob_shapes[top]) for layer in built.layers
                         if layer.caffe_type == "Input" for top in layer.lp.top})
            except CLEAN:
                pass


def test_mutated_solver_and_label_map_through_their_readers(tmp_path):
    from deeper_ssd.solver import read_solver
    solver, labelmap = tmp_path / "solver.prototxt", tmp_path / "labelmap.prototxt"
    for seed in range(150):
        rng = random.Random(10_000 + seed)
        solver.write_bytes(mutate_text(SOLVER, rng))
        labelmap.write_bytes(mutate_text(LABELMAP, rng))
        with _Guard(seed, "solver / label map"):
            clean(read_solver, solver)
            clean(io.read_labelmap, labelmap)
            try:
                annoset.map_name_to_label(labelmap)
            except annoset.AnnosetError:
                pass


def _weights():
    from deeper_ssd.net import Net
    return Net(io.parse_text(NET, caffe_pb2.NetParameter()), seed=0).to_proto().SerializeToString()


def test_mutated_caffemodel_and_solverstate_through_their_readers(tmp_path):
    from deeper_ssd.net import Net
    model, state = tmp_path / "w.caffemodel", tmp_path / "s.solverstate"
    weights = _weights()
    solverstate = caffe_pb2.SolverState(iter=40, learned_net="w.caffemodel", current_step=1)
    solverstate.history.add().CopyFrom(io.array_to_blob([[1.0, 2.0], [3.0, 4.0]]))
    solverstate = solverstate.SerializeToString()
    net = Net(io.parse_text(NET, caffe_pb2.NetParameter()), seed=0)
    for seed in range(100):
        rng = random.Random(20_000 + seed)
        model.write_bytes(mutate_bytes(weights, rng))
        state.write_bytes(mutate_bytes(solverstate, rng))
        with _Guard(seed, "caffemodel / solverstate"):
            clean(net.load_caffemodel, model)
            read = clean(io.read_solverstate, state)
            if read is not None:
                for blob in read.history:
                    clean(io.blob_to_array, blob)


def test_mutated_lmdb_records_through_data_info(tmp_path, capsys):
    from deeper_ssd.data.sample import make_sample_set
    make_sample_set(tmp_path / "set", seed=0, train=2, test=1, width=48, height=32)
    source = tmp_path / "set" / "test_lmdb"
    env = lmdb.open(str(source), subdir=source.is_dir(), lock=False, readonly=True)
    with env.begin() as txn:
        record = next(iter(txn.cursor()))[1]
    env.close()
    for seed in range(40):
        rng = random.Random(30_000 + seed)
        db = tmp_path / f"fuzz_{seed}_lmdb"          # data-info keeps its environment open
        env = lmdb.open(str(db), map_size=1 << 24)
        with env.begin(write=True) as txn:
            for i in range(3):
                txn.put(f"{i:08d}_x".encode(), mutate_bytes(record, rng))
        env.close()
        with _Guard(seed, "LMDB record"):
            run_cli(["data-info", db, "--list"], capsys)
            run_cli(["data-info", db, "--dump", "0", "1", "2"], capsys)
            try:
                annoset.parse_record(mutate_bytes(record, rng), "fuzz")
            except annoset.AnnosetError:
                pass


def test_garbage_where_a_prototxt_or_a_database_is_expected(tmp_path, capsys):
    """Files of the wrong kind: binary for text, text for binary, an empty folder for an LMDB."""
    rng = random.Random(7)
    for seed in range(20):
        garbage = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        path = Path(tmp_path / f"g{seed}")
        path.write_bytes(garbage)
        with _Guard(seed, "garbage"):
            run_cli(["sizes", path], capsys)
            run_cli(["data-info", path], capsys)
            clean(io.read_caffemodel, path)
    (tmp_path / "empty_dir").mkdir()
    run_cli(["data-info", tmp_path / "empty_dir"], capsys)
