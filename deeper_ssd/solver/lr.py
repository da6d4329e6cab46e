"""Learning-rate policies exactly as Caffe's ``SGDSolver::GetLearningRate`` (docs/semantics.md,
"Learning-rate policies").

``it`` is the number of updates already done (Caffe's ``iter_`` during ApplyUpdate):

==============  ==============================================================================
fixed           ``base_lr``
step            ``base_lr * gamma ** floor(it / stepsize)`` (sets ``current_step``)
exp             ``base_lr * gamma ** it``
inv             ``base_lr * (1 + gamma * it) ** -power``
multistep       ``current_step += 1`` (at most once per call) when ``it >= stepvalue[current_step]``;
                ``base_lr * gamma ** current_step``
poly            ``base_lr * (1 - it / max_iter) ** power``
sigmoid         ``base_lr / (1 + exp(-gamma * (it - stepsize)))``
plateau         (the SSD fork's) a smoothed loss below ``minimum_loss`` records it and
                ``iter_last_event = it``; when ``it >= iter_last_event + plateau_winsize[current_step]``
                ``current_step += 1`` and ``iter_last_event = it``; ``base_lr * gamma ** current_step``
==============  ==============================================================================

The multistep/step/plateau counters are state: :class:`LearningRate` must be called exactly
once per update, in order, as Caffe does. That state is what a ``.solverstate`` stores
(``current_step``, ``minimum_loss``, ``iter_last_event``).

Arithmetic follows Caffe's types: the proto fields are float32, ``pow``/``exp`` run in double
(C++ promotes the int exponent), and the returned rate is rounded to float32 (Caffe's ``Dtype``).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..proto import caffe_pb2

__all__ = ["LearningRate", "LrPolicyError", "POLICIES", "FLT_MAX"]

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid", "plateau")
#: what SGDSolver::PreSolve sets minimum_loss to (not the proto default 1e38)
FLT_MAX = float(np.finfo(np.float32).max)


class LrPolicyError(ValueError):
    """An lr_policy Caffe would refuse (unknown name, missing or invalid field)."""


def _f32(value: float) -> float:
    return float(np.float32(value))


class LearningRate:
    """The rate of each update, with Caffe's stateful step counters.

    ``rate = lr(it, smoothed_loss)`` for ``it = 0, 1, 2, …`` (``smoothed_loss`` only matters
    for plateau). ``current_step``, ``minimum_loss`` and ``iter_last_event`` are read from and
    written to a SolverState by the trainer.
    """

    def __init__(self, param: caffe_pb2.SolverParameter):
        self.param = param
        policy = param.lr_policy
        if policy not in POLICIES:
            raise LrPolicyError(f"Unknown learning rate policy: {policy!r} (choose from "
                                f"{', '.join(POLICIES)})")
        self.policy = policy
        if policy == "step" and param.stepsize <= 0:
            raise LrPolicyError(f"lr_policy step needs stepsize > 0, got {param.stepsize}")
        if policy == "poly" and param.max_iter <= 0:
            raise LrPolicyError(f"lr_policy poly needs max_iter > 0, got {param.max_iter}")
        if policy == "multistep" and any(b < a for a, b in zip(param.stepvalue, param.stepvalue[1:])):
            raise LrPolicyError(f"stepvalue must be ascending, got {list(param.stepvalue)}")
        self.base_lr = _f32(param.base_lr)
        self.gamma = _f32(param.gamma)
        self.power = _f32(param.power)
        self.current_step = 0
        self.minimum_loss = FLT_MAX
        self.iter_last_event = 0

    def __call__(self, it: int, smoothed_loss: Optional[float] = None) -> float:
        """Caffe's GetLearningRate at update ``it`` (advances the step counters)."""
        p, base, gamma = self.param, self.base_lr, self.gamma
        policy = self.policy
        if policy == "fixed":
            rate = base
        elif policy == "step":
            self.current_step = it // p.stepsize
            rate = base * math.pow(gamma, self.current_step)
        elif policy == "exp":
            rate = base * math.pow(gamma, it)
        elif policy == "inv":
            rate = base * math.pow(_f32(1.0 + _f32(gamma * it)), -self.power)
        elif policy == "multistep":
            if self.current_step < len(p.stepvalue) and it >= p.stepvalue[self.current_step]:
                self.current_step += 1
            rate = base * math.pow(gamma, self.current_step)
        elif policy == "poly":
            rate = base * math.pow(_f32(1.0 - _f32(it / p.max_iter)), self.power)
        elif policy == "sigmoid":
            rate = base * (1.0 / (1.0 + math.exp(-gamma * _f32(it - p.stepsize))))
        else:                                                        # plateau
            if smoothed_loss is not None and smoothed_loss < self.minimum_loss:
                self.minimum_loss = _f32(smoothed_loss)
                self.iter_last_event = it
            windows = p.plateau_winsize
            if self.current_step < len(windows) and it >= self.iter_last_event + windows[self.current_step]:
                self.current_step += 1
                self.iter_last_event = it
            rate = base * math.pow(gamma, self.current_step)
        return _f32(rate)

    # -- solverstate ---------------------------------------------------------------------------
    def state(self) -> dict:
        return dict(current_step=self.current_step, minimum_loss=self.minimum_loss,
                    iter_last_event=self.iter_last_event)

    def restore(self, state: caffe_pb2.SolverState) -> None:
        self.current_step = state.current_step
        self.minimum_loss = state.minimum_loss if state.HasField("minimum_loss") else FLT_MAX
        self.iter_last_event = state.iter_last_event
