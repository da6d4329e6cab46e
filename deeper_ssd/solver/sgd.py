"""Caffe's parameter updates: SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam (docs/semantics.md,
"Solver update rules").

One :class:`UpdateRule` per solver ``type`` applies ``SGDSolver::ApplyUpdate`` after the
gradients of an iteration are accumulated:

1. ClipGradients: with ``clip_gradients >= 0``, every gradient is scaled by
   ``clip / ||g||`` when the global L2 norm ``||g||`` (all learnable blobs, before step 2)
   exceeds ``clip``;
2. Normalize: ``g /= iter_size``;
3. Regularize: ``g += weight_decay * decay_mult * w`` (L2) or ``* sign(w)`` (L1);
4. ComputeUpdateValue with ``local_rate = rate * lr_mult`` — SGD keeps the *lr-scaled* step:
   ``h = momentum * h + local_rate * g``, update ``h`` (so an lr drop does not rescale the
   momentum, unlike ``torch.optim.SGD``); the other rules as their Caffe sources;
5. ``w -= update``.

Every learnable blob takes part (also those with ``lr_mult 0`` such as BatchNorm statistics:
their gradient is zero, and Caffe keeps history for them). History blobs follow Caffe's order:
one per learnable blob, AdaDelta and Adam append a second set (squared updates; second moment).
Scalars are rounded to float32 as Caffe's ``Dtype`` arithmetic does.

The blobs are updated in groups of equal ``(lr_mult, decay_mult)`` with ``torch._foreach_*``
operations (a few kernel launches per group on CUDA instead of several per blob); each is the
same element-wise operation with the same scalar as Caffe's per-blob step, so the values are
those of a per-blob loop (tests/support/solver_reference.py, compared in tests/test_solver.py).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Type

import numpy as np
import torch

from ..proto import caffe_pb2

__all__ = ["UpdateRule", "SolverTypeError", "RULES", "solver_type", "make_rule"]


class SolverTypeError(ValueError):
    """An unknown solver type, or settings Caffe refuses for it."""


def _f32(value: float) -> float:
    return float(np.float32(value))


def solver_type(param: caffe_pb2.SolverParameter) -> str:
    """The solver ``type`` string, upgrading the deprecated ``solver_type`` enum as Caffe does."""
    if param.HasField("solver_type"):
        legacy = {caffe_pb2.SolverParameter.SGD: "SGD", caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
                  caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad", caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
                  caffe_pb2.SolverParameter.ADADELTA: "AdaDelta",
                  caffe_pb2.SolverParameter.ADAM: "Adam"}[param.solver_type]
        if param.HasField("type") and param.type != legacy:
            raise SolverTypeError(f"solver_type {legacy} (deprecated enum) and type {param.type!r} "
                                  "are both set; keep only 'type'")
        return legacy
    return param.type


class UpdateRule:
    """Caffe's SGD solver; subclasses change :meth:`compute` (ComputeUpdateValue).

    ``params``: ``deeper_ssd.net.LearnableParam`` entries (``blob``, ``lr_mult``,
    ``decay_mult``) in Caffe's learnable-parameter order. ``history`` holds
    ``histories * len(params)`` tensors shaped like the blobs.
    """

    type_name = "SGD"
    histories = 1

    def __init__(self, param: caffe_pb2.SolverParameter, params: Sequence):
        self.param = param
        self.params = list(params)
        if param.regularization_type not in ("L1", "L2"):
            raise SolverTypeError(f"Unknown regularization type: {param.regularization_type!r} (L1 or L2)")
        self.check(param)
        self.momentum = _f32(param.momentum)
        self.weight_decay = _f32(param.weight_decay)
        self.iter_size = max(1, param.iter_size)
        self.clip = _f32(param.clip_gradients)
        self._lr_mults = [_f32(p.lr_mult) for p in self.params]
        self._decays = [_f32(self.weight_decay * _f32(p.decay_mult)) for p in self.params]
        groups: Dict[tuple, List[int]] = {}
        for i, key in enumerate(zip(self._lr_mults, self._decays)):
            groups.setdefault(key, []).append(i)
        #: (blob indices, lr_mult, decay) of the blobs updated together
        self.groups = [(indices, lr_mult, decay) for (lr_mult, decay), indices in groups.items()]
        self.history: List[torch.Tensor] = [torch.zeros_like(p.blob.detach())
                                            for _ in range(self.histories) for p in self.params]

    @classmethod
    def check(cls, param: caffe_pb2.SolverParameter) -> None:
        """Settings Caffe's constructor of this solver type refuses."""

    # -- the update ----------------------------------------------------------------------------
    def gradients(self) -> List[torch.Tensor]:
        """Each blob's accumulated gradient (zeros where autograd left none)."""
        return [p.blob.grad if p.blob.grad is not None else torch.zeros_like(p.blob) for p in self.params]

    def gradient_sumsq(self) -> torch.Tensor:
        """Sum of squares of all gradients (a device scalar, no host sync): ClipGradients'
        ``sumsq_diff`` before normalisation."""
        grads = [p.blob.grad for p in self.params if p.blob.grad is not None]
        if not grads:
            return torch.zeros((), device=self.params[0].blob.device if self.params else None)
        return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()

    @torch.no_grad()
    def apply(self, rate: float, it: int, grad_norm: Optional[float] = None) -> Optional[float]:
        """One update at learning rate ``rate`` (update ``it``, 0-based). ``grad_norm`` is the
        global gradient norm when already known (see :meth:`gradient_sumsq`). Returns the clip
        scale factor when gradients were clipped, else None."""
        grads = self.gradients()
        scale = None
        if self.clip >= 0:
            norm = grad_norm if grad_norm is not None else math.sqrt(float(self.gradient_sumsq()))
            norm = _f32(norm)
            if norm > self.clip:
                scale = _f32(self.clip / norm)
                torch._foreach_mul_(grads, scale)
        rate = _f32(rate)
        normalize = _f32(1.0 / self.iter_size) if self.iter_size != 1 else None
        l1 = self.param.regularization_type == "L1"
        for indices, lr_mult, decay in self.groups:
            g = [grads[i] for i in indices]
            w = [self.params[i].blob for i in indices]
            if normalize is not None:
                torch._foreach_mul_(g, normalize)
            if decay:
                torch._foreach_add_(g, torch._foreach_sign(w) if l1 else w, alpha=decay)
            torch._foreach_sub_(w, self.compute(indices, g, _f32(rate * lr_mult), it))
        return scale

    def _history(self, indices: Sequence[int], set_index: int = 0) -> List[torch.Tensor]:
        return [self.history[i + set_index * len(self.params)] for i in indices]

    def compute(self, indices: Sequence[int], g: List[torch.Tensor], local_rate: float,
                it: int) -> List[torch.Tensor]:
        """ComputeUpdateValue for the blobs ``indices`` (gradients ``g``): the values
        subtracted from them."""
        h = self._history(indices)
        torch._foreach_mul_(h, self.momentum)
        torch._foreach_add_(h, g, alpha=local_rate)
        return h

    # -- solverstate ---------------------------------------------------------------------------
    def load_history(self, arrays: Sequence[np.ndarray]) -> None:
        """Restore history blobs (SolverState.history order); counts and sizes must match."""
        if len(arrays) != len(self.history):
            raise SolverTypeError(f"Incorrect length of history blobs: the state has {len(arrays)}, "
                                  f"the {self.type_name} solver of this net needs {len(self.history)}")
        for i, (h, a) in enumerate(zip(self.history, arrays)):
            if a.size != h.numel():
                p = self.params[i % len(self.params)]
                raise SolverTypeError(f"history blob {i} (layer '{p.layer}' blob {p.index}) holds "
                                      f"{a.size} values, the blob has shape {tuple(h.shape)}")
            h.copy_(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(h.shape)))


class Nesterov(UpdateRule):
    """``h' = m*h + lr*g``; update ``(1+m)*h' - m*h``."""
    type_name = "Nesterov"

    def compute(self, indices, g, local_rate, it):
        h = self._history(indices)
        update = torch._foreach_mul(h, -self.momentum)              # -m * previous h
        torch._foreach_mul_(h, self.momentum)
        torch._foreach_add_(h, g, alpha=local_rate)
        torch._foreach_add_(update, h, alpha=_f32(1.0 + self.momentum))
        return update


class AdaGrad(UpdateRule):
    """``h += g²``; update ``lr * g / (sqrt(h) + delta)``."""
    type_name = "AdaGrad"

    @classmethod
    def check(cls, param):
        if param.momentum != 0:
            raise SolverTypeError("Momentum cannot be used with AdaGrad.")

    def compute(self, indices, g, local_rate, it):
        h = self._history(indices)
        torch._foreach_add_(h, torch._foreach_mul(g, g))
        return _scaled_ratio(g, h, _f32(self.param.delta), local_rate)


class RMSProp(UpdateRule):
    """``h = d*h + (1-d)*g²``; update ``lr * g / (sqrt(h) + delta)``."""
    type_name = "RMSProp"

    @classmethod
    def check(cls, param):
        if param.momentum != 0:
            raise SolverTypeError("Momentum cannot be used with RMSProp.")
        if not 0 <= param.rms_decay < 1:
            raise SolverTypeError(f"rms_decay should lie in [0, 1), got {param.rms_decay}")

    def compute(self, indices, g, local_rate, it):
        decay = _f32(self.param.rms_decay)
        h = self._history(indices)
        torch._foreach_mul_(h, decay)
        torch._foreach_add_(h, torch._foreach_mul(g, g), alpha=_f32(1.0 - decay))
        return _scaled_ratio(g, h, _f32(self.param.delta), local_rate)


class AdaDelta(UpdateRule):
    """History of squared gradients ``h`` and of squared updates ``u`` (second set):
    ``h = m*h + (1-m)*g²``; ``d = g * sqrt((u + delta) / (h + delta))``;
    ``u = m*u + (1-m)*d²``; update ``lr * d``."""
    type_name = "AdaDelta"
    histories = 2

    def compute(self, indices, g, local_rate, it):
        m, delta = self.momentum, _f32(self.param.delta)
        h, u = self._history(indices), self._history(indices, 1)
        torch._foreach_mul_(h, m)
        torch._foreach_add_(h, torch._foreach_mul(g, g), alpha=_f32(1.0 - m))
        ratio = torch._foreach_add(u, delta)
        torch._foreach_div_(ratio, torch._foreach_add(h, delta))
        torch._foreach_sqrt_(ratio)
        step = torch._foreach_mul(g, ratio)
        torch._foreach_mul_(u, m)
        torch._foreach_add_(u, torch._foreach_mul(step, step), alpha=_f32(1.0 - m))
        torch._foreach_mul_(step, local_rate)
        return step


class Adam(UpdateRule):
    """``m = b1*m + (1-b1)*g``; ``v = b2*v + (1-b2)*g²``; update
    ``lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + delta)`` with ``t = it + 1``."""
    type_name = "Adam"
    histories = 2

    def __init__(self, param: caffe_pb2.SolverParameter, params: Sequence):
        super().__init__(param, params)
        for name in ("momentum", "momentum2"):
            value = getattr(param, name)
            if not 0 <= value < 1:          # the bias correction takes sqrt(1 - momentum2^t)
                raise SolverTypeError(f"Adam needs 0 <= {name} < 1, got {value:g}")

    def compute(self, indices, g, local_rate, it):
        b1, b2 = self.momentum, _f32(self.param.momentum2)
        t = it + 1
        correction = _f32(math.sqrt(1.0 - math.pow(b2, t)) / (1.0 - math.pow(b1, t)))   # double, as C++
        m, v = self._history(indices), self._history(indices, 1)
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, g, alpha=_f32(1.0 - b1))
        torch._foreach_mul_(v, b2)
        torch._foreach_add_(v, torch._foreach_mul(g, g), alpha=_f32(1.0 - b2))
        return _scaled_ratio(m, v, _f32(self.param.delta), _f32(local_rate * correction))


def _scaled_ratio(numerators: List[torch.Tensor], squares: List[torch.Tensor], delta: float,
                  rate: float) -> List[torch.Tensor]:
    """``rate * n / (sqrt(s) + delta)`` per blob (AdaGrad, RMSProp, Adam)."""
    denominators = torch._foreach_sqrt(squares)
    torch._foreach_add_(denominators, delta)
    out = torch._foreach_div(numerators, denominators)
    torch._foreach_mul_(out, rate)
    return out


RULES: Dict[str, Type[UpdateRule]] = {cls.type_name: cls for cls in
                                      (UpdateRule, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam)}


def make_rule(param: caffe_pb2.SolverParameter, params: Sequence) -> UpdateRule:
    """The update rule of ``param``'s solver type for ``params``."""
    name = solver_type(param)
    try:
        cls = RULES[name]
    except KeyError:
        raise SolverTypeError(f"Unknown solver type: {name!r} (choose from {', '.join(RULES)})") from None
    return cls(param, params)
