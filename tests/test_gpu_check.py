"""The GPU check (bench/gpu_check.py): its CPU-only parts here, its GPU parts under the ``cuda``
marker (skipped without a GPU): the tiny model's first-iteration loss on CUDA equals the CPU's
within 1e-4, and mixed-precision training runs there."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))   # spawned ranks import it too
import gpu_check  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_dry_run_goes_through_every_step_on_the_cpu(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("device cpu (") and "TF32 off; batch 2; 1 iterations" in out[0]
    assert out[1].startswith("deeper_ssd500_tiny: first-iteration loss ") and out[1].endswith(
        "equal (tolerance 0.0001 relative)")
    assert [line.split(":")[1].split(",")[1].strip() for line in out[2:4]] == ["float32", "bf16"]
    assert [line.split(":")[1].strip() for line in out[4:6]] == ["2 x cpu (gloo), float32", "2 x cpu (gloo), bf16"]
    assert all("images/s per process" in line for line in out[4:6])
    assert out[-1] == "GPU check passed"


def test_a_loss_that_differs_from_the_cpu_fails_the_check(monkeypatch):
    losses = iter([10.0, 10.01])                   # the CPU's, then the device's
    monkeypatch.setattr(gpu_check, "first_loss", lambda solver: next(losses))
    lines = []
    assert not gpu_check.check(["deeper_ssd500_tiny"], torch.device("cpu"), 2, 1, 1e-4, [], say=lines.append)
    assert "DIFFERENT" in lines[1] and lines[-1] == "GPU check FAILED"


@pytest.mark.parametrize("argv, message", [
    (["--models", "ssd999"], "--models: unknown ssd999"),
    (["--iterations", "0"], "--iterations and --batch must be >= 1"),
    (["--device", "tpu"], "device 'tpu': give cpu, cuda or cuda:N"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        gpu_check.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.cuda
@needs_cuda
def test_first_iteration_loss_on_cuda_equals_the_cpus():
    cpu = gpu_check.make_solver("deeper_ssd500_tiny", 2, "cpu")
    cuda = gpu_check.make_solver("deeper_ssd500_tiny", 2, "cuda")
    try:
        expected, got = gpu_check.first_loss(cpu), gpu_check.first_loss(cuda)
    finally:
        cpu.close()
        cuda.close()
    assert abs(got - expected) <= 1e-4 * max(1.0, abs(expected)), (got, expected)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_training_runs_on_cuda(amp):
    solver = gpu_check.make_solver("deeper_ssd500_tiny", 2, "cuda", amp=amp)
    try:
        run = gpu_check.timed_training(solver, 3)
    finally:
        solver.close()
    assert run["finite"] and all(math.isfinite(v) for v in run["losses"])
    assert next(iter(solver.train_net.parameters())).device.type == "cuda"
