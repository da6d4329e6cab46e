"""Caffe's solver in PyTorch: update rules (:mod:`.sgd`), learning-rate policies (:mod:`.lr`),
the training loop with tests, snapshots, resume and signals (:mod:`.trainer`) and multi-GPU
data parallelism (:mod:`.distributed`)."""
from .lr import LearningRate, LrPolicyError
from .sgd import RULES, SolverTypeError, UpdateRule, make_rule, solver_type
from .trainer import (NonFiniteError, Progress, SignalActions, SnapshotError, Solver, SolverError, TrainingStopped,
                      TrainState, read_solver)

__all__ = ["LearningRate", "LrPolicyError", "RULES", "SolverTypeError", "UpdateRule", "make_rule",
           "solver_type", "NonFiniteError", "Progress", "SignalActions", "SnapshotError", "Solver",
           "SolverError", "TrainingStopped", "TrainState", "read_solver"]
