"""Mixed precision on the CPU: bf16 autocast training of the tiny SSD follows the float32 run
while priors, the loss's inputs and its targets stay float32; fp16 loss scaling skips an
overflowing update instead of stopping, and stops only when the overflow persists; TF32 is off
unless asked for."""
import re

import numpy as np
import pytest
import torch

from deeper_ssd import box, pipelines
from deeper_ssd.solver import NonFiniteError, Solver
from deeper_ssd.solver.precision import Precision, set_tf32
from support.tiny_ssd import make_tiny, solver_param

ITERATIONS = 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("amp"))


def _losses(tiny, amp, hooks=None, **fields):
    """The per-iteration losses (average_loss 1) of ITERATIONS updates (or ``max_iter``) with
    ``amp``, and the log lines."""
    lines = []
    fields = dict(dict(max_iter=ITERATIONS, average_loss=1, display=1), **fields)
    solver = Solver(solver_param(tiny, **fields), device="cpu",
                    log=lines.append, data_workers=0, amp=amp)
    if hooks is not None:
        hooks(solver)
    try:
        solver.solve()
    finally:
        solver.close()
    losses = [float(m.group(1)) for m in (re.match(r"Iteration \d+, loss = (\S+)", line) for line in lines) if m]
    return np.array(losses[:ITERATIONS]), lines


def test_bf16_training_follows_float32_with_caffe_semantics_in_float32(tiny, monkeypatch):
    seen = {"targets": set()}
    encode = box.encode

    def encode_spy(*args, **kwargs):                 # the loss's loc targets
        target = encode(*args, **kwargs)
        seen["targets"].add(target.dtype)
        return target

    def record(solver):
        def hook(layer, args, output):
            tops = (output,) if isinstance(output, torch.Tensor) else output
            seen.setdefault(layer.caffe_type, set()).update(
                t.dtype for t in list(args) + list(tops) if isinstance(t, torch.Tensor) and t.is_floating_point())
        for layer in solver.train_net.layers:
            if layer.caffe_type in ("PriorBox", "MultiBoxLoss", "Convolution"):
                layer.register_forward_hook(hook)
        monkeypatch.setattr(box, "encode", encode_spy)

    reference, _ = _losses(tiny, None)
    mixed, lines = _losses(tiny, "bf16", record)
    assert "Mixed precision: bf16 autocast" in lines
    assert seen["Convolution"] >= {torch.bfloat16}, "autocast must be on: convolutions in bf16"
    assert seen["PriorBox"] == {torch.float32}, seen["PriorBox"]
    assert seen["MultiBoxLoss"] == {torch.float32}, seen["MultiBoxLoss"]
    assert seen["targets"] == {torch.float32}, seen["targets"]
    # the stated tolerance: the first loss within 0.1 %, every loss within 25 % and the
    # 20-iteration mean within 5 % of float32's (bf16 keeps 8 bits of mantissa; training
    # amplifies the rounding from iteration to iteration)
    assert len(reference) == len(mixed) == ITERATIONS
    assert abs(mixed[0] - reference[0]) <= 1e-3 * reference[0], (mixed[0], reference[0])
    assert np.all(np.abs(mixed - reference) <= 0.25 * reference), (mixed, reference)
    assert abs(mixed.mean() - reference.mean()) <= 0.05 * reference.mean(), (mixed.mean(), reference.mean())
    assert not np.array_equal(mixed, reference), "bf16 arithmetic must differ somewhere"


def _overflow_at(iterations, init_scale):
    """A hook for _losses: fp16 loss scaling from ``init_scale``, and an infinite gradient in
    conv1's weights (the loss stays finite) at the given iterations."""
    def hooks(solver):
        solver.precision.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        blob = solver.train_net.layer_by_name["conv1"].blobs[0]
        blob.register_hook(lambda grad: grad * float("inf") if solver.iter in iterations else grad)
    return hooks


def test_an_fp16_overflow_skips_the_update_instead_of_stopping(tiny):
    losses, lines = _losses(tiny, "fp16", _overflow_at({3}, 1024.0), max_iter=6)
    skipped = [line for line in lines if "update skipped" in line]
    assert skipped == ["Iteration 3: fp16 gradients overflowed at loss scale 1024: update skipped, scale halved"]
    assert np.all(np.isfinite(losses)) and "Optimization Done." in lines


def test_an_overflow_that_persists_is_a_non_finite_stop(tiny, tmp_path):
    with pytest.raises(NonFiniteError, match=r"iteration 3: gradient of layer 'conv1' blob 0 is not finite"):
        _losses(tiny, "fp16", _overflow_at(set(range(100)), 4.0), max_iter=6,
                snapshot_prefix=str(tmp_path / "amp"))
    assert (tmp_path / "amp_iter_3.solverstate").is_file()


def test_precision_without_amp_changes_nothing():
    blob = torch.nn.Parameter(torch.ones(3))
    precision = Precision(None, "cpu", [blob])
    precision.backward((blob * 2).sum())
    precision.unscale()
    assert blob.grad.tolist() == [2.0, 2.0, 2.0]
    assert not precision.skips_overflow() and precision.scale == 1.0 and precision.step(lambda: 7) == 7
    with pytest.raises(ValueError, match="amp must be one of bf16, fp16"):
        Precision("fp8", "cpu", [blob])


def test_tf32_is_off_unless_asked_for(tmp_path):
    set_tf32(True)
    paths = make_tiny(tmp_path, max_iter=1)
    pipelines.train(paths["solver"], workers=0, progress=False, log=tmp_path / "log")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    pipelines.train(paths["solver"], workers=0, progress=False, log=tmp_path / "log", tf32=True)
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    set_tf32(False)


def test_the_fp16_loss_scale_is_snapshotted_and_restored(tiny, tmp_path):
    prefix = str(tmp_path / "scale")
    _, lines = _losses(tiny, "fp16", _overflow_at({0}, 1024.0), max_iter=2, snapshot=2, snapshot_prefix=prefix)
    assert any("update skipped" in line for line in lines)
    solver = Solver(solver_param(tiny, max_iter=2, snapshot_prefix=prefix), device="cpu", log=lambda line: None,
                    data_workers=0, amp="fp16")
    try:
        solver.restore(prefix + "_iter_2.solverstate")
        assert solver.precision.state() == dict(scale=512.0, growth_tracker=1)
    finally:
        solver.close()


def test_the_command_line_flags_reach_the_solver(tmp_path, capsys):
    from deeper_ssd import cli
    paths = make_tiny(tmp_path, max_iter=1)
    log = tmp_path / "train.log"
    assert cli.main(["train", "--solver", str(paths["solver"]), "--amp", "bf16", "--workers", "0",
                     "--log", str(log), "--no-progress"]) == 0
    assert "Mixed precision: bf16 autocast" in log.read_text()
    assert cli.main(["train", "--solver", str(paths["solver"]), "--collective-timeout", "0", "--no-progress"]) == 2
    assert "--collective-timeout 0.0: give a number of seconds > 0" in capsys.readouterr().err
