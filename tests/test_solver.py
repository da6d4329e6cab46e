"""The solver's arithmetic: Caffe's update rules and learning-rate policies.

* SGD against ``torch.optim.SGD`` with the momentum-rescale correction (same trajectory), and
  without it (Caffe's quirk: momentum is not rescaled at an lr drop);
* every lr policy at stepvalue-1, stepvalue, stepvalue+1 (or stepsize for the others) against
  Caffe's formula, multistep advancing at most one step per update;
* Nesterov, AdaGrad, RMSProp, AdaDelta, Adam, L1, clip_gradients and iter_size against the
  formulas of their Caffe sources;
* with the oracle: a few SGD steps (momentum, weight decay, lr_mult/decay_mult, an lr drop) and
  the .solverstate against real Caffe, both ways.
"""
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from deeper_ssd import io
from deeper_ssd.proto import caffe_pb2
from deeper_ssd.solver import LearningRate, LrPolicyError, SolverTypeError, make_rule
from deeper_ssd.solver.lr import FLT_MAX


@dataclass
class P:
    """A LearnableParam look-alike."""
    layer: str
    index: int
    blob: torch.nn.Parameter
    lr_mult: float
    decay_mult: float


def solver(**fields) -> caffe_pb2.SolverParameter:
    param = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="fixed", momentum=0.9, weight_decay=0.01)
    for key, value in fields.items():
        if isinstance(value, list):
            getattr(param, key).extend(value)
        else:
            setattr(param, key, value)
    return param


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [((3, 2), 1.0, 1.0), ((3,), 2.0, 0.0), ((4,), 0.5, 3.0)]
    return [P(f"l{i}", 0, torch.nn.Parameter(torch.randn(s, generator=g)), lr, dm)
            for i, (s, lr, dm) in enumerate(shapes)]


def gradient(ps, step):
    """A deterministic gradient that depends on the weights (a quadratic bowl plus noise)."""
    g = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.blob.grad = (p.blob.detach() * 0.5 + torch.randn(p.blob.shape, generator=g)).float()


# ---------------------------------------------------------------------------------------------
# SGD vs torch.optim.SGD

def _run_ours(param, steps):
    ps = params()
    rule, lr = make_rule(param, ps), LearningRate(param)
    for it in range(steps):
        gradient(ps, it)
        rule.apply(lr(it), it)
    return [p.blob.detach().clone() for p in ps]


def _run_torch(param, steps, rescale):
    ps = params()
    lr = LearningRate(param)
    groups = [dict(params=[p.blob], lr=param.base_lr * p.lr_mult,
                   weight_decay=float(np.float32(param.weight_decay)) * p.decay_mult) for p in ps]
    opt = torch.optim.SGD(groups, lr=param.base_lr, momentum=float(np.float32(param.momentum)))
    previous = None
    for it in range(steps):
        rate = lr(it)
        if rescale and previous is not None and rate != previous:
            for group in opt.param_groups:                   # Caffe keeps lr-scaled momentum
                for p in group["params"]:
                    buf = opt.state[p].get("momentum_buffer")
                    if buf is not None:
                        buf.mul_(previous / rate)
        for group, p in zip(opt.param_groups, ps):
            group["lr"] = rate * p.lr_mult
        previous = rate
        gradient(ps, it)
        opt.step()
    return [p.blob.detach().clone() for p in ps]


def test_sgd_follows_torch_sgd_with_the_momentum_rescale_correction():
    param = solver(lr_policy="multistep", gamma=0.1, stepvalue=[4, 7])
    ours = _run_ours(param, 10)
    for a, b in zip(ours, _run_torch(param, 10, rescale=True)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7)
    plain = _run_torch(param, 10, rescale=False)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, plain)) > 1e-3, \
        "Caffe does not rescale the momentum at an lr drop; torch.optim.SGD effectively does"


def test_sgd_one_step_is_caffes_formula():
    param = solver()
    ps = params()
    w0 = [p.blob.detach().clone() for p in ps]
    gradient(ps, 0)
    g0 = [p.blob.grad.clone() for p in ps]
    rule = make_rule(param, ps)
    rule.apply(0.1, 0)
    for p, w, g, h in zip(ps, w0, g0, rule.history):
        v = np.float32(0.1 * p.lr_mult) * (g + np.float32(0.01 * p.decay_mult) * w)
        torch.testing.assert_close(h, v)
        torch.testing.assert_close(p.blob.detach(), w - v)


def test_lr_mult_zero_blobs_and_missing_gradients():
    """Statistics blobs (lr_mult 0, no gradient) keep their value; a trained blob without a
    gradient still decays (Caffe's diff is zero, weight decay is added)."""
    stats = P("bn", 0, torch.nn.Parameter(torch.ones(3), requires_grad=False), 0.0, 0.0)
    unused = P("c", 0, torch.nn.Parameter(torch.ones(2)), 1.0, 1.0)
    rule = make_rule(solver(momentum=0.0), [stats, unused])
    rule.apply(0.1, 0)
    assert torch.equal(stats.blob, torch.ones(3))
    torch.testing.assert_close(unused.blob.detach(), torch.full((2,), 1 - np.float32(0.1) * np.float32(0.01)))


# ---------------------------------------------------------------------------------------------
# learning-rate policies

def caffe_rate(p: caffe_pb2.SolverParameter, it: int) -> float:
    """Caffe's formulas written from sgd_solver.cpp (closed form)."""
    base, gamma, power = p.base_lr, p.gamma, p.power
    if p.lr_policy == "fixed":
        return base
    if p.lr_policy == "step":
        return base * gamma ** (it // p.stepsize)
    if p.lr_policy == "multistep":
        return base * gamma ** sum(it >= s for s in p.stepvalue)
    if p.lr_policy == "exp":
        return base * gamma ** it
    if p.lr_policy == "inv":
        return base * (1 + gamma * it) ** (-power)
    if p.lr_policy == "poly":
        return base * (1 - it / p.max_iter) ** power
    if p.lr_policy == "sigmoid":
        return base / (1 + math.exp(-gamma * (it - p.stepsize)))
    raise AssertionError(p.lr_policy)


POLICIES = {
    "fixed": dict(stepsize=50),
    "step": dict(gamma=0.5, stepsize=50),
    "multistep": dict(gamma=0.1, stepvalue=[30, 50, 80]),
    "exp": dict(gamma=0.99, stepsize=50),
    "inv": dict(gamma=0.001, power=0.75, stepsize=50),
    "poly": dict(power=2.0, max_iter=200, stepsize=50),
    "sigmoid": dict(gamma=-0.05, stepsize=50),
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_lr_around_the_step_equals_caffes_formula(policy):
    p = solver(base_lr=0.01, lr_policy=policy, **POLICIES[policy])
    lr = LearningRate(p)
    pivots = list(p.stepvalue) or [p.stepsize]
    rates = [lr(it) for it in range(max(pivots) + 2)]       # called once per update, in order
    for pivot in pivots:
        for it in (pivot - 1, pivot, pivot + 1):
            assert rates[it] == pytest.approx(caffe_rate(p, it), rel=1e-6), (policy, it)
            assert rates[it] == float(np.float32(rates[it]))          # Caffe's Dtype
    if policy in ("step", "multistep"):
        assert rates[pivots[0] - 1] != rates[pivots[0]]              # the boundary is iter >= step


def test_multistep_advances_at_most_one_step_per_update():
    lr = LearningRate(solver(lr_policy="multistep", gamma=0.1, stepvalue=[1, 2, 3]))
    assert lr(10) == pytest.approx(0.01) and lr.current_step == 1
    assert lr(11) == pytest.approx(0.001) and lr.current_step == 2
    assert lr(12) == pytest.approx(0.0001) and lr.current_step == 3
    assert lr(13) == pytest.approx(0.0001) and lr.current_step == 3


def test_plateau_drops_after_a_window_without_a_new_minimum():
    lr = LearningRate(solver(lr_policy="plateau", gamma=0.5, plateau_winsize=[3, 3]))
    assert lr.minimum_loss == FLT_MAX
    losses = [5.0, 4.0, 4.5, 4.5, 4.5, 4.5, 4.5]
    rates = [lr(it, loss) for it, loss in enumerate(losses)]
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05])   # 4 >= 1 + 3
    assert lr.iter_last_event == 4 and lr.minimum_loss == 4.0


def test_unknown_or_incomplete_policies_are_refused():
    with pytest.raises(LrPolicyError, match="Unknown learning rate policy: 'cosine'"):
        LearningRate(solver(lr_policy="cosine"))
    with pytest.raises(LrPolicyError, match="stepsize > 0"):
        LearningRate(solver(lr_policy="step"))
    with pytest.raises(LrPolicyError, match="ascending"):
        LearningRate(solver(lr_policy="multistep", stepvalue=[5, 3]))


# ---------------------------------------------------------------------------------------------
# the other update rules, L1, clipping, iter_size

def one_update(type_name, steps=2, **fields):
    ps = params()
    param = solver(type=type_name, **fields)
    rule = make_rule(param, ps)
    trace = []
    for it in range(steps):
        gradient(ps, it)
        g = [p.blob.grad.double().numpy().copy() for p in ps]
        w = [p.blob.detach().double().numpy().copy() for p in ps]
        rule.apply(float(param.base_lr), it)
        trace.append((w, g, [p.blob.detach().double().numpy() for p in ps]))
    return ps, param, trace


def check(type_name, update, state_count=1, **fields):
    """``update(i, it, w, g_with_decay, local_rate, state)`` -> the value Caffe subtracts."""
    ps, param, trace = one_update(type_name, **fields)
    state = [[np.zeros(p.blob.shape) for _ in range(state_count)] for p in ps]
    for it, (w0, g0, w1) in enumerate(trace):
        for i, p in enumerate(ps):
            g = g0[i] + float(np.float32(param.weight_decay)) * p.decay_mult * w0[i]
            expected = w0[i] - update(i, it, w0[i], g, param.base_lr * p.lr_mult, state[i], param)
            np.testing.assert_allclose(w1[i], expected, rtol=1e-5, atol=1e-6, err_msg=f"{type_name} {it} {i}")


def test_nesterov():
    def update(i, it, w, g, lr, s, p):
        previous = s[0].copy()
        s[0] = p.momentum * s[0] + lr * g
        return (1 + p.momentum) * s[0] - p.momentum * previous
    check("Nesterov", update)


def test_adagrad():
    def update(i, it, w, g, lr, s, p):
        s[0] += g * g
        return lr * g / (np.sqrt(s[0]) + p.delta)
    check("AdaGrad", update, momentum=0.0)
    with pytest.raises(SolverTypeError, match="Momentum cannot be used with AdaGrad"):
        make_rule(solver(type="AdaGrad"), params())


def test_rmsprop():
    def update(i, it, w, g, lr, s, p):
        s[0] = p.rms_decay * s[0] + (1 - p.rms_decay) * g * g
        return lr * g / (np.sqrt(s[0]) + p.delta)
    check("RMSProp", update, momentum=0.0, rms_decay=0.9)


def test_adadelta_keeps_two_histories():
    def update(i, it, w, g, lr, s, p):
        m = p.momentum
        s[0] = m * s[0] + (1 - m) * g * g
        step = g * np.sqrt((s[1] + p.delta) / (s[0] + p.delta))
        s[1] = m * s[1] + (1 - m) * step * step
        return lr * step
    check("AdaDelta", update, state_count=2, delta=1e-6, momentum=0.95)
    assert len(make_rule(solver(type="AdaDelta"), params()).history) == 6


def test_adam_with_bias_correction():
    def update(i, it, w, g, lr, s, p):
        b1, b2, t = p.momentum, p.momentum2, it + 1
        s[0] = b1 * s[0] + (1 - b1) * g
        s[1] = b2 * s[1] + (1 - b2) * g * g
        correction = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        return lr * correction * s[0] / (np.sqrt(s[1]) + p.delta)
    check("Adam", update, state_count=2, base_lr=0.01)


def test_l1_regularization_adds_the_sign():
    ps = params()
    w0 = [p.blob.detach().clone() for p in ps]
    rule = make_rule(solver(momentum=0.0, regularization_type="L1"), ps)
    for p in ps:
        p.blob.grad = torch.zeros_like(p.blob)
    rule.apply(0.1, 0)
    for p, w in zip(ps, w0):
        decay = np.float32(0.01 * p.decay_mult)
        torch.testing.assert_close(p.blob.detach(), w - np.float32(0.1 * p.lr_mult) * decay * torch.sign(w))
    with pytest.raises(SolverTypeError, match="Unknown regularization type"):
        make_rule(solver(regularization_type="L3"), ps)


def test_clip_gradients_scales_by_the_global_norm_before_iter_size():
    ps = params()
    for p in ps:
        p.blob.grad = torch.full(p.blob.shape, 2.0)
    norm = math.sqrt(sum(4.0 * p.blob.numel() for p in ps))
    w0 = [p.blob.detach().clone() for p in ps]
    rule = make_rule(solver(momentum=0.0, weight_decay=0.0, clip_gradients=1.0, iter_size=2), ps)
    scale = rule.apply(0.1, 0)
    assert scale == pytest.approx(1.0 / norm, rel=1e-6)
    for p, w in zip(ps, w0):
        step = np.float32(0.1 * p.lr_mult) * (2.0 * scale / 2)           # clip, then / iter_size
        torch.testing.assert_close(p.blob.detach(), w - step, rtol=1e-6, atol=1e-7)


def test_solver_type_enum_upgrade():
    assert make_rule(solver(solver_type=caffe_pb2.SolverParameter.NESTEROV), params()).type_name == "Nesterov"
    with pytest.raises(SolverTypeError, match="both set"):
        make_rule(solver(solver_type=caffe_pb2.SolverParameter.ADAM, type="SGD"), params())
    with pytest.raises(SolverTypeError, match="Unknown solver type: 'LBFGS'"):
        make_rule(solver(type="LBFGS"), params())


# ---------------------------------------------------------------------------------------------
# against real Caffe

ORACLE_NET = """
name: "sgd_check"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 5 dim: 5 } } }
layer { name: "target" type: "Input" top: "target" input_param { shape { dim: 4 dim: 2 dim: 5 dim: 5 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  param { lr_mult: 0.5 decay_mult: 3 } param { lr_mult: 0 decay_mult: 0 }
  convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "conv2" bottom: "target" top: "loss" }
"""
ORACLE_SOLVER = """
net: "net.prototxt"
base_lr: 0.05
lr_policy: "multistep"
gamma: 0.1
stepvalue: 2
momentum: 0.9
weight_decay: 0.01
max_iter: 100
display: 0
snapshot_prefix: "snap"
solver_mode: CPU
random_seed: 1
"""
MULTS = [(1, 1), (2, 0), (0.5, 3), (0, 0)]


def _oracle_inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((4, 3, 5, 5)).astype(np.float32),
            rng.standard_normal((4, 2, 5, 5)).astype(np.float32),
            [rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((4, 3, 3, 3), (4,), (2, 4, 1, 1), (2,))])


def _our_steps(x, y, weights, steps):
    """The oracle net's gradient with plain torch, our SGD update."""
    blobs = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
    ps = [P(f"b{i}", 0, b, lr, dm) for i, (b, (lr, dm)) in enumerate(zip(blobs, MULTS))]
    param = io.parse_text(ORACLE_SOLVER, caffe_pb2.SolverParameter())
    rule, lr = make_rule(param, ps), LearningRate(param)
    for it in range(steps):
        for b in blobs:
            b.grad = None
        h = torch.nn.functional.conv2d(torch.from_numpy(x), blobs[0], blobs[1], padding=1)
        out = torch.nn.functional.conv2d(h, blobs[2], blobs[3])
        loss = ((out - torch.from_numpy(y)) ** 2).sum() / (2 * 4)           # EuclideanLoss
        loss.backward()
        rule.apply(lr(it), it)
    return [b.detach().numpy() for b in blobs], rule, lr


def test_sgd_steps_and_solverstate_match_real_caffe(oracle, tmp_path):
    x, y, weights = _oracle_inputs()
    files = {"net.prototxt": ORACLE_NET, "solver.prototxt": ORACLE_SOLVER, "x.npy": x, "y.npy": y}
    files.update({f"w{i}.npy": w for i, w in enumerate(weights)})
    out = oracle.run("""
solver = caffe.SGDSolver("solver.prototxt")
net = solver.net
for i, (name, k) in enumerate([("conv1", 0), ("conv1", 1), ("conv2", 0), ("conv2", 1)]):
    net.params[name][k].data[...] = np.load("w%d.npy" % i)
net.blobs["data"].data[...] = np.load("x.npy")
net.blobs["target"].data[...] = np.load("y.npy")
solver.step(4)
for i, (name, k) in enumerate([("conv1", 0), ("conv1", 1), ("conv2", 0), ("conv2", 1)]):
    out["w%d" % i] = net.params[name][k].data
solver.snapshot()
out["state"] = np.frombuffer(open("snap_iter_4.solverstate", "rb").read(), np.uint8)
""", files)
    ours, rule, lr = _our_steps(x, y, weights, 4)
    for i, w in enumerate(ours):
        np.testing.assert_allclose(w, out[f"w{i}"], rtol=1e-5, atol=1e-6, err_msg=f"blob {i}")
    state = caffe_pb2.SolverState.FromString(out["state"].tobytes())
    assert state.iter == 4 and state.current_step == lr.current_step == 1
    assert state.learned_net == "snap_iter_4.caffemodel"
    assert len(state.history) == len(rule.history) == 4
    for h, blob in zip(rule.history, state.history):
        np.testing.assert_allclose(io.blob_to_array(blob).reshape(h.shape), h.numpy(), rtol=1e-5, atol=1e-7)


def test_caffe_resumes_from_our_solverstate(oracle, tmp_path):
    """Our history/iter/current_step layout is what Caffe restores: 2 steps here, a snapshot in
    our format, 2 more steps in Caffe == 4 steps here."""
    x, y, weights = _oracle_inputs()
    mid, rule, lr = _our_steps(x, y, weights, 2)
    model = caffe_pb2.NetParameter(name="sgd_check")
    for name, blobs in (("conv1", mid[:2]), ("conv2", mid[2:])):
        layer = model.layer.add(name=name, type="Convolution")
        layer.blobs.extend(io.array_to_blob(b) for b in blobs)
    io.write_caffemodel(model, tmp_path / "mid.caffemodel")
    state = caffe_pb2.SolverState(iter=2, learned_net="mid.caffemodel", current_step=lr.current_step,
                                  minimum_loss=FLT_MAX, iter_last_event=0)
    state.history.extend(io.array_to_blob(h) for h in rule.history)
    io.write_solverstate(state, tmp_path / "mid.solverstate")
    out = oracle.run("""
solver = caffe.SGDSolver("solver.prototxt")
solver.restore("mid.solverstate")
net = solver.net
net.blobs["data"].data[...] = np.load("x.npy")
net.blobs["target"].data[...] = np.load("y.npy")
solver.step(2)
out["iter"] = np.array(solver.iter)
for i, (name, k) in enumerate([("conv1", 0), ("conv1", 1), ("conv2", 0), ("conv2", 1)]):
    out["w%d" % i] = net.params[name][k].data
""", {"net.prototxt": ORACLE_NET, "solver.prototxt": ORACLE_SOLVER, "x.npy": x, "y.npy": y,
      "mid.caffemodel": tmp_path / "mid.caffemodel", "mid.solverstate": tmp_path / "mid.solverstate"})
    assert int(out["iter"]) == 4
    full, _, _ = _our_steps(x, y, weights, 4)
    for i, w in enumerate(full):
        np.testing.assert_allclose(out[f"w{i}"], w, rtol=1e-5, atol=1e-6, err_msg=f"blob {i}")


# ---------------------------------------------------------------------------------------------
# the grouped foreach update equals Caffe's per-blob loop bit for bit

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")])])
@pytest.mark.parametrize("kind", ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"])
@pytest.mark.parametrize("regularization, iter_size", [("L2", 1), ("L1", 3)])
def test_foreach_update_equals_the_per_blob_loop(kind, regularization, iter_size, device):
    from support import solver_reference
    momentum = 0.0 if kind in ("AdaGrad", "RMSProp") else 0.9
    param = solver(type=kind, momentum=momentum, momentum2=0.999, delta=1e-6, rms_decay=0.98,
                   regularization_type=regularization, iter_size=iter_size, weight_decay=0.0005,
                   clip_gradients=5.0 if regularization == "L1" else -1.0)
    g = torch.Generator().manual_seed(7)
    # mixed groups: (lr_mult, decay_mult) pairs shared by several blobs, one of each on its own,
    # an lr_mult 0 blob, shapes from scalars to conv-sized
    mults = [(1, 1), (2, 0), (1, 1), (0, 0), (2, 0), (0.1, 3), (1, 1)]
    shapes = [(16, 8, 3, 3), (16,), (32, 16, 1, 1), (5,), (32,), (7, 3), ()]
    ps = [P(f"l{i}", 0, torch.nn.Parameter(torch.randn(s, generator=g).to(device)), lr, dm)
          for i, ((lr, dm), s) in enumerate(zip(mults, shapes))]
    blobs = [p.blob.detach().clone() for p in ps]
    rule = make_rule(param, ps)
    history = [torch.zeros_like(b) for _ in range(rule.histories) for b in blobs]
    assert len(rule.groups) == 4
    for it in range(4):
        grads = [(torch.randn(b.shape, generator=g) * 10 ** (it - 2)).to(device) for b in blobs]
        for p, grad in zip(ps, grads):
            p.blob.grad = grad.clone()
        rate = 0.01 * (it + 1)
        sumsq = float(rule.gradient_sumsq())                     # as the trainer passes it
        scale = rule.apply(rate, it, grad_norm=math.sqrt(sumsq))
        assert (scale is not None) == (regularization == "L1" and it >= 2)     # clipped when large
        solver_reference.apply(kind, param, blobs, grads, [m[0] for m in mults], [m[1] for m in mults],
                               history, rate, it, clip_scale=scale)
        for p, b in zip(ps, blobs):
            assert torch.equal(p.blob.detach().view(torch.int32), b.view(torch.int32)), (kind, it, p.layer)
        for h, ref in zip(rule.history, history):
            assert torch.equal(h.view(torch.int32), ref.view(torch.int32))
