"""The training loop: Caffe's log, exact resume, atomic snapshots, signals, the NaN guard.

Every run trains tests/support/tiny_ssd.py's 64x64 SSD for a few iterations on CPU.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deeper_ssd import io
from deeper_ssd.net import Net
from deeper_ssd.solver import NonFiniteError, SignalActions, Solver, TrainState
from support.tiny_ssd import make_tiny, solver_param

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def run(paths, prefix, resume=None, signals=None, progress=None, log=None, **fields):
    param = solver_param(paths, snapshot_prefix=str(prefix), **fields)
    lines = [] if log is None else log
    solver = Solver(param, log=lines.append, progress=progress)
    try:
        solver.solve(resume, signals=signals)
    finally:
        solver.close()
    return solver, lines


def blobs(path):
    return {layer.name: [io.blob_to_array(b) for b in layer.blobs]
            for layer in io.read_caffemodel(path).layer if len(layer.blobs)}


def assert_same_model(a, b):
    ma, mb = blobs(a), blobs(b)
    assert ma.keys() == mb.keys()
    for name in ma:
        for x, y in zip(ma[name], mb[name]):
            assert np.array_equal(x, y), f"{name} differs"


def test_caffe_log_lines_and_smoothed_loss(tiny, tmp_path):
    solver, log = run(tiny, tmp_path / "a", test_interval=3, max_iter=4)
    text = "\n".join(log)
    assert "Iteration 0, lr = 0.01" in text and "Iteration 3, lr = 0.001" in text   # stepvalue 3
    assert re.search(r"Iteration 3, Testing net \(#0\)\n    Test net output #0: detection_eval = [\d.e-]+", text)
    assert text.count("Testing net") == 1                       # 4 % 3 != 0: no final test
    # BatchNorm 0.999 averages over ~1000 iterations: a 4-iteration run is told so, once per fraction
    assert re.search(r"Warning: \d+ BatchNorm layer\(s\) \(\w+_bn, ...\) average over ~1000 iterations "
                     r"\(moving_average_fraction 0.999\) in a 4-iteration run", text)
    raw = [float(v) for v in re.findall(r"Train net output #0: mbox_loss = ([\d.e+-]+) \(\* 1 = ", text)]
    shown = [float(v) for v in re.findall(r"Iteration \d+, loss = ([\d.e+-]+)", text)]
    f = np.float32
    smoothed, window = f(0), []
    for i, loss in enumerate(raw):                               # average_loss 3, Caffe's update
        if len(window) < 3:
            window.append(f(loss))
            smoothed = (smoothed * f(len(window) - 1) + f(loss)) / f(len(window))
        else:
            smoothed = smoothed + (f(loss) - window[i % 3]) / f(3)
            window[i % 3] = f(loss)
        assert shown[i] == pytest.approx(float(smoothed), rel=2e-5)
    assert len(shown) == len(raw) + 1                            # + Solve's final display forward
    assert "Snapshotting to binary proto file" in text and text.endswith("Optimization Done.")
    assert Path(f"{tmp_path / 'a'}_iter_4.caffemodel").is_file()
    assert 0 in solver.last_test


def test_resume_is_exact_bit_for_bit(tiny, tmp_path):
    """6 updates in one go == 3 updates, snapshot, resume, 3 more (weights, BatchNorm
    statistics, momentum history, lr step, data position, loss window)."""
    _, full_log = run(tiny, tmp_path / "full", max_iter=6)
    run(tiny, tmp_path / "half", max_iter=3)
    _, resumed_log = run(tiny, tmp_path / "half", max_iter=6, resume=f"{tmp_path / 'half'}_iter_3.solverstate")
    assert_same_model(f"{tmp_path / 'full'}_iter_6.caffemodel", f"{tmp_path / 'half'}_iter_6.caffemodel")
    a = io.read_solverstate(f"{tmp_path / 'full'}_iter_6.solverstate")
    b = io.read_solverstate(f"{tmp_path / 'half'}_iter_6.solverstate")
    assert (a.iter, a.current_step) == (b.iter, b.current_step) == (6, 1)
    for x, y in zip(a.history, b.history):
        assert np.array_equal(io.blob_to_array(x), io.blob_to_array(y))
    tail = lambda log: [l for l in log if re.match(r"Iteration [3-6], (loss|lr)", l)]   # noqa: E731
    assert tail(full_log) == tail(resumed_log)                 # the smoothed loss continues too


def test_sigint_snapshots_then_stops_and_the_run_resumes_exactly(tiny, tmp_path):
    def progress(p):
        if p.iter == 2:
            os.kill(os.getpid(), signal.SIGINT)                 # seen at the next poll
    with SignalActions() as sig:
        solver, log = run(tiny, tmp_path / "int", max_iter=6, signals=sig, progress=progress)
    assert solver.iter == 3 and log[-1] == "Optimization stopped early."
    assert sorted(p.name for p in tmp_path.glob("int_iter_*")) == [
        "int_iter_3.caffemodel", "int_iter_3.solverstate", "int_iter_3.trainstate.json"]
    run(tiny, tmp_path / "int", max_iter=6, resume=f"{tmp_path / 'int'}_iter_3.solverstate")
    run(tiny, tmp_path / "ref", max_iter=6)
    assert_same_model(f"{tmp_path / 'ref'}_iter_6.caffemodel", f"{tmp_path / 'int'}_iter_6.caffemodel")


def test_sighup_snapshots_and_continues(tiny, tmp_path):
    def progress(p):
        if p.iter == 1:
            os.kill(os.getpid(), signal.SIGHUP)
    with SignalActions() as sig:
        solver, log = run(tiny, tmp_path / "hup", max_iter=4, signals=sig, progress=progress)
    assert solver.iter == 4 and log[-1] == "Optimization Done."
    assert Path(f"{tmp_path / 'hup'}_iter_2.solverstate").is_file()
    assert Path(f"{tmp_path / 'hup'}_iter_4.solverstate").is_file()
    with SignalActions(sighup="none") as sig:
        solver, _ = run(tiny, tmp_path / "quiet", max_iter=2, signals=sig, progress=progress)
    assert not Path(f"{tmp_path / 'quiet'}_iter_1.solverstate").exists()


def test_trainstate_records_a_drawn_seed_and_restores_it(tiny, tmp_path):
    solver, _ = run(tiny, tmp_path / "clock", max_iter=2, random_seed=-1)
    state = TrainState.read(f"{tmp_path / 'clock'}_iter_2.trainstate.json")
    assert state.seed == solver.seed and state.iter == 2
    assert state.data["train"] == {"data": 2} and state.data["test"] == [{"data": 0}]
    resumed, _ = run(tiny, tmp_path / "clock", max_iter=3, random_seed=-1,
                     resume=f"{tmp_path / 'clock'}_iter_2.solverstate")
    assert resumed.seed == solver.seed


def test_nan_guard_names_the_parameter_or_the_layer_and_snapshots_first(tiny, tmp_path):
    param = solver_param(tiny, snapshot_prefix=str(tmp_path / "nan"), max_iter=5)
    solver = Solver(param, log=lambda m: None)
    with torch.no_grad():
        solver.train_net.layer_by_name["conv2"].blobs[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"iteration 0: layer 'conv2' blob 0 holds non-finite values"):
        solver.solve()
    solver.close()
    assert Path(f"{tmp_path / 'nan'}_iter_0.solverstate").is_file()
    solver = Solver(param, log=lambda m: None)
    with torch.no_grad():
        solver.train_net.layer_by_name["conv3"].blobs[0].fill_(3e38)    # finite weights, inf output
    with pytest.raises(NonFiniteError) as info:
        solver.solve()
    solver.close()
    assert re.search(r"iteration 0: loss is (nan|inf); first non-finite output: layer 'conv3' "
                     r"\(Convolution\) top 'conv3'", str(info.value))
    assert info.value.iteration == 0 and info.value.snapshot.endswith("nan_iter_0.solverstate")


def test_weights_fine_tuning_copies_layers_by_name(tiny, tmp_path):
    run(tiny, tmp_path / "w", max_iter=1)
    lines = []
    solver = Solver(solver_param(tiny, snapshot_prefix=str(tmp_path / "ft")), log=lines.append)
    solver.load_weights([f"{tmp_path / 'w'}_iter_1.caffemodel"])
    solver.close()
    assert lines[-1].endswith("layer(s) copied")
    trained = blobs(f"{tmp_path / 'w'}_iter_1.caffemodel")["conv1"][0]
    assert np.array_equal(solver.test_nets[0].layer_by_name["conv1"].blobs[0].detach().numpy(), trained)


# ---------------------------------------------------------------------------------------------
# processes: kill -9 during a snapshot, Ctrl-C to the process group

KILL_DURING_SNAPSHOT = r"""
import os, sys, time
sys.path.insert(0, {tests!r})
from deeper_ssd import io
from deeper_ssd.solver import Solver
from support.tiny_ssd import solver_param, make_tiny
paths = make_tiny({folder!r})
real_replace = os.replace
def slow_replace(src, dst):
    if "_iter_4." in str(dst):
        open({marker!r}, "w").close()
        time.sleep(120)                 # killed here: the temporary file is complete, not renamed
    real_replace(src, dst)
io.os.replace = slow_replace
Solver(solver_param(paths, snapshot_prefix={prefix!r}, snapshot=2, max_iter=6), log=print).solve()
"""


def _wait_for(path, proc, seconds=120):
    deadline = time.time() + seconds
    while not Path(path).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_kill_9_during_a_snapshot_leaves_the_previous_one_intact(tiny, tmp_path):
    marker, prefix = tmp_path / "writing", tmp_path / "k"
    script = KILL_DURING_SNAPSHOT.format(tests=str(REPO / "tests"), folder=str(tiny["solver"].parent),
                                         marker=str(marker), prefix=str(prefix))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(marker, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("k_"))
    assert names == ["k_iter_2.caffemodel", "k_iter_2.solverstate", "k_iter_2.trainstate.json"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert leftovers and all(name.startswith(".k_iter_4.caffemodel.") for name in leftovers)
    net = Net.from_prototxt(tiny["train"], "TRAIN")
    assert net.load_caffemodel(f"{prefix}_iter_2.caffemodel")
    solver, _ = run(tiny, prefix, max_iter=3, resume=f"{prefix}_iter_2.solverstate")
    assert solver.iter == 3


def test_ctrl_c_to_the_process_group_snapshots_and_exits_cleanly(tiny, tmp_path):
    """SIGINT reaches the trainer and its data workers (as Ctrl-C in a terminal does)."""
    param = solver_param(tiny, snapshot_prefix=str(tmp_path / "cc"), max_iter=100000, display=1)
    io.write_solver(param, tmp_path / "solver.prototxt")
    proc = subprocess.Popen([sys.executable, "-m", "deeper_ssd.cli", "train", "--solver",
                             str(tmp_path / "solver.prototxt"), "--workers", "2"],
                            cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for(tmp_path / "cc.log", proc)
        deadline = time.time() + 120
        while "Iteration 2, lr" not in (tmp_path / "cc.log").read_text():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "Optimization stopped early." in out
    states = list(tmp_path.glob("cc_iter_*.solverstate"))
    assert len(states) == 1 and io.read_solverstate(states[0]).iter >= 3


def test_channels_last_trains_the_same_net(tiny, tmp_path):
    run(tiny, tmp_path / "nchw", max_iter=2)
    param = solver_param(tiny, snapshot_prefix=str(tmp_path / "nhwc"), max_iter=2)
    solver = Solver(param, log=lambda m: None, channels_last=True)
    solver.solve()
    solver.close()
    assert solver.train_net.layer_by_name["conv2"].blobs[0].is_contiguous(memory_format=torch.channels_last)
    a, b = blobs(f"{tmp_path / 'nchw'}_iter_2.caffemodel"), blobs(f"{tmp_path / 'nhwc'}_iter_2.caffemodel")
    for name in a:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------
# faults during training keep the work

def test_a_killed_data_worker_is_restarted_at_its_place_in_the_data(tiny, tmp_path, capfd):
    """kill -9 on the data worker at iteration 12: the workers restart at the next batch and the
    run ends with the weights of an undisturbed run (batches depend only on seed and index)."""
    param = solver_param(tiny, snapshot_prefix=str(tmp_path / "killed"), max_iter=14)
    solver = Solver(param, log=lambda m: None, data_workers=1)

    def progress(p):
        if p.iter == 12:
            workers = solver.train_net.layer_by_name["data"]._loader._iter._workers
            os.kill(workers[0].pid, signal.SIGKILL)
    solver.progress = progress
    try:
        solver.solve()
    finally:
        solver.close()
    assert solver.iter == 14
    assert "a data worker process died" in capfd.readouterr().err
    run(tiny, tmp_path / "calm", max_iter=14)
    assert_same_model(f"{tmp_path / 'calm'}_iter_14.caffemodel", f"{tmp_path / 'killed'}_iter_14.caffemodel")


def test_a_corrupt_record_mid_training_names_it_and_keeps_the_work(tmp_path):
    import lmdb
    from deeper_ssd.solver import TrainingStopped
    paths = make_tiny(tmp_path / "data")
    source = paths["data"] / "trainval_lmdb"
    env = lmdb.open(str(source), subdir=source.is_dir(), lock=False)
    with env.begin(write=True) as txn:
        keys = [key for key, _ in txn.cursor()]
        txn.put(keys[9], b"\x08garbage")                    # read by iteration 2 (batch 4)
    env.close()
    with pytest.raises(TrainingStopped) as stop:
        run(paths, tmp_path / "c", max_iter=6)
    message = str(stop.value)
    assert message.startswith("iteration 2: ") and keys[9].decode() in message
    assert f"saved to {tmp_path / 'c'}_iter_2.solverstate" in message
    assert io.read_solverstate(f"{tmp_path / 'c'}_iter_2.solverstate").iter == 2


def test_a_full_disk_while_snapshotting_keeps_the_previous_snapshot(tiny, tmp_path, monkeypatch):
    import errno
    from deeper_ssd.solver import SnapshotError
    write = io.atomic_write_bytes

    def full_disk(path, data):
        if "_iter_4" in str(path) and str(path).endswith(".trainstate.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, data)
    monkeypatch.setattr(io, "atomic_write_bytes", full_disk)
    with pytest.raises(SnapshotError) as stop:
        run(tiny, tmp_path / "d", max_iter=6, snapshot=2)
    message = str(stop.value)
    assert "No space left on device" in message and f"{tmp_path / 'd'}_iter_2.solverstate is intact" in message
    assert sorted(p.name for p in tmp_path.glob("d_iter_*")) == [
        "d_iter_2.caffemodel", "d_iter_2.solverstate", "d_iter_2.trainstate.json"]
    monkeypatch.setattr(io, "atomic_write_bytes", write)
    solver, _ = run(tiny, tmp_path / "d", max_iter=3, resume=f"{tmp_path / 'd'}_iter_2.solverstate")
    assert solver.iter == 3


def test_sigterm_snapshots_then_stops_by_default(tiny, tmp_path):
    """What a cluster scheduler sends before preemption; a fallback handler keeps this test's
    process alive where SIGTERM is not handled."""
    fallback = signal.signal(signal.SIGTERM, lambda *args: None)

    def progress(p):
        if p.iter == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    try:
        with SignalActions() as sig:
            solver, log = run(tiny, tmp_path / "term", max_iter=6, signals=sig, progress=progress)
        with SignalActions(sigterm="none") as sig:
            os.kill(os.getpid(), signal.SIGTERM)
            assert sig.requested() is None
    finally:
        signal.signal(signal.SIGTERM, fallback)
    assert solver.iter == 3 and log[-1] == "Optimization stopped early."
    assert (tmp_path / "term_iter_3.solverstate").is_file()


def test_weights_that_match_no_layer_are_a_warning_naming_both_sides(tiny, tmp_path):
    other = io.parse_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 '
                          'dim: 3 dim: 8 dim: 8 } } }\nlayer { name: "stranger" type: "Convolution" '
                          'bottom: "data" top: "x" convolution_param { num_output: 2 kernel_size: 3 } }',
                          io.caffe_pb2.NetParameter())
    Net(other).save_caffemodel(tmp_path / "other.caffemodel")
    lines = []
    solver = Solver(solver_param(tiny, snapshot_prefix=str(tmp_path / "w")), log=lines.append)
    solver.load_weights([str(tmp_path / "other.caffemodel")])
    solver.close()
    [line] = [line for line in lines if "Finetuning from" in line]
    assert "0 layer(s) copied; Warning: no layer of the file matches" in line
    assert "file layers: stranger" in line and "net layers: conv1, " in line
