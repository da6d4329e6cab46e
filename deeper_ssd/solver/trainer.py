"""Caffe's Solver: the training loop, tests, snapshots, resume and signals (docs/semantics.md,
"Solver iteration", "Solver state and resume").

    solver = Solver.from_file("prototxt/deeper_ssd500_tiny/solver.prototxt", device="cpu")
    solver.load_weights(["vgg.caffemodel"])          # optional: caffe train --weights
    solver.solve(resume="snap_iter_500.solverstate")  # optional: caffe train --snapshot

The loop is ``Solver::Step`` (solver.cpp): at iteration ``iter`` (= updates done) test when
``iter % test_interval == 0`` (at 0 only with ``test_initialization``), run ``iter_size``
forward/backward passes accumulating gradients, smooth the loss over ``average_loss``
iterations, log on ``display`` iterations, apply the update (:mod:`.sgd`, rate from :mod:`.lr`),
``iter += 1``, snapshot every ``snapshot`` updates. After ``max_iter``: a final snapshot
(``snapshot_after_train``), one more display forward and a final test, as Caffe.

Log lines are Caffe's (``Iteration N, loss = L``, ``    Train net output #k: name = v (* w =
x loss)``, ``Iteration N, lr = r``, ``Iteration N, Testing net (#i)``, ``    Test net output
#k: detection_eval = m``, ``class<c>: AP`` with ``show_per_class_result``).

Snapshots: ``<prefix>_iter_<N>.caffemodel`` (the train net), ``<prefix>_iter_<N>.solverstate``
(Caffe's SolverState: iter, learned_net, history, current_step, minimum_loss, iter_last_event)
and, beside them, ``<prefix>_iter_<N>.trainstate.json`` with what a SolverState lacks for an
exact resume: the random seed, each data layer's read position, torch's RNG state and the
smoothed-loss window (format in :class:`TrainState`). Each file is written atomically
(temporary file + rename) in that order, the solverstate last, so an interrupted snapshot never
leaves a truncated file under a final name. Resuming from a .solverstate continues exactly: the
weights after N more updates equal those of an uninterrupted run bit for bit on CPU.

Signals (Caffe's ``--sigint_effect`` / ``--sighup_effect``, plus ``--sigterm-effect``): by
default SIGINT and SIGTERM (what cluster schedulers send before preemption) stop after the
current iteration with a snapshot, SIGHUP snapshots and continues; a second SIGINT interrupts
at once (atomic writes still leave no partial file).

Faults keep the work: bad input met after the first iteration (a corrupt record) snapshots the
state before the iteration and raises :class:`TrainingStopped` naming it; a snapshot that cannot
be written (a full disk) removes its own files, keeps the previous snapshot and raises
:class:`SnapshotError` saying so; a dead data worker is restarted by the data loader. A non-finite loss or gradient snapshots
the last good weights (before the update) and raises :class:`NonFiniteError` naming the
iteration and the first layer whose output, or the parameter blob whose gradient, is not finite.
"""
from __future__ import annotations

import base64
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import io
from ..eval.loop import DetectionRows, run_test_net
from ..layers import LayerError
from ..net import Net
from ..proto import caffe_pb2
from . import devices
from .lr import LearningRate
from .precision import Precision
from .sgd import make_rule

__all__ = ["Solver", "SolverError", "SnapshotError", "TrainingStopped", "NonFiniteError", "RankFailed", "TrainState",
           "SignalActions", "Progress", "ACTIONS", "read_solver", "use_channels_last"]

#: SolverAction values of Caffe's --sigint_effect / --sighup_effect
ACTIONS = ("stop", "snapshot", "none")
TRAINSTATE_SUFFIX = ".trainstate.json"
TRAINSTATE_FORMAT = "deeper-ssd trainstate 1"


class SolverError(LayerError):
    """A solver that cannot run: bad fields, missing nets, unreadable snapshot."""


class SnapshotError(SolverError):
    """A snapshot could not be written (its own files removed; the previous one is intact)."""


class TrainingStopped(SolverError):
    """Bad input met mid-training; the state before the iteration was snapshotted first."""


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (a snapshot was written first)."""

    def __init__(self, message: str, iteration: int, snapshot: Optional[str]):
        super().__init__(message)
        self.iteration, self.snapshot = iteration, snapshot

    def __reduce__(self):
        return type(self), (str(self), self.iteration, self.snapshot)


class RankFailed(RuntimeError):
    """A rank of a multi-process run raised an exception that is not bad input; every rank
    stopped together after rank 0's snapshot. The message names the rank and its error."""


def use_channels_last(net: Net) -> None:
    """Keep ``net``'s 4-D blobs and its data input in channels-last memory (NHWC strides; shapes
    and values unchanged, results equal to float rounding; timings in docs/performance.md,
    "Channels-last convolutions"). A test net that shares the blobs needs the call too, for
    its input."""
    net.to(memory_format=torch.channels_last)
    for layer in net.layers:
        if layer.is_source:
            layer.register_forward_hook(_channels_last_data)


def _channels_last_data(layer, args, output):
    tops = [output] if isinstance(output, torch.Tensor) else list(output)
    if tops[0].dim() == 4:
        tops[0] = tops[0].contiguous(memory_format=torch.channels_last)
    return tops[0] if isinstance(output, torch.Tensor) else tuple(tops)


def read_solver(path) -> caffe_pb2.SolverParameter:
    """A solver prototxt, with the snapshot prefix defaulting to the solver's path without its
    extension (as BVLC Caffe does since 2016) when it is not set."""
    param = io.read_solver(path)
    if not param.HasField("snapshot_prefix"):
        param.snapshot_prefix = str(Path(path).with_suffix(""))
    return param


# ---------------------------------------------------------------------------------------------
# signals

class SignalActions:
    """Caffe's SignalHandler: SIGINT/SIGHUP (and SIGTERM) set flags the loop polls once per
    iteration (and per test batch). ``requested()`` returns "stop", "snapshot" or None. A
    second SIGINT before the first was handled raises KeyboardInterrupt. Installed by
    ``with``, in the main thread only (elsewhere it is inert)."""

    def __init__(self, sigint: str = "stop", sighup: str = "snapshot", sigterm: str = "stop"):
        for name, effect in (("sigint", sigint), ("sighup", sighup), ("sigterm", sigterm)):
            if effect not in ACTIONS:
                raise SolverError(f"{name} effect must be one of {', '.join(ACTIONS)}, not {effect!r}")
        self.effects = {signal.SIGINT: sigint, signal.SIGTERM: sigterm}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup
        self._pending: List[int] = []
        self._previous: Dict[int, object] = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in self._pending:
            raise KeyboardInterrupt
        self._pending.append(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.effects:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self) -> Optional[str]:
        """The action of the oldest pending signal (Caffe checks SIGINT first)."""
        while self._pending:
            signum = signal.SIGINT if signal.SIGINT in self._pending else self._pending[0]
            self._pending.remove(signum)
            effect = self.effects[signum]
            if effect != "none":
                return effect
        return None


# ---------------------------------------------------------------------------------------------
# what a SolverState lacks

@dataclass
class TrainState:
    """The side file ``<prefix>_iter_<N>.trainstate.json`` written with every snapshot.

    JSON object: ``format`` ("deeper-ssd trainstate 1"), ``iter`` (must equal the
    solverstate's), ``seed`` (the training seed: random_seed, or the one drawn for -1),
    ``data`` (``{"train": {layer: next batch index}, "test": [{layer: index}, ...]}``),
    ``torch_rng`` (base64 of ``torch.get_rng_state()``), ``cuda_rng`` (list of base64, or
    absent), ``losses`` / ``smoothed_loss`` / ``loss_start`` (the average_loss window),
    ``loss_scale`` (``train --amp fp16``: GradScaler's scale and growth tracker, or absent).
    """
    iter: int
    seed: int
    data: dict
    torch_rng: str
    losses: List[float]
    smoothed_loss: float
    loss_start: int
    cuda_rng: Optional[List[str]] = None
    loss_scale: Optional[dict] = None

    @staticmethod
    def path_for(solverstate) -> Path:
        path = Path(solverstate)
        return path.with_name(path.name[:-len(".solverstate")] + TRAINSTATE_SUFFIX) \
            if path.name.endswith(".solverstate") else path.with_name(path.name + TRAINSTATE_SUFFIX)

    def write(self, path) -> None:
        body = dict(format=TRAINSTATE_FORMAT, **{k: v for k, v in self.__dict__.items() if v is not None})
        io.atomic_write_bytes(path, (json.dumps(body, indent=1) + "\n").encode())

    @classmethod
    def read(cls, path) -> "TrainState":
        try:
            body = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise SolverError(f"{path}: cannot read the train state: {err}") from None
        if body.pop("format", None) != TRAINSTATE_FORMAT:
            raise SolverError(f"{path}: not a {TRAINSTATE_FORMAT!r} file")
        try:
            return cls(**body)
        except TypeError as err:
            raise SolverError(f"{path}: {err}") from None


def _rng_to_text(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode()


def _rng_from_text(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


# ---------------------------------------------------------------------------------------------
# progress

@dataclass
class Progress:
    """What the loop reports after every update (for progress bars): ``iter`` updates done of
    ``max_iter``, smoothed ``loss``, ``lr``, ``images_per_s`` (over the last update),
    ``data_s`` (time the update waited for data), ``seconds`` (wall time of the update)."""
    iter: int
    max_iter: int
    loss: float
    lr: float
    images_per_s: float
    data_s: float
    seconds: float


def _fmt(value: float) -> str:
    """C++ ostream's default float formatting (6 significant digits)."""
    return f"{value:.6g}"


# ---------------------------------------------------------------------------------------------
# the solver

class Solver:
    """Caffe's SGDSolver family over :class:`deeper_ssd.net.Net` (see the module docstring).

    ``param``: the SolverParameter; ``base_dir``: where relative net paths are looked up when
    they are not found from the working directory (the solver file's folder); ``device``:
    torch device (default: solver_mode); ``log``: a ``print``-like callable for Caffe's log
    lines; ``progress``: called with a :class:`Progress` after every update; ``comm``: a
    :class:`deeper_ssd.solver.distributed.Communicator` for one process per GPU (root = rank 0
    tests, logs and snapshots); ``data_workers``: worker processes of each data layer, train and test
    (default :func:`deeper_ssd.data.loader.default_workers`);
    ``channels_last``: :func:`use_channels_last` on every net (a CPU speed option); ``amp``:
    None (float32), "bf16" or "fp16" training forward passes under autocast
    (:mod:`deeper_ssd.solver.precision`; tests stay float32).
    """

    def __init__(self, param: caffe_pb2.SolverParameter, *, base_dir=None, device=None,
                 log: Callable[[str], None] = print, progress: Optional[Callable[[Progress], None]] = None,
                 comm=None, data_workers: Optional[int] = None, channels_last: bool = False,
                 amp: Optional[str] = None):
        self.param = param
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.comm = comm
        self.rank = comm.rank if comm is not None else 0
        self.world = comm.world_size if comm is not None else 1
        self.root = self.rank == 0
        self._log = log
        self.progress = progress
        self.device = devices.parse_device(device) if device is not None else devices.training_device(param)
        devices.use_device(self.device)
        self._check_param()
        self.seed = int(param.random_seed) if param.random_seed >= 0 else \
            int.from_bytes(os.urandom(4), "little")
        if comm is not None:
            self.seed = comm.broadcast_int(self.seed)
        self._log_devices()
        torch.manual_seed(self.seed)
        self.train_net = self._make_net(self._train_net_param(), caffe_pb2.TRAIN, param.train_state, self.seed)
        self.test_nets: List[Net] = []
        if self.root:
            for i, (net_param, state) in enumerate(self._test_net_params()):
                net = self._make_net(net_param, caffe_pb2.TEST, state, self.seed + 1 + i)
                net.share_weights_from(self.train_net)
                self.test_nets.append(net)
        self._data_layers = self.train_net.data_layers
        self._test_data_layers = [net.data_layers for net in self.test_nets]
        for layer in self._data_layers:
            layer.set_seed(self.seed)
            if comm is not None:
                layer.set_shard(self.rank, self.world)
            if data_workers is not None:
                layer.configure_loader(num_workers=data_workers)
        for layers in self._test_data_layers:
            for layer in layers:
                layer.set_seed(self.seed)
                if data_workers is not None:
                    layer.configure_loader(num_workers=data_workers)
        if channels_last:
            for net in [self.train_net] + self.test_nets:
                use_channels_last(net)
        self.batch_size = sum(int(l.top_shapes[0][0]) for l in self._data_layers) or 1
        self._inputs: Dict[str, torch.Tensor] = {}
        for layer in self.train_net.layers:
            if layer.is_source:
                layer.register_forward_hook(self._remember_inputs)
        self.rule = make_rule(param, self.train_net.learnable_params)
        self._averager = comm.gradient_averager(self.train_net.learnable_params) if comm is not None else None
        self.precision = Precision(amp, self.device, [lp.blob for lp in self.train_net.learnable_params])
        if amp is not None:
            self.log(f"Mixed precision: {amp} autocast" + (", loss scaling" if amp == "fp16" else ""))
        self.lr = LearningRate(param)
        self.iter = 0
        self.losses: List[float] = []
        self.smoothed_loss = 0.0
        self._loss_start = 0
        self._restored_window = False
        self.requested_early_exit = False
        self._last_snapshot_iter: Optional[int] = None
        self._last_snapshot: Optional[str] = None       # the solverstate written or resumed from last
        self.last_test: Dict[int, dict] = {}
        self.signals: Optional[SignalActions] = None
        if comm is not None:
            comm.broadcast_parameters(self.train_net.learnable_params)

    @classmethod
    def from_file(cls, path, **kwargs) -> "Solver":
        """A solver from a solver prototxt; relative net paths fall back to its folder."""
        kwargs.setdefault("base_dir", Path(path).resolve().parent)
        return cls(read_solver(path), **kwargs)

    # -- set-up --------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.root:
            self._log(message)

    def _log_devices(self) -> None:
        """One line naming the device of every rank (and the backend of a multi-process run)."""
        own = devices.describe(self.device)
        if self.comm is None:
            self.log(f"Training on {own}")
            return
        names = self.comm.gather_text(own)
        self.log(f"Training on {self.world} processes ({self.comm.backend or 'no'} backend): " +
                 ", ".join(f"rank {r} on {name}" for r, name in enumerate(names)))

    def _check_param(self) -> None:
        p = self.param
        if p.average_loss < 1:
            raise SolverError(f"average_loss should be >= 1, got {p.average_loss}")
        if p.iter_size < 1:
            raise SolverError(f"iter_size should be >= 1, got {p.iter_size}")
        if p.eval_type not in ("classification", "detection"):
            raise SolverError(f"Unknown evaluation type: {p.eval_type!r} (classification or detection)")
        if p.snapshot_format != caffe_pb2.SolverParameter.BINARYPROTO:
            raise SolverError("snapshot_format HDF5 is not supported; use BINARYPROTO (.caffemodel/.solverstate)")
        if p.snapshot_diff:
            self.log("snapshot_diff is not supported: snapshots hold the weights only")
        if (p.snapshot or p.snapshot_after_train) and self.root:
            prefix = Path(p.snapshot_prefix or "x")
            try:
                prefix.parent.mkdir(parents=True, exist_ok=True)
                probe = prefix.with_name(prefix.name + "_iter_0.tempfile")
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as err:
                raise SolverError(f"Cannot write to snapshot prefix '{p.snapshot_prefix}': "
                                  f"{err.strerror or err}") from None

    def _resolve(self, path: str) -> Path:
        candidate = Path(path)
        if candidate.exists() or candidate.is_absolute() or self.base_dir is None:
            return candidate
        beside = self.base_dir / candidate
        return beside if beside.exists() else candidate

    def _read_net(self, path: str) -> caffe_pb2.NetParameter:
        return io.read_net(self._resolve(path))

    def _train_net_param(self) -> caffe_pb2.NetParameter:
        p = self.param
        given = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if len(given) != 1:
            raise SolverError("SolverParameter must specify exactly one train net using one of "
                              f"net, net_param, train_net, train_net_param (has: {', '.join(given) or 'none'})")
        field_name = given[0]
        if field_name in ("net", "train_net"):
            return self._read_net(getattr(p, field_name))
        return getattr(p, field_name)

    def _test_net_params(self) -> List[Tuple[caffe_pb2.NetParameter, Optional[caffe_pb2.NetState]]]:
        p = self.param
        generic = p.HasField("net") + p.HasField("net_param")
        if generic > 1:
            raise SolverError("Both net_param and net_file may not be specified.")
        nets = list(p.test_net_param) + [self._read_net(path) for path in p.test_net]
        if (generic and len(p.test_iter) < len(nets)) or (not generic and len(p.test_iter) != len(nets)):
            raise SolverError(f"test_iter must be specified for each test network: {len(p.test_iter)} "
                              f"test_iter for {len(nets)} test net(s)")
        if generic:
            source = p.net_param if p.HasField("net_param") else self._read_net(p.net)
            nets += [source] * (len(p.test_iter) - len(nets))
        if len(p.test_state) and len(p.test_state) != len(nets):
            raise SolverError("test_state must be unspecified or specified once per test net.")
        if nets and p.test_interval <= 0:
            raise SolverError("test_interval must be > 0 when the solver has test nets")
        return [(net, p.test_state[i] if len(p.test_state) else None) for i, net in enumerate(nets)]

    def _make_net(self, net_param, phase: int, state: Optional[caffe_pb2.NetState], seed: int) -> Net:
        """Caffe's NetState precedence: solver default phase < the net file's state < the solver's."""
        merged = caffe_pb2.NetState(phase=phase)
        merged.MergeFrom(net_param.state)
        if state is not None:
            merged.MergeFrom(state)
        net_param = caffe_pb2.NetParameter.FromString(net_param.SerializeToString())
        net_param.state.CopyFrom(merged)
        return Net(net_param, merged.phase, device=self.device, seed=seed)

    def _remember_inputs(self, layer, args, output) -> None:
        tops = (output,) if isinstance(output, torch.Tensor) else output
        self._inputs.update(zip(layer.lp.top, tops))

    # -- weights -------------------------------------------------------------------------------
    def load_weights(self, paths: Sequence[str]) -> None:
        """``caffe train --weights a,b``: copy layers by name from each file in turn into the
        train net (the test nets share its blobs). An entry ``PREFIX=FILE`` (split at the first
        ``=``) copies the file's layer ``X`` into layer ``PREFIX + X``: ``teacher/=t.caffemodel``
        fills a ZoomInNet distillation net's frozen ``teacher/`` copy from the teacher's own file."""
        for entry in paths:
            prefix, path = entry.split("=", 1) if "=" in entry else ("", entry)
            loaded = self.train_net.load_caffemodel(path, prefix=prefix)
            for net in self.test_nets:
                net.load_caffemodel(path, prefix=prefix)
            for name in loaded:
                self.log(f"Copying source layer {name}")        # Caffe's CopyTrainedLayersFrom line
            self.log(f"Finetuning from {path}{f' into {prefix}*' if prefix else ''}: {len(loaded)} layer(s) "
                     "copied" + ("" if loaded else f"; Warning: no layer of the file matches a layer of this "
                                 f"net ({self.train_net.weights_mismatch(path)})"))

    # -- the loop ------------------------------------------------------------------------------
    def _warn_slow_batchnorm_averages(self) -> None:
        """Log when a BatchNorm layer averages over more iterations than a third of the run:
        its stored statistics (what the test net uses) then mix in those of early weights."""
        fractions = {}
        for layer in self.train_net.layers:
            if layer.caffe_type == "BatchNorm" and not layer.use_global_stats and layer.fraction < 1:
                fractions.setdefault(layer.fraction, []).append(layer.name)
        for fraction, names in sorted(fractions.items()):
            horizon = 1.0 / (1.0 - fraction)
            if 3 * horizon > self.param.max_iter:
                self.log(f"Warning: {len(names)} BatchNorm layer(s) ({names[0]}, ...) average over "
                         f"~{horizon:.0f} iterations (moving_average_fraction {fraction:g}) in a "
                         f"{self.param.max_iter}-iteration run: the test net will use statistics of "
                         "earlier weights (see docs/decisions.md, deeper_ssd500_tiny)")

    def solve(self, resume: Optional[str] = None, signals: Optional[SignalActions] = None) -> None:
        """Solver::Solve: restore, step to max_iter, final snapshot, display forward and test."""
        self.signals = signals
        self.log(f"Solving {self.train_net.name}")
        self.log(f"Learning Rate Policy: {self.param.lr_policy}")
        self._warn_slow_batchnorm_averages()
        self.requested_early_exit = False
        if resume:
            self.log(f"Restoring previous solver status from {resume}")
            self.restore(resume)
        self.step(self.param.max_iter - self.iter)
        p = self.param
        if self.requested_early_exit:
            if self._last_snapshot_iter != self.iter:
                self.snapshot()
            self.log("Optimization stopped early.")
            return
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if p.display and self.iter % p.display == 0:
            with torch.no_grad():
                loss = self._loss_value(self.train_net())
            self._update_smoothed_loss(loss)
            self.log(f"Iteration {self.iter}, loss = {_fmt(self.smoothed_loss)}")
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        self.log("Optimization Done.")

    def step(self, iters: int) -> None:
        """Solver::Step: ``iters`` updates (fewer when a stop is requested)."""
        p = self.param
        stop_iter = self.iter + iters
        if not self._restored_window:
            self.losses, self.smoothed_loss, self._loss_start = [], 0.0, self.iter
        self._restored_window = False
        params = [lp.blob for lp in self.train_net.learnable_params]
        statistics = [lp.blob for lp in self.train_net.learnable_params if lp.statistics]  # BatchNorm's
        start_iter = self.iter
        while self.iter < stop_iter:
            for blob in params:
                blob.grad = None
            if p.test_interval and self.iter % p.test_interval == 0 and (self.iter > 0 or p.test_initialization):
                self._together(self.test_all, start_iter)     # root only: other ranks have no test nets
                if self.comm is not None:                     # a stop during the root's test stops all
                    self.requested_early_exit = self.comm.agree(
                        "stop" if self.requested_early_exit else None) == "stop"
                if self.requested_early_exit:
                    break
            began = time.perf_counter()
            if self.comm is not None:
                self.comm.broadcast_statistics(self.train_net.learnable_params)
            saved_statistics = [b.detach().clone() for b in statistics]
            display = bool(p.display) and self.iter % p.display == 0
            data_s = 0.0
            losses = []
            for pass_index in range(p.iter_size):
                if self._averager is not None and pass_index == p.iter_size - 1:
                    self._averager.arm()                      # all-reduce during the last backward
                outputs = self._forward_train(start_iter, statistics, saved_statistics)
                if outputs.loss is None:
                    raise SolverError(f"train net '{self.train_net.name}' has no loss output to minimise")
                self.precision.backward(outputs.loss)
                losses.append(outputs.loss.detach())
                data_s += sum(layer.timing.last_wait_s for layer in self._data_layers)
            loss_t = torch.stack(losses).sum() / p.iter_size
            if self._averager is not None:
                self._averager.finish()
            self.precision.unscale()
            loss, sumsq = (float(v) for v in torch.stack([loss_t.float(), self.rule.gradient_sumsq()]).tolist())
            bad_loss, bad_grad = not math.isfinite(loss), not math.isfinite(sumsq)
            if self.comm is not None:
                bad_loss, bad_grad = self.comm.any(bad_loss), self.comm.any(bad_grad)
            skipped = not bad_loss and bad_grad and self.precision.skips_overflow()
            if (bad_loss or bad_grad) and not skipped:
                with torch.no_grad():
                    for blob, saved in zip(statistics, saved_statistics):
                        blob.copy_(saved)
                self._stop_non_finite(loss, outputs)
            self._update_smoothed_loss(loss)
            if display:
                self.log(f"Iteration {self.iter}, loss = {_fmt(self.smoothed_loss)}")
                self._log_outputs("Train", self.train_net, outputs)
            rate = self.lr(self.iter, self.smoothed_loss)
            if display:
                self.log(f"Iteration {self.iter}, lr = {_fmt(rate)}")
            if skipped:
                self.log(f"Iteration {self.iter}: fp16 gradients overflowed at loss scale "
                         f"{_fmt(self.precision.scale)}: update skipped, scale halved")
                self.precision.skip()
            else:
                scale = self.precision.step(lambda: self.rule.apply(rate, self.iter, grad_norm=math.sqrt(sumsq)))
                if scale is not None:
                    self.log(f"Gradient clipping: scaling down gradients (L2 norm {_fmt(math.sqrt(sumsq))} > "
                             f"{_fmt(self.rule.clip)}) by scale factor {_fmt(scale)}")
            self.iter += 1
            request = self._requested_action()
            if (p.snapshot and self.iter % p.snapshot == 0) or request == "snapshot":
                self._together(self.snapshot, start_iter, may_snapshot=False)
            if self.progress is not None and self.root:
                seconds = time.perf_counter() - began
                self.progress(Progress(self.iter, p.max_iter, self.smoothed_loss, rate,
                                       self.batch_size * p.iter_size * self.world / max(seconds, 1e-9),
                                       data_s, seconds))
            if request == "stop":
                self.requested_early_exit = True
                break

    def _forward_train(self, start_iter: int, statistics, saved_statistics):
        """One forward of the train net (under autocast with ``amp``). Bad input met after this
        step's first iteration (a corrupt record, a data worker that keeps dying) snapshots the
        state before this iteration (BatchNorm statistics restored) and raises TrainingStopped
        naming it. In a multi-process run any exception on any rank stops every rank together
        (:meth:`_stop_together`)."""
        failure = None
        try:
            with self.precision.autocast():
                outputs = self.train_net()
        except LayerError as err:
            if self.comm is not None:
                failure = err
            elif self.iter == start_iter:
                raise
            else:
                self._restore(statistics, saved_statistics)
                snapshot = self.snapshot() if self._last_snapshot_iter != self.iter else self._last_snapshot
                raise TrainingStopped(f"iteration {self.iter}: {err}; training stopped, state before this "
                                      f"iteration saved to {snapshot}") from None
        except Exception as err:
            if self.comm is None:
                raise
            failure = err
        if self.comm is not None:
            self._stop_together(failure, start_iter, lambda: self._restore(statistics, saved_statistics))
        return outputs

    @staticmethod
    @torch.no_grad()
    def _restore(blobs, saved) -> None:
        for blob, value in zip(blobs, saved):
            blob.copy_(value)

    # -- stopping all ranks together -----------------------------------------------------------
    def _together(self, action: Callable, start_iter: int, may_snapshot: bool = True):
        """``action()`` (a test phase, a snapshot: root's work the other ranks wait for); in a
        multi-process run an exception it raises on any rank stops every rank together."""
        if self.comm is None:
            return action()
        failure = None
        try:
            action()
        except Exception as err:
            failure = err
        self._stop_together(failure, start_iter, may_snapshot=may_snapshot)

    def _stop_together(self, failure: Optional[BaseException], start_iter: int,
                       before_snapshot: Optional[Callable] = None, may_snapshot: bool = True) -> None:
        """Collective: when any rank has a ``failure``, every rank learns its message, rank 0
        snapshots the state before this iteration (unless this is the run's first iteration or
        the failure was the snapshot itself) while the others wait, rank 0 logs the message,
        and every rank raises the same error: TrainingStopped for bad input (a LayerError),
        RankFailed otherwise. The ranks leave together, so no process is ended mid-write."""
        report = None
        if failure is not None:
            report = (isinstance(failure, LayerError),
                      str(failure) if isinstance(failure, LayerError) else f"{type(failure).__name__}: {failure}")
        reports = self.comm.failures(report)
        if reports is None:
            return
        rank = next(r for r, entry in enumerate(reports) if entry is not None)
        bad_input, text = reports[rank]
        if before_snapshot is not None:
            before_snapshot()
        saved = self._snapshot_for_stop() if may_snapshot and self.iter != start_iter else None
        message = f"iteration {self.iter}: rank {rank}: {text}; training stopped" + (
            f", state before this iteration saved to {saved}" if saved else "")
        message = self.comm.gather(message if self.root else None)[0]    # after rank 0's snapshot
        self.log(message)
        self.comm.barrier()
        raise (TrainingStopped if bad_input else RankFailed)(message)

    def _snapshot_for_stop(self) -> Optional[str]:
        """A snapshot of the current state unless one exists for this iteration; None when it
        could not be written (its files removed; the failure was logged)."""
        if self._last_snapshot_iter == self.iter:
            return self._last_snapshot
        try:
            return self.snapshot()
        except SnapshotError:
            return None

    def _requested_action(self) -> Optional[str]:
        """The pending signal's action ("stop", "snapshot" or None), agreed by all ranks."""
        request = self.signals.requested() if self.signals is not None else None
        return self.comm.agree(request) if self.comm is not None else request

    def _loss_value(self, outputs) -> float:
        return float(outputs.loss) if outputs.loss is not None else 0.0

    def _update_smoothed_loss(self, loss: float) -> None:
        """Solver::UpdateSmoothedLoss (float32 arithmetic as Caffe's Dtype); the window starts
        at the first iteration of this Step call (or continues a restored one)."""
        f = np.float32
        average = self.param.average_loss
        if len(self.losses) < average:
            self.losses.append(float(f(loss)))
            size = len(self.losses)
            self.smoothed_loss = float((f(self.smoothed_loss) * f(size - 1) + f(loss)) / f(size))
        else:
            idx = (self.iter - self._loss_start) % average
            self.smoothed_loss = float(f(self.smoothed_loss) + (f(loss) - f(self.losses[idx])) / f(average))
            self.losses[idx] = float(f(loss))

    def _log_outputs(self, which: str, net: Net, outputs) -> None:
        index = 0
        weights = net.loss_weights
        for name, value in outputs.items():
            weight = weights.get(name, 0.0)
            for v in value.detach().reshape(-1).float().cpu().tolist():
                extra = f" (* {_fmt(weight)} = {_fmt(weight * v)} loss)" if weight else ""
                self.log(f"    {which} net output #{index}: {name} = {_fmt(v)}{extra}")
                index += 1

    # -- non-finite values ---------------------------------------------------------------------
    def _stop_non_finite(self, loss: float, outputs) -> None:
        """Snapshot the state before this iteration (statistics already restored), then name
        the culprit and raise. Every rank of a multi-process run comes here together (the
        decision is collective): the culprit named is that of the first rank whose loss is not
        finite (else rank 0's), rank 0 snapshots while the others wait, and all raise after it."""
        snapshot = self._snapshot_for_stop() if self.root else None
        where = self._find_non_finite(loss, outputs)
        if self.comm is not None:
            found = self.comm.gather((math.isfinite(loss), where))
            rank = next((r for r, (finite, _) in enumerate(found) if not finite), 0)
            where = f"rank {rank}: {found[rank][1]}"
            snapshot = self.comm.gather(snapshot)[0]
        message = (f"iteration {self.iter}: {where}; training stopped, weights before this update "
                   f"saved to {snapshot}" if snapshot else f"iteration {self.iter}: {where}; training stopped")
        self.log(message)
        if self.comm is not None:
            self.comm.barrier()
        raise NonFiniteError(message, self.iter, snapshot)

    @torch.no_grad()
    def _find_non_finite(self, loss: float, outputs) -> str:
        """Name the culprit: a trained blob already non-finite, else the first layer whose
        output is non-finite on the same inputs (re-run with hooks), else the first blob whose
        gradient is non-finite."""
        for lp in self.train_net.learnable_params:
            if lp.blob.requires_grad and not bool(torch.isfinite(lp.blob).all()):
                return f"layer '{lp.layer}' blob {lp.index} holds non-finite values (loss {_fmt(loss)})"
        if not math.isfinite(loss):
            culprit: List[str] = []

            def hook(layer, args, output):
                tops = (output,) if isinstance(output, torch.Tensor) else output
                for name, top in zip(layer.lp.top, tops):
                    if not culprit and top.is_floating_point() and not bool(torch.isfinite(top).all()):
                        culprit.append(f"layer '{layer.name}' ({layer.caffe_type}) top '{name}'")
            handles = [layer.register_forward_hook(hook) for layer in self.train_net.layers
                       if not layer.is_source]
            try:
                with self.precision.autocast():
                    self.train_net(**self._inputs)
            finally:
                for handle in handles:
                    handle.remove()
            origin = culprit[0] if culprit else "the loss outputs"
            return f"loss is {_fmt(loss)}; first non-finite output: {origin}"
        for lp in self.train_net.learnable_params:
            grad = lp.blob.grad
            if grad is not None and not bool(torch.isfinite(grad).all()):
                return (f"gradient of layer '{lp.layer}' blob {lp.index} is not finite "
                        f"(loss {_fmt(loss)} is finite)")
        return f"gradient norm is not finite (loss {_fmt(loss)})"

    # -- testing -------------------------------------------------------------------------------
    def test_all(self) -> None:
        """Solver::TestAll: every test net, detection or classification evaluation."""
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            if self.param.eval_type == "detection":
                self._test_detection(i)
            else:
                self._test_classification(i)

    def _run_test(self, i: int, consume) -> Optional[float]:
        """Forward test net ``i`` ``test_iter`` times (:func:`deeper_ssd.eval.loop.run_test_net`,
        honouring signals between batches), handing each batch's outputs to ``consume``.
        Returns the summed loss (0 without ``test_compute_loss``), None when interrupted."""
        loss = 0.0

        def take(outputs) -> None:
            nonlocal loss
            if self.param.test_compute_loss:
                loss += self._loss_value(outputs)
            consume(outputs)

        self.log(f"Iteration {self.iter}, Testing net (#{i})")
        if not run_test_net(self.test_nets[i], self.param.test_iter[i], take, before_batch=self._may_test):
            return None
        return loss

    def _may_test(self, _batch: int) -> bool:
        """Act on pending signals before a test batch; False (and a log line) on a stop."""
        request = self.signals.requested() if self.signals is not None else None
        while request is not None:
            if request == "snapshot":
                self.snapshot()
            else:
                self.requested_early_exit = True
            request = self.signals.requested()
        if self.requested_early_exit:
            self.log("Test interrupted.")
            return False
        return True

    def _test_detection(self, i: int) -> None:
        rows = DetectionRows(strict=True)

        def consume(outputs) -> None:
            try:
                rows.add(outputs)
            except ValueError as err:
                raise SolverError(f"test net #{i} {err}") from None

        loss = self._run_test(i, consume)
        if loss is None:
            return
        if self.param.test_compute_loss:
            self.log(f"Test loss: {_fmt(loss / self.param.test_iter[i])}")
        results = {}
        for k, (name, acc) in enumerate(rows.accumulators.items()):
            result = acc.result(self.param.ap_version)
            for label in result.missing:
                self.log(f"Missing true_pos for label: {label}")
            if self.param.show_per_class_result:
                for label, ap in result.ap.items():
                    self.log(f"class{label}: {_fmt(ap)}")
            self.log(f"    Test net output #{k}: {name} = {_fmt(result.mean_ap)}")
            results[name] = result.mean_ap
        self.last_test[i] = results

    def _test_classification(self, i: int) -> None:
        sums: Dict[str, torch.Tensor] = {}

        def consume(outputs) -> None:
            for name, blob in outputs.items():
                value = blob.detach().reshape(-1).double().cpu()
                sums[name] = sums[name] + value if name in sums else value

        loss = self._run_test(i, consume)
        if loss is None:
            return
        n = self.param.test_iter[i]
        if self.param.test_compute_loss:
            self.log(f"Test loss: {_fmt(loss / n)}")
        means = {name: total / n for name, total in sums.items()}
        self._log_outputs("Test", self.test_nets[i], means)
        self.last_test[i] = {name: m.tolist() for name, m in means.items()}

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot_base(self) -> str:
        return f"{self.param.snapshot_prefix}_iter_{self.iter}"

    def snapshot(self) -> Optional[str]:
        """Write ``<prefix>_iter_<N>.caffemodel``, ``.trainstate.json`` and ``.solverstate``
        (each atomically, the solverstate last); returns the solverstate path (root only)."""
        if not self.root:
            self._last_snapshot_iter = self.iter
            return None
        base = self.snapshot_base()
        model, state_path = base + ".caffemodel", base + ".solverstate"
        side = TrainState.path_for(state_path)
        writing = model
        try:
            self.log(f"Snapshotting to binary proto file {model}")
            self.train_net.save_caffemodel(model)
            writing = str(side)
            self.train_state().write(side)
            state = caffe_pb2.SolverState(iter=self.iter, learned_net=model, **self.lr.state())
            state.history.extend(io.array_to_blob(h) for h in self.rule.history)
            self.log(f"Snapshotting solver state to binary proto file {state_path}")
            writing = state_path
            io.write_solverstate(state, state_path)
        except OSError as err:
            for path in (model, side):                  # no incomplete set under final names
                if str(path) != writing:
                    Path(path).unlink(missing_ok=True)
            kept = (f"the previous snapshot {self._last_snapshot} is intact" if self._last_snapshot
                    else "no earlier snapshot of this run")
            message = (f"iteration {self.iter}: snapshot failed writing {writing}: {err.strerror or err}; "
                       f"{kept}; training stopped")
            self.log(message)
            raise SnapshotError(message) from None
        self._last_snapshot_iter, self._last_snapshot = self.iter, state_path
        return state_path

    def train_state(self) -> TrainState:
        data = {"train": {l.name: l.batches_served for l in self._data_layers},
                "test": [{l.name: l.batches_served for l in layers} for layers in self._test_data_layers]}
        cuda = None
        if self.device.type == "cuda":
            cuda = [_rng_to_text(s) for s in torch.cuda.get_rng_state_all()]
        return TrainState(self.iter, self.seed, data, _rng_to_text(torch.get_rng_state()),
                          list(self.losses), self.smoothed_loss, self._loss_start, cuda, self.precision.state())

    def restore(self, path) -> None:
        """Solver::Restore from a .solverstate: iteration, weights (learned_net), lr state and
        history; plus the side file's seed, data positions, RNG and loss window when present."""
        path = Path(path)
        if path.suffix == ".h5":
            raise SolverError(f"{path}: HDF5 solver states are not supported (use .solverstate)")
        state = io.read_solverstate(path)
        self.iter = state.iter
        self._last_snapshot = str(path)
        if state.HasField("learned_net"):
            model = Path(state.learned_net)
            if not model.exists() and (path.parent / model.name).exists():
                model = path.parent / model.name
            self.train_net.load_caffemodel(model)
        self.lr.restore(state)
        self.rule.load_history([io.blob_to_array(b) for b in state.history])
        self.log("SGDSolver: restoring history")
        side = TrainState.path_for(path)
        if side.exists():
            extra = TrainState.read(side)
            if extra.iter != state.iter:
                raise SolverError(f"{side} is for iteration {extra.iter}, {path} for {state.iter}")
            self._restore_train_state(extra)
        else:
            position = self.iter * self.param.iter_size
            self.log(f"{side.name} not found beside {path.name}: resuming with seed {self.seed} and the "
                     f"train data at batch {position} (not bit-exact when the seed was drawn from the clock)")
            for layer in self._data_layers:
                layer.set_seed(self.seed, position)
        if self.comm is not None:
            self.comm.broadcast_parameters(self.train_net.learnable_params)

    def _restore_train_state(self, extra: TrainState) -> None:
        self.seed = extra.seed
        positions = extra.data.get("train", {})
        for layer in self._data_layers:
            layer.set_seed(self.seed, positions.get(layer.name, self.iter * self.param.iter_size))
        for layers, saved in zip(self._test_data_layers, extra.data.get("test", [])):
            for layer in layers:
                layer.set_seed(self.seed, saved.get(layer.name, 0))
        torch.set_rng_state(_rng_from_text(extra.torch_rng))
        if extra.cuda_rng and self.device.type == "cuda":
            self._restore_cuda_rng(extra.cuda_rng)
        self.losses, self.smoothed_loss = list(extra.losses), extra.smoothed_loss
        self._loss_start = extra.loss_start
        self._restored_window = True
        self.precision.load_state(extra.loss_scale)

    def _restore_cuda_rng(self, saved: List[str]) -> None:
        """The saved CUDA generators (one per GPU the snapshotting process saw) into the GPUs
        visible here, as far as both have them; a differing count is logged, not an error (a
        run resumed on fewer or more GPUs: the GPUs without a saved state keep their seed)."""
        count = torch.cuda.device_count()
        for index, text in enumerate(saved[:count]):
            torch.cuda.set_rng_state(_rng_from_text(text), index)
        if len(saved) != count:
            self.log(f"Warning: the snapshot holds the CUDA random state of {len(saved)} GPU(s), {count} "
                     f"visible here: restored {min(len(saved), count)}"
                     + (f", cuda:{len(saved)} and above keep their seeded state" if count > len(saved) else ""))

    def close(self) -> None:
        """Stop the data layers' worker processes."""
        for layers in [self._data_layers] + self._test_data_layers:
            for layer in layers:
                layer.close()

