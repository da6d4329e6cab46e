"""Caffe's SGDSolver::ApplyUpdate one blob at a time, as plain torch code: the reference the
grouped ``torch._foreach_*`` update of deeper_ssd/solver/sgd.py is compared with (equal bits)."""
import math

import numpy as np
import torch


def _f32(value):
    return float(np.float32(value))


def compute(kind, param, history, n, i, g, local_rate, it):
    """ComputeUpdateValue of blob ``i`` of ``n`` (history: Caffe's order, second set at ``i + n``)."""
    m, delta = _f32(param.momentum), _f32(param.delta)
    h = history[i]
    if kind == "SGD":
        return h.mul_(m).add_(g, alpha=local_rate)
    if kind == "Nesterov":
        previous = h.clone()
        h.mul_(m).add_(g, alpha=local_rate)
        return previous.mul_(-m).add_(h, alpha=_f32(1.0 + m))
    if kind == "AdaGrad":
        h.add_(g * g)
        return g.div(h.sqrt().add_(delta)).mul_(local_rate)
    if kind == "RMSProp":
        decay = _f32(param.rms_decay)
        h.mul_(decay).add_(g * g, alpha=_f32(1.0 - decay))
        return g.div(h.sqrt().add_(delta)).mul_(local_rate)
    u = history[i + n]
    if kind == "AdaDelta":
        h.mul_(m).add_(g * g, alpha=_f32(1.0 - m))
        step = g * (u + delta).div_(h + delta).sqrt_()
        u.mul_(m).add_(step * step, alpha=_f32(1.0 - m))
        return step.mul_(local_rate)
    assert kind == "Adam"
    b2, t = _f32(param.momentum2), it + 1
    correction = _f32(math.sqrt(1.0 - math.pow(b2, t)) / (1.0 - math.pow(m, t)))
    h.mul_(m).add_(g, alpha=_f32(1.0 - m))
    u.mul_(b2).add_(g * g, alpha=_f32(1.0 - b2))
    return h.div(u.sqrt().add_(delta)).mul_(_f32(local_rate * correction))


@torch.no_grad()
def apply(kind, param, blobs, grads, lr_mults, decay_mults, history, rate, it, clip_scale=None):
    """One update of ``blobs`` (in place) from ``grads`` (consumed), blob by blob."""
    decay, iter_size = _f32(param.weight_decay), max(1, param.iter_size)
    for i, (w, g) in enumerate(zip(blobs, grads)):
        if clip_scale is not None:
            g.mul_(clip_scale)
        if iter_size != 1:
            g.mul_(_f32(1.0 / iter_size))
        local_decay = _f32(decay * _f32(decay_mults[i]))
        if local_decay:
            g.add_(torch.sign(w) if param.regularization_type == "L1" else w, alpha=local_decay)
        w.sub_(compute(kind, param, history, len(blobs), i, g, _f32(_f32(rate) * _f32(lr_mults[i])), it))
