"""Device selection for every launch path, with CUDA simulated where this machine has none:
solver_mode, --device, torchrun's environment, --gpus, a single process on cuda:N, and the CUDA
random state of a snapshot restored on a machine with fewer GPUs."""
from types import SimpleNamespace

import pytest
import torch

from deeper_ssd import cli, pipelines
from deeper_ssd.proto import caffe_pb2
from deeper_ssd.solver import Solver, devices, distributed
from deeper_ssd.solver.trainer import _rng_to_text
from support.tiny_ssd import make_tiny, solver_param

GPU, CPU = caffe_pb2.SolverParameter.GPU, caffe_pb2.SolverParameter.CPU


@pytest.fixture
def cuda(monkeypatch):
    """Pretend torch sees ``cuda.count`` GPUs (2 unless a test changes it); records set_device."""
    state = SimpleNamespace(count=2, current=[], rng={})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: state.count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state.count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: state.current.append(str(torch.device(device))))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name="Simulated GPU", total_memory=80 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, index: state.rng.__setitem__(index, s))
    return state


def _param(mode, device_id=0):
    return caffe_pb2.SolverParameter(solver_mode=mode, device_id=device_id)


def test_solver_mode_decides_without_a_device(cuda):
    assert devices.training_device(_param(GPU)) == torch.device("cuda:0")
    assert devices.training_device(_param(GPU, 1)) == torch.device("cuda:1")
    assert devices.training_device(_param(CPU)) == torch.device("cpu")
    assert devices.training_device(_param(GPU), "cpu") == torch.device("cpu")
    assert devices.requested_fallback(_param(GPU), torch.device("cpu"))
    assert devices.training_device(_param(CPU), "cuda") == torch.device("cuda:0")
    with pytest.raises(devices.DeviceError, match="this machine has 2 CUDA device"):
        devices.training_device(_param(GPU, 2))
    assert devices.describe(torch.device("cuda:1")) == "cuda:1 (Simulated GPU, 80.0 GiB)"


def test_gpu_solver_without_cuda_is_one_clear_line(cuda, tmp_path, capsys):
    cuda.count = 0
    with pytest.raises(devices.DeviceError, match="solver_mode is GPU but CUDA is not available.*--device cpu"):
        devices.training_device(_param(GPU))
    paths = make_tiny(tmp_path, max_iter=1, solver_mode=GPU)
    assert cli.main(["train", "--solver", str(paths["solver"]), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "solver_mode is GPU but CUDA is not available" in err and "\n" not in err
    assert cli.main(["train", "--solver", str(paths["solver"]), "--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "device 'cuda': CUDA is not available here" in err and "\n" not in err and "Assertion" not in err


def test_the_explicit_cpu_fallback_is_logged(cuda, tmp_path):
    cuda.count = 0
    paths = make_tiny(tmp_path, max_iter=1, solver_mode=GPU)
    log = tmp_path / "train.log"
    pipelines.train(paths["solver"], device="cpu", workers=0, log=log, progress=False)
    text = log.read_text()
    assert "solver_mode is GPU; training on the CPU as --device cpu asks" in text
    assert f"Training on cpu ({torch.get_num_threads()} threads)" in text


def test_torchrun_with_a_gpu_solver_puts_each_rank_on_its_local_gpu(cuda, monkeypatch, tmp_path):
    paths = make_tiny(tmp_path, max_iter=1, solver_mode=GPU)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    groups = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, timeout=None: groups.append((backend, timeout.total_seconds())))
    comm, device = distributed.from_environment(pipelines._torchrun_device_type(
        pipelines.read_solver(paths["solver"]), None), timeout=60)
    assert device == torch.device("cuda:1") and comm.device == device and comm.rank == 1
    assert cuda.current == ["cuda:1"] and groups == [("nccl", 60.0)]
    # the pipeline takes that path: no --device, solver_mode GPU -> CUDA
    seen = []

    def launched(kind, timeout=None):
        seen.append(kind)
        raise SystemExit                      # the rank's own training is not the point here
    monkeypatch.setattr(distributed, "from_environment", launched)
    with pytest.raises(SystemExit):
        pipelines.train(paths["solver"], progress=False)
    assert seen == ["cuda"]
    with pytest.raises(pipelines.UsageError, match="give --device cuda"):
        pipelines.train(paths["solver"], device="cuda:1", progress=False)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(pipelines.UsageError, match="LOCAL_RANK 2: device 'cuda:2': this machine has 2"):
        pipelines.train(paths["solver"], progress=False)
    seen.clear()
    with pytest.raises(SystemExit):
        pipelines.train(paths["solver"], device="cpu", progress=False)
    assert seen == ["cpu"]


def test_gpus_put_rank_r_on_its_own_gpu(cuda, monkeypatch, tmp_path):
    paths = make_tiny(tmp_path, max_iter=1, solver_mode=GPU)
    spawned = []
    monkeypatch.setattr(distributed, "spawn", lambda fn, ranks, args=(), timeout=None:
                        spawned.append(([str(d) for d in ranks], timeout)) or [None, None])
    pipelines.train(paths["solver"], gpus=[1, 0], collective_timeout=90, progress=False)
    assert spawned == [(["cuda:1", "cuda:0"], 90)]
    with pytest.raises(pipelines.UsageError, match="not both"):
        pipelines.train(paths["solver"], gpus=[0, 1], device="cuda:0", progress=False)
    with pytest.raises(pipelines.UsageError, match="this machine has 2"):
        pipelines.train(paths["solver"], gpus=[0, 2], progress=False)
    # each spawned process makes its GPU current before joining the NCCL group
    joined, results = [], []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, rank, world_size, timeout:
                        joined.append((backend, rank, world_size, timeout.total_seconds())))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    queue = SimpleNamespace(put=results.append)
    distributed._worker(1, _device_of, ["cuda:1", "cuda:0"], "nccl", 0, (), queue, 60)
    assert cuda.current == ["cuda:0"] and joined == [("nccl", 1, 2, 60.0)] and results == [(1, "cuda:0")]


def _device_of(comm):
    return str(comm.device)


def test_a_single_process_on_cuda_n_makes_it_current(cuda, monkeypatch, tmp_path):
    devices.use_device(torch.device("cuda:1"))
    devices.use_device(torch.device("cpu"))
    devices.use_device(torch.device("cuda"))          # set_device refuses a device without index
    assert cuda.current == ["cuda:1", "cuda:0"]
    used = []
    monkeypatch.setattr(devices, "use_device", used.append)
    paths = make_tiny(tmp_path, max_iter=1)
    solver = Solver(solver_param(paths), device="cpu", log=lambda line: None, data_workers=0)
    solver.close()
    assert used == [torch.device("cpu")]


def test_cuda_random_state_restores_what_exists_and_warns_about_the_rest(cuda, tmp_path):
    paths = make_tiny(tmp_path, max_iter=1)
    lines = []
    solver = Solver(solver_param(paths), device="cpu", log=lines.append, data_workers=0)
    solver.close()
    saved = [_rng_to_text(torch.full((8,), i, dtype=torch.uint8)) for i in range(4)]
    cuda.count = 2
    solver._restore_cuda_rng(saved)                 # saved by a 4-GPU process, 2 GPUs here
    assert sorted(cuda.rng) == [0, 1] and int(cuda.rng[1][0]) == 1
    assert "holds the CUDA random state of 4 GPU(s), 2 visible here: restored 2" in lines[-1]
    cuda.rng.clear()
    cuda.count = 3
    solver._restore_cuda_rng(saved[:1])
    assert sorted(cuda.rng) == [0] and "cuda:1 and above keep their seeded state" in lines[-1]


def test_a_rank_failure_under_torchrun_is_a_training_process_error(monkeypatch, tmp_path):
    from deeper_ssd.solver.trainer import RankFailed
    paths = make_tiny(tmp_path, max_iter=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "from_environment", lambda kind, timeout=None: (None, torch.device("cpu")))

    def failed(param, options, comm=None, device=None):
        raise RankFailed("iteration 3: rank 1: RuntimeError: boom; training stopped")
    monkeypatch.setattr(pipelines, "_train_process", failed)
    with pytest.raises(pipelines.TrainingProcessError, match="rank 1: RuntimeError: boom"):
        pipelines.train(paths["solver"], progress=False)
