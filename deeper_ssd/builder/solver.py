"""Solver prototxt builder: the SSD fork's VOC0712 solver and the Deeper SSD paper's solver.

:class:`SolverSettings` holds what differs between solvers; :func:`build_solver` writes a
``SolverParameter`` with the fields ssd_pascal.py sets (in its spelling: ``debug_info: false``
and ``snapshot_after_train: true`` are written even though they are defaults), plus the paths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Tuple

from ..proto import caffe_pb2
from .netspec import assign

__all__ = ["SolverSettings", "SSD_VOC0712_SOLVER", "PAPER_SOLVER", "build_solver"]


@dataclass(frozen=True)
class SolverSettings:
    """A multistep learning rate and detection evaluation (11-point AP). ``type`` is Caffe's
    solver type (SGD as the fork's scripts; Adam also writes ``momentum2``)."""
    base_lr: float
    stepvalues: Tuple[int, ...]
    max_iter: int
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0005
    snapshot: int = 0
    test_interval: int = 10000
    display: int = 10
    average_loss: int = 10
    iter_size: int = 1
    solver_mode: str = "GPU"
    test_initialization: bool = False
    ap_version: str = "11point"
    type: str = "SGD"
    momentum2: float = 0.999

    def replace(self, **changes) -> "SolverSettings":
        return replace(self, **changes)


#: ssd_pascal.py:365-389 (batch 32 over 4 GPUs, 120k iterations)
SSD_VOC0712_SOLVER = SolverSettings(base_lr=0.001, stepvalues=(80000, 100000, 120000), max_iter=120000,
                                    snapshot=80000)

#: Deeper SSD §4.2: lr 1e-3, ×0.1 at 60k, 90k and 120k, 150k iterations, momentum 0.9, weight
#: decay 5e-4 (batch 8 is the train net's batch_size). Test and snapshot interval: not given,
#: every 10k iterations (the fork's test_interval).
PAPER_SOLVER = SolverSettings(base_lr=0.001, stepvalues=(60000, 90000, 120000), max_iter=150000,
                              snapshot=10000)


def build_solver(settings: SolverSettings, train_net: str, test_net: str, num_test_image: int,
                 test_batch_size: int, snapshot_prefix: str) -> caffe_pb2.SolverParameter:
    """The solver for one model; ``test_iter = ceil(num_test_image / test_batch_size)``."""
    solver = caffe_pb2.SolverParameter()
    fields = dict(
        train_net=train_net, test_net=[test_net],
        test_iter=[int(math.ceil(num_test_image / test_batch_size))],
        test_interval=settings.test_interval, base_lr=settings.base_lr, display=settings.display,
        max_iter=settings.max_iter, lr_policy="multistep", gamma=settings.gamma,
        momentum=settings.momentum, weight_decay=settings.weight_decay, snapshot=settings.snapshot,
        snapshot_prefix=snapshot_prefix, solver_mode=settings.solver_mode, device_id=0,
        debug_info=False, snapshot_after_train=True, test_initialization=settings.test_initialization,
        average_loss=settings.average_loss, stepvalue=list(settings.stepvalues),
        iter_size=settings.iter_size, type=settings.type, eval_type="detection", ap_version=settings.ap_version)
    if settings.type == "Adam":
        fields["momentum2"] = settings.momentum2
    for key, value in fields.items():
        assign(solver, key, value)
    return solver
