"""Multi-process training with Caffe's multi-GPU semantics, on CPU with gloo and two processes.

Caffe: every rank reads its own records (dealt round-robin) with the net's full batch size and
normalises its own loss; gradients are summed and scaled by 1/2; the root's weights (BatchNorm
statistics included) start every iteration. The reference below does exactly that in one
process with two nets; the two-process run must reach the same weights.
"""
import numpy as np
import torch

from deeper_ssd import io
from deeper_ssd.net import Net
from deeper_ssd.solver import LearningRate, Solver, distributed, make_rule
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
