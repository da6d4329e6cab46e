"""Multi-process training with Caffe's multi-GPU semantics, on CPU with gloo and two processes.

Caffe: every rank reads its own records (dealt round-robin) with the net's full batch size and
normalises its own loss; gradients are summed and scaled by 1/2; the root's weights (BatchNorm
statistics included) start every iteration. The reference below does exactly that in one
process with two nets; the two-process run must reach the same weights.
"""
import re

import numpy as np
import pytest
import torch

from deeper_ssd import io, pipelines
from deeper_ssd.net import Net
from deeper_ssd.solver import LearningRate, NonFiniteError, Solver, distributed, make_rule
from deeper_ssd.solver.trainer import RankFailed
from support.tiny_ssd import make_tiny

ITERATIONS = 3


def _train(comm, solver_path: str) -> None:
    param = io.read_solver(solver_path)
    solver = Solver(param, comm=comm, device=comm.device, log=lambda message: None, data_workers=0)
    try:
        solver.solve()
    finally:
        solver.close()


def _reference(paths, param):
    """Caffe's two-GPU iteration, emulated with two nets in this process."""
    nets = [Net.from_prototxt(paths["train"], "TRAIN", seed=param.random_seed) for _ in range(2)]
    for rank, net in enumerate(nets):
        net.layer_by_name["data"].set_seed(param.random_seed)
        net.layer_by_name["data"].set_shard(rank, 2)
        net.layer_by_name["data"].configure_loader(num_workers=0)
    root, other = nets
    rule, lr = make_rule(param, root.learnable_params), LearningRate(param)
    for it in range(ITERATIONS):
        with torch.no_grad():                              # the root's blobs start the iteration
            for a, b in zip(root.learnable_params, other.learnable_params):
                b.blob.copy_(a.blob)
        for net in nets:
            for p in net.learnable_params:
                p.blob.grad = None
            net().loss.backward()
        for a, b in zip(root.learnable_params, other.learnable_params):
            if a.blob.requires_grad:
                a.blob.grad = (a.blob.grad + b.blob.grad) * float(np.float32(0.5))
        rule.apply(lr(it), it)
    for net in nets:
        net.layer_by_name["data"].close()
    return root


def test_two_processes_average_separately_normalised_gradients(tmp_path):
    paths = make_tiny(tmp_path, batch=2, max_iter=ITERATIONS, test_interval=2, test_iter=[1])
    distributed.spawn(_train, ["cpu", "cpu"], args=(str(paths["solver"]),))
    param = io.read_solver(paths["solver"])
    reference = _reference(paths, param)
    trained = {layer.name: layer.blobs for layer in io.read_caffemodel(
        f"{paths['prefix']}_iter_{ITERATIONS}.caffemodel").layer if len(layer.blobs)}
    assert trained.keys() == {name for name, blobs in reference.params.items()}
    for name, blobs in reference.params.items():
        for i, blob in enumerate(blobs):
            np.testing.assert_allclose(io.blob_to_array(trained[name][i]).reshape(blob.shape),
                                       blob.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=f"{name}[{i}]")
    solo = _reference_single(paths, param)
    assert not np.allclose(solo, reference.params["conv1"][0].detach().numpy()), \
        "two ranks must see different records than one rank alone"


def _reference_single(paths, param):
    net = Net.from_prototxt(paths["train"], "TRAIN", seed=param.random_seed)
    net.layer_by_name["data"].set_seed(param.random_seed)
    net.layer_by_name["data"].configure_loader(num_workers=0)
    rule, lr = make_rule(param, net.learnable_params), LearningRate(param)
    for it in range(ITERATIONS):
        for p in net.learnable_params:
            p.blob.grad = None
        net().loss.backward()
        rule.apply(lr(it), it)
    net.layer_by_name["data"].close()
    return net.params["conv1"][0].detach().numpy()


# ---------------------------------------------------------------------------------------------
# stopping together: a NaN or an exception on one rank leaves one complete snapshot

def _options(paths, monkeypatch) -> dict:
    """The per-process options ``pipelines.train(gpus=[0, 1])`` hands its ranks (taken from the
    call, with two GPUs simulated; the ranks here run on the CPU)."""
    captured = []
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "device_count", lambda: 2)
        patch.setattr(distributed, "spawn", lambda fn, ranks, args=(), timeout=None: captured.extend(args) or [None])
        pipelines.train(paths["solver"], gpus=[0, 1], workers=0, progress=False, log=str(paths["prefix"]) + ".log")
    return captured[0]


def _faulty_rank(comm, options: dict, fault: str, at: int):
    """pipelines' rank function, with ``fault`` ("nan" or "exception") injected into rank 1's
    train forward of iteration ``at`` ("test": an exception in rank 0's test phase there), and
    rank 0's file writes slowed down (before the fix, rank 1 left at once and the launcher
    ended rank 0 in the middle of its snapshot)."""
    import time
    from deeper_ssd import io as dio, pipelines
    from deeper_ssd.net import Net
    if comm.rank == 0:
        write = dio.atomic_write_bytes

        def slow_write(path, data):
            time.sleep(0.5)
            write(path, data)
        dio.atomic_write_bytes = slow_write
        test_all = Solver.test_all

        def failing_test_all(self):
            if fault == "test" and self.iter == at:
                raise RuntimeError("injected test failure")
            test_all(self)
        Solver.test_all = failing_test_all
    else:
        forward, calls = Net.forward, [0]

        def faulty_forward(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == at + 1 and fault == "exception":
                raise RuntimeError("injected failure")
            outputs = forward(self, *args, **kwargs)
            if calls[0] == at + 1:
                outputs.loss = outputs.loss * float("nan")
            return outputs
        Net.forward = faulty_forward
    return pipelines._train_rank(comm, options)


def _snapshot_files(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".log"))


@pytest.mark.parametrize("fault", ["nan", "exception", "test"])
def test_a_fault_on_one_rank_leaves_one_complete_snapshot_and_its_message(tmp_path, capfd, monkeypatch, fault):
    tests = dict(test_interval=2, test_iter=[1]) if fault == "test" else {}
    paths = make_tiny(tmp_path, batch=2, max_iter=6, snapshot=0, **tests)
    outcomes = distributed.spawn(_faulty_rank, ["cpu", "cpu"], args=(_options(paths, monkeypatch), fault, 2))
    folder = paths["prefix"].parent
    files = _snapshot_files(folder)
    assert not [f for f in files if f.endswith(".partial")], files
    assert files == ["tiny_iter_2.caffemodel", "tiny_iter_2.solverstate", "tiny_iter_2.trainstate.json"]
    state = io.read_solverstate(folder / "tiny_iter_2.solverstate")
    assert state.iter == 2
    assert len(io.read_caffemodel(folder / "tiny_iter_2.caffemodel").layer)
    expected = NonFiniteError if fault == "nan" else RankFailed
    assert isinstance(outcomes[0], expected) and isinstance(outcomes[1], expected), outcomes
    message = str(outcomes[0])
    rank = 0 if fault == "test" else 1
    assert message.startswith(f"iteration 2: rank {rank}: ") and "tiny_iter_2.solverstate" in message, message
    if fault != "nan":
        assert f"RuntimeError: injected {'test ' if fault == 'test' else ''}failure" in message
    out = capfd.readouterr().out
    assert message in out                                        # rank 0 logged it
    assert re.search(r"Training on 2 processes \(gloo backend\): rank 0 on cpu \(\d+ threads\), "
                     r"rank 1 on cpu \(\d+ threads\)", out)
    with pytest.raises(expected if fault == "nan" else pipelines.TrainingProcessError, match=f"rank {rank}"):
        pipelines._raise_outcome(outcomes[0])


def test_resume_with_a_different_number_of_ranks(tmp_path):
    """A two-process run's snapshot resumes in one process, and a one-process run's in two."""
    paths = make_tiny(tmp_path, batch=2, max_iter=2, snapshot=2)
    distributed.spawn(_train, ["cpu", "cpu"], args=(str(paths["solver"]),))
    two = paths["prefix"].parent / "tiny_iter_2.solverstate"
    param = io.read_solver(paths["solver"])
    param.max_iter = 4
    solver = Solver(param, device="cpu", log=lambda message: None, data_workers=0)
    try:
        solver.solve(resume=str(two))
    finally:
        solver.close()
    assert solver.iter == 4 and (paths["prefix"].parent / "tiny_iter_4.solverstate").is_file()
    param.max_iter = 6
    io.write_solver(param, paths["solver"])
    distributed.spawn(_resume, ["cpu", "cpu"], args=(str(paths["solver"]), str(paths["prefix"]) + "_iter_4.solverstate"))
    assert io.read_solverstate(str(paths["prefix"]) + "_iter_6.solverstate").iter == 6


def _resume(comm, solver_path: str, snapshot: str) -> None:
    solver = Solver(io.read_solver(solver_path), comm=comm, device=comm.device, log=lambda message: None,
                    data_workers=0)
    try:
        solver.solve(resume=snapshot)
    finally:
        solver.close()


def _slow_tests_rank(comm, solver_path: str, seconds: float):
    """A rank whose root spends ``seconds`` more than the collective timeout in each test phase."""
    import time
    solver = Solver(io.read_solver(solver_path), comm=comm, device=comm.device, log=lambda message: None,
                    data_workers=0)
    test_all = solver.test_all

    def slow_test_all():
        time.sleep(seconds)
        test_all()
    if comm.rank == 0:
        solver.test_all = slow_test_all
    try:
        solver.solve()
    finally:
        solver.close()
    return solver.iter


def test_a_long_test_phase_on_rank_0_does_not_trip_the_collective_timeout(tmp_path):
    """The other ranks wait for rank 0's tests in the control group (long timeout), not in a
    collective bounded by --collective-timeout (here 2 s, the tests take 4 s each)."""
    paths = make_tiny(tmp_path, batch=2, max_iter=2, test_interval=1, test_iter=[1])
    assert distributed.spawn(_slow_tests_rank, ["cpu", "cpu"], args=(str(paths["solver"]), 4.0), timeout=2) == [2, 2]
