"""Feeding a GPU, the parts a CPU can prove: worker counts reach every data layer (train and
test nets), frozen blobs are broadcast once, gradients all-reduced during backward equal the
after-backward average (two gloo processes)."""
import pytest
import torch

from deeper_ssd.data.loader import default_workers
from deeper_ssd.solver import Solver
from support.tiny_ssd import make_tiny, solver_param


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def _workers(solver):
    return ([layer.loader_settings()["num_workers"] for layer in solver.train_net.data_layers],
            [layer.loader_settings()["num_workers"] for net in solver.test_nets for layer in net.data_layers])


def test_workers_reach_test_nets_and_default_to_the_core_rule(tiny, tmp_path):
    param = solver_param(tiny, snapshot_prefix=str(tmp_path / "w"))
    given = Solver(param, log=lambda m: None, data_workers=3)
    assert _workers(given) == ([3], [3])
    default = Solver(param, log=lambda m: None)
    assert _workers(default) == ([default_workers()], [default_workers()])


# ---------------------------------------------------------------------------------------------
# two gloo processes

def _broadcasts(comm, out: str) -> None:
    """Rank 1 changes a BatchNorm statistic and a frozen weight; one broadcast_statistics."""
    from deeper_ssd.net import LearnableParam
    stat = LearnableParam("bn", 0, torch.nn.Parameter(torch.zeros(3), requires_grad=False), 0, 0, statistics=True)
    frozen = LearnableParam("teacher/conv", 0, torch.nn.Parameter(torch.zeros(3), requires_grad=False), 0, 1)
    trained = LearnableParam("conv", 0, torch.nn.Parameter(torch.zeros(3)), 1, 1)
    with torch.no_grad():
        for p in (stat, frozen, trained):
            p.blob.fill_(float(comm.rank + 1))
    comm.broadcast_statistics([stat, frozen, trained])
    torch.save([p.blob.detach() for p in (stat, frozen, trained)], f"{out}/{comm.rank}.pt")


def test_only_batchnorm_statistics_are_broadcast_every_iteration(tmp_path):
    from deeper_ssd.solver import distributed
    distributed.spawn(_broadcasts, ["cpu", "cpu"], args=(str(tmp_path),))
    stat, frozen, trained = torch.load(tmp_path / "1.pt")
    assert stat.tolist() == [1.0] * 3                    # rank 0's statistics
    assert frozen.tolist() == [2.0] * 3 and trained.tolist() == [2.0] * 3   # untouched


def test_net_marks_batchnorm_statistics_not_frozen_weights(tiny):
    from deeper_ssd.net import Net
    net = Net.from_prototxt(tiny["train"], "TRAIN")
    stats = {(p.layer, p.index) for p in net.learnable_params if p.statistics}
    assert stats and all(net.layer_by_name[layer].caffe_type == "BatchNorm" for layer, _ in stats)
    assert all(not p.blob.requires_grad for p in net.learnable_params if p.statistics)


def _overlapped_vs_after_backward(comm, train: str, out: str) -> None:
    """The tiny net's gradients of two passes (iter_size 2), averaged by the bucketed
    all-reduce during the second backward and, again from the same batches, by one
    all-reduce after backward (the formula the averager replaces)."""
    import numpy as np
    import torch.distributed as dist
    from deeper_ssd.net import Net
    net = Net.from_prototxt(train, "TRAIN", seed=1)
    data = net.layer_by_name["data"]
    data.set_shard(comm.rank, comm.world_size)
    data.configure_loader(num_workers=0)
    blobs = [p.blob for p in net.learnable_params if p.blob.requires_grad]
    averager = comm.gradient_averager(net.learnable_params, bucket_bytes=4096)   # several buckets
    assert len(averager.buckets) > 2

    def passes(arm):
        data.set_seed(3, 0)
        for b in blobs:
            b.grad = None
        for i in range(2):
            if arm and i == 1:
                averager.arm()
            net().loss.backward()

    passes(arm=True)
    averager.finish()
    overlapped = [b.grad.clone() for b in blobs]
    passes(arm=False)
    flat = torch.cat([b.grad.reshape(-1) for b in blobs])
    dist.all_reduce(flat)
    flat.mul_(float(np.float32(1 / comm.world_size)))
    torch.save([overlapped, list(flat.split([b.numel() for b in blobs]))], f"{out}/{comm.rank}.pt")
    data.close()


def test_gradients_averaged_during_backward_equal_the_average_after_it(tiny, tmp_path):
    from deeper_ssd.solver import distributed
    distributed.spawn(_overlapped_vs_after_backward, ["cpu", "cpu"], args=(str(tiny["train"]), str(tmp_path)))
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for overlapped, after in results:
        for a, b in zip(overlapped, after):
            assert torch.equal(a.view(torch.int32), b.reshape(a.shape).view(torch.int32))
    for a, b in zip(results[0][0], results[1][0]):                # every rank holds the average
        assert torch.equal(a, b)
    assert any(g.abs().sum() > 0 for g in results[0][0])


# ---------------------------------------------------------------------------------------------
# --cudnn-benchmark

def test_cudnn_benchmark_is_off_unless_asked_for_in_train_and_test(tiny, tmp_path, monkeypatch):
    from deeper_ssd import cli, io, pipelines
    io.write_solver(solver_param(tiny, snapshot_prefix=str(tmp_path / "b"), max_iter=1, test_interval=100,
                                 snapshot=0), tmp_path / "solver.prototxt")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    pipelines.train(tmp_path / "solver.prototxt", progress=False, device="cpu", workers=0, cudnn_benchmark=True)
    assert torch.backends.cudnn.benchmark is True
    pipelines.train(tmp_path / "solver.prototxt", progress=False, device="cpu", workers=0)
    assert torch.backends.cudnn.benchmark is False
    weights = tmp_path / "b_iter_1.caffemodel"
    pipelines.test(tiny["test"], weights, out=tmp_path / "t", iterations=1, workers=0, cudnn_benchmark=True,
                   echo=lambda line: None)
    assert torch.backends.cudnn.benchmark is True
    parser = cli.build_parser()
    for argv in (["train", "--solver", "s"], ["test", "--model", "m", "--weights", "w"]):
        assert parser.parse_args(argv).cudnn_benchmark is False
        assert parser.parse_args(argv + ["--cudnn-benchmark"]).cudnn_benchmark is True


# ---------------------------------------------------------------------------------------------
# on a CUDA device (skipped without one; bench/gpu_check.sh runs them with the GPU check)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def _data_batches(train, device, **loader):
    from deeper_ssd.net import Net
    layer = Net.from_prototxt(train, "TRAIN", device=device).layer_by_name["data"]
    layer.set_seed(9)
    layer.configure_loader(num_workers=1, **loader)
    settings = layer.loader_settings()
    batches = [layer.forward() for _ in range(3)]
    layer.close()
    return settings, batches


@pytest.mark.cuda
@needs_cuda
def test_cuda_feed_is_pinned_uint8_and_equals_the_cpu_float_path(tiny):
    settings, on_cuda = _data_batches(tiny["train"], "cuda")
    assert settings["pin_memory"] and settings["uint8"]
    _, on_cpu = _data_batches(tiny["train"], "cpu")
    for (d_gpu, l_gpu), (d_cpu, l_cpu) in zip(on_cuda, on_cpu):
        assert d_gpu.device.type == "cuda" and d_gpu.dtype == torch.float32
        assert l_gpu.device.type == "cpu" and l_gpu.is_pinned()       # the loss reads it on the host
        assert torch.equal(d_gpu.cpu().view(torch.int32), d_cpu.view(torch.int32))
        assert torch.equal(l_gpu, l_cpu)


@pytest.mark.cuda
@needs_cuda
def test_cuda_priors_loss_with_a_host_label_equal_the_device_label_path(tiny):
    from deeper_ssd.net import Net
    net = Net.from_prototxt(tiny["train"], "TRAIN", device="cuda", seed=2)
    cpu = Net.from_prototxt(tiny["train"], "TRAIN", device="cpu", seed=2)
    data = net.layer_by_name["data"]
    data.configure_loader(num_workers=0)
    data.set_seed(4)
    net(keep_blobs=True)
    blobs = net.blobs
    loss = next(layer for layer in net.layers if layer.caffe_type == "MultiBoxLoss")
    bottoms = [blobs[name] for name in loss.lp.bottom]
    host_label = bottoms[3].cpu()
    via_host = loss.terms(*bottoms[:3], host_label)
    via_device = loss.terms(*bottoms[:3], host_label.cuda())
    assert torch.equal(via_host.loss, via_device.loss) and torch.equal(via_host.indices, via_device.indices)
    for layer in net.layers:
        if layer.caffe_type == "PriorBox":
            twin = cpu.layer_by_name[layer.name]
            for (hw, image_hw, dtype, device), top in layer._prior_cache.items():
                assert torch.equal(top.cpu(), twin.priors(hw, image_hw, dtype, "cpu"))
    data.close()
