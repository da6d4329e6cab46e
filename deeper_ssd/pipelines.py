"""The pipelines behind ``deeper-ssd train / test / demo / detect / diffmap``, as functions a
notebook can call; the command line (:mod:`deeper_ssd.cli`) parses its flags, calls these and
prints what they return.

    from deeper_ssd.pipelines import train, test
    solver = train("prototxt/deeper_ssd500_tiny/solver.prototxt", progress=False)
    report = test("prototxt/deeper_ssd500_tiny/test.prototxt",
                  "runs/deeper_ssd500_tiny/deeper_ssd500_tiny_iter_800.caffemodel")
    report["mAP"], report["per_class"], report["size_buckets"], report["speed"]

Bad input (a flag combination that cannot work, an unreadable database, a net without the
layers a pipeline needs) raises :class:`UsageError` with a one-line message; files that do not
parse raise :class:`deeper_ssd.io.CaffeFormatError`, inconsistent nets
:class:`deeper_ssd.layers.LayerError`. Lines a pipeline reports while it runs go to the
``echo`` / ``note`` callables it takes (None: silent); training logs through
:class:`deeper_ssd.solver.console.Console`.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import detect as detection
from . import diffmap as srtod
from . import io
from .errors import UsageError
from .eval import evaluate as ev
from .layers import LayerError
from .diffmap import SRTODView
from .layers.data import AnnotatedData
from .net import Net
from .solver import LrPolicyError, NonFiniteError, SignalActions, Solver, SolverTypeError, distributed, read_solver
from .solver import devices
from .solver.console import Console
from .solver.precision import AMP_MODES, set_tf32
from .solver.trainer import RankFailed, TrainingStopped
from .solver.trainer import use_channels_last

__all__ = ["UsageError", "TrainingProcessError", "train", "test", "format_test_report", "demo",
           "detect", "diffmap", "zoo_model", "checked_build", "DEMO_MODEL"]

Echo = Optional[Callable[[str], None]]
PathLike = Union[str, Path]


class TrainingProcessError(RuntimeError):
    """A process of a multi-GPU training run failed (its own message was printed by it)."""


def _say(echo: Echo, line: str) -> None:
    if echo is not None:
        echo(line)


# ---------------------------------------------------------------------------------------------
# the zoo, for the demo and the command line

def zoo_model(name: str, **settings):
    """The zoo model ``name`` with builder settings overridden; UsageError for an unknown name
    or a setting the model does not have."""
    from .builder import zoo
    try:
        return zoo.get(name, **settings)
    except KeyError as err:
        raise UsageError(err.args[0]) from None
    except (TypeError, ValueError) as err:
        raise UsageError(f"{name}: {err}") from None


def checked_build(model, build: Callable):
    """``build(model)``; a model setting that cannot work becomes a one-line UsageError (shape
    errors keep their LayerError, which names the layer and its shapes)."""
    try:
        return build(model)
    except LayerError:
        raise
    except ValueError as err:
        message = str(err)
        raise UsageError(message if message.startswith(f"{model.name}:") else f"{model.name}: {message}") from None


def torch_device(spec) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device; UsageError for a malformed name or a
    CUDA device this machine does not have (:func:`deeper_ssd.solver.devices.parse_device`)."""
    try:
        return devices.parse_device(spec)
    except devices.DeviceError as err:
        raise UsageError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# train

def train(solver: PathLike, weights: Union[PathLike, Sequence[PathLike]] = (), snapshot: Optional[PathLike] = None, *,
          device=None, gpus: Sequence[int] = (), workers: Optional[int] = None,
          log: Optional[PathLike] = None, sigint_effect: str = "stop", sighup_effect: str = "snapshot",
          sigterm_effect: str = "stop", channels_last: bool = False, progress: bool = True,
          seed: Optional[int] = None, amp: Optional[str] = None, tf32: bool = False,
          cudnn_benchmark: bool = False, collective_timeout: Optional[float] = None) -> Optional[Solver]:
    """``deeper-ssd train``: train the solver prototxt ``solver`` with tests and snapshots as
    Caffe's ``caffe train``; returns the :class:`deeper_ssd.solver.Solver` after training (its
    data workers stopped), None with ``gpus``.

    ``weights``: a .caffemodel, or several, copied by layer name before training
    (``PREFIX=FILE`` copies layer X into layer PREFIX+X); ``snapshot``: a .solverstate to resume from (not both);
    ``device``: cpu, cuda or cuda:N (default: the solver's solver_mode); ``gpus``: GPU ids, one
    training process each (gradients averaged); ``workers``: data worker processes of every data
    layer, train and test nets (default :func:`deeper_ssd.data.loader.default_workers`); ``log``: file the log is appended to (default ``<snapshot_prefix>.log``);
    ``sigint_effect`` / ``sighup_effect`` / ``sigterm_effect``: stop, snapshot or none; ``channels_last``: NHWC
    memory for the nets; ``progress``: the progress line on stderr; ``seed``: overrides the
    solver's random_seed; ``amp``: None, "bf16" or "fp16" mixed precision
    (:mod:`deeper_ssd.solver.precision`); ``tf32``: allow TF32 on CUDA (off: float32 parity
    with Caffe); ``cudnn_benchmark``: :func:`set_cudnn_benchmark`; ``collective_timeout``: seconds a multi-process collective may wait
    (default :data:`deeper_ssd.solver.distributed.DEFAULT_COLLECTIVE_TIMEOUT_S`).

    Devices (:mod:`deeper_ssd.solver.devices`; the choice is logged): ``device`` when given,
    else the solver's solver_mode (GPU without CUDA is a UsageError: give ``device="cpu"``).
    Under torchrun (its environment variables set) this process is one rank of a
    multi-process run, on ``cuda:LOCAL_RANK`` with NCCL when the device (or solver_mode) is
    CUDA, on the CPU with gloo otherwise. Raises :class:`deeper_ssd.solver.NonFiniteError`
    when a non-finite loss or gradient stopped training, :class:`TrainingProcessError` when a
    process of a multi-process run failed (the ranks stop together after rank 0's snapshot)."""
    param = read_solver(solver)
    weights = [str(weights)] if isinstance(weights, (str, Path)) else [str(w) for w in weights]
    if weights and snapshot:
        raise UsageError("give --snapshot to resume training or --weights to fine-tune, not both")
    if amp is not None and amp not in AMP_MODES:
        raise UsageError(f"--amp {amp!r}: give one of {', '.join(AMP_MODES)}")
    if collective_timeout is not None and not collective_timeout > 0:
        raise UsageError(f"--collective-timeout {collective_timeout}: give a number of seconds > 0")
    requested = torch_device(device) if device is not None else None
    options = dict(solver=str(solver), weights=weights, snapshot=snapshot, device=requested,
                   workers=workers, log=log, sigint_effect=sigint_effect, sighup_effect=sighup_effect,
                   sigterm_effect=sigterm_effect, channels_last=channels_last, progress=progress, seed=seed,
                   amp=amp, tf32=tf32, cudnn_benchmark=cudnn_benchmark)
    if gpus:
        if requested is not None:
            raise UsageError("give --gpus (one process per GPU) or --device, not both")
        if len(set(gpus)) != len(gpus):
            raise UsageError(f"--gpus {','.join(map(str, gpus))}: a GPU is listed twice")
        ranks = [torch_device(f"cuda:{i}") for i in gpus]
        try:
            outcomes = distributed.spawn(_train_rank, ranks, args=(options,), timeout=collective_timeout)
        except Exception as err:                   # a rank died; its message is above
            lines = str(err).strip().splitlines()
            raise TrainingProcessError(lines[-1] if lines else type(err).__name__) from None
        _raise_outcome(outcomes[0])
        return None
    if distributed.launched_by_torchrun():
        comm, rank_device = distributed.from_environment(_torchrun_device_type(param, requested),
                                                         timeout=collective_timeout)
        try:
            return _train_process(param, options, comm=comm, device=rank_device)
        except RankFailed as err:              # all ranks stopped together; the message names the rank
            raise TrainingProcessError(str(err)) from None
    try:
        chosen = devices.training_device(param, requested)
    except devices.DeviceError as err:
        raise UsageError(f"{solver}: {err}") from None
    return _train_process(param, options, device=chosen)


def _torchrun_device_type(param, requested: Optional[torch.device]) -> str:
    """"cuda" or "cpu" for a rank launched by torchrun; every rank uses cuda:LOCAL_RANK, so a
    GPU index in ``requested`` is refused, as is CUDA where this rank's GPU is missing."""
    if requested is not None and requested.type == "cpu":
        return "cpu"
    if requested is None and not devices.wants_gpu(param):
        return "cpu"
    if requested is not None and requested.index not in (None, 0):
        raise UsageError(f"--device {requested}: under torchrun rank r uses cuda:LOCAL_RANK; give --device cuda")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    try:
        devices.parse_device(f"cuda:{local}")
    except devices.DeviceError as err:
        raise UsageError(f"torchrun rank with LOCAL_RANK {local}: {err}") from None
    return "cuda"


def set_cudnn_benchmark(on: bool) -> None:
    """``torch.backends.cudnn.benchmark`` (``--cudnn-benchmark``): cuDNN times the candidate
    algorithms of every new convolution shape and keeps the fastest; faster convolutions after
    a slower first iteration, but the choice may differ between runs and with it the float
    rounding, so it is off by default (docs/decisions.md, "Training on GPUs"). No effect on CPU."""
    torch.backends.cudnn.benchmark = bool(on)


def _train_process(param, options: dict, comm=None, device=None) -> Solver:
    """Build this process's solver from ``options`` (:func:`train`'s arguments), train, close."""
    if options["seed"] is not None:
        param.random_seed = options["seed"]
    set_tf32(options["tf32"])
    set_cudnn_benchmark(options["cudnn_benchmark"])
    root = comm is None or comm.rank == 0
    log_path = options["log"] or (param.snapshot_prefix + ".log")
    console = Console(log_path if root else None, progress=options["progress"], every=param.display or 10,
                      hold=True)
    try:
        solver = Solver(param, base_dir=Path(options["solver"]).resolve().parent,
                        device=device, log=console.log, progress=console.progress,
                        comm=comm, data_workers=options["workers"], channels_last=bool(options["channels_last"]),
                        amp=options["amp"])
    except (LrPolicyError, SolverTypeError) as err:
        console.close()
        raise UsageError(f"{options['solver']}: {err}") from None
    console.release()                      # the solver is built: its lines go to the log file
    try:
        if devices.requested_fallback(param, options["device"]):
            console.log("solver_mode is GPU; training on the CPU as --device cpu asks")
        if solver.device.type == "cuda":
            console.log(f"TF32 {'allowed (--tf32)' if options['tf32'] else 'off (float32 convolutions and matrix products)'}")
            console.log("cuDNN benchmark " + ("on (--cudnn-benchmark)" if options["cudnn_benchmark"]
                                              else "off (heuristic algorithm choice)"))
        console.log(f"Training seed {solver.seed}" + (" (random_seed -1: drawn, recorded in the snapshots)"
                                                       if param.random_seed < 0 else ""))
        if options["weights"]:
            solver.load_weights(options["weights"])
        with SignalActions(options["sigint_effect"], options["sighup_effect"],
                           options["sigterm_effect"]) as signals:
            solver.solve(options["snapshot"], signals=signals)
    finally:
        solver.close()
        console.close()
    return solver


def _train_rank(comm, options: dict) -> Optional[BaseException]:
    """One process of ``train(gpus=...)`` (spawned by deeper_ssd.solver.distributed.spawn).
    A stop the ranks agreed on (non-finite values, a failure on any rank) is returned, not
    raised: every rank has passed the last barrier and leaves with status 0, so none is ended
    mid-write; :func:`train` raises rank 0's."""
    try:
        _train_process(read_solver(options["solver"]), options, comm=comm, device=comm.device)
    except (NonFiniteError, TrainingStopped, RankFailed) as err:
        return err
    return None


def _raise_outcome(outcome: Optional[BaseException]) -> None:
    """Raise rank 0's agreed stop in the launching process (a rank's failure that is not bad
    input as TrainingProcessError)."""
    if isinstance(outcome, RankFailed):
        raise TrainingProcessError(str(outcome))
    if outcome is not None:
        raise outcome


# ---------------------------------------------------------------------------------------------
# test

def test(model: PathLike, weights: PathLike, out: PathLike = "runs/test", iterations: Optional[int] = None,
         ap_version: str = "11point", compare: Sequence[PathLike] = (), name: Optional[str] = None,
         device="cpu", workers: Optional[int] = None, channels_last: bool = False,
         cudnn_benchmark: bool = False, echo: Echo = None, note: Echo = None, fast: bool = True) -> dict:
    """``deeper-ssd test``: evaluate the test net ``model`` (AnnotatedData + DetectionOutput +
    DetectionEvaluate) with ``weights`` for ``iterations`` batches (default: the test LMDB
    once); write ``results.json`` and ``pr_curve.png`` (with the curves of the ``compare``
    results.json files) into ``out``. Returns the JSON dict: mAP (``ap_version``), mAP of every
    AP version, per-class and per-size AP, PR curves, detection speed. ``echo`` receives the
    report (:func:`format_test_report`) and the files written, ``note`` non-fatal notes.
    ``workers``: data worker processes (default :func:`deeper_ssd.data.loader.default_workers`);
    ``cudnn_benchmark``: :func:`set_cudnn_benchmark`.
    ``fast``: the fast inference path (deeper_ssd.fast), the exact executor where it cannot."""
    net = _trained_net(model, weights, device, note, fast)
    set_cudnn_benchmark(cudnn_benchmark)
    if channels_last:
        use_channels_last(net)
    if workers is not None:
        for layer in net.data_layers:
            layer.configure_loader(num_workers=workers)
    iterations = iterations or _default_test_iterations(net, note)
    try:
        result = ev.evaluate(net, iterations, ap_version)
    except ValueError as err:
        raise UsageError(f"{model}: {err}") from None
    finally:
        for layer in net.data_layers:
            layer.close()
    report = dict(name=name or Path(weights).stem, model=str(model), weights=str(weights), **result.as_dict())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    written = [out / "results.json"] + _plot_pr(report, compare, out, ap_version)
    for line in format_test_report(report).splitlines():
        _say(echo, line)
    _say(echo, "wrote " + ", ".join(str(p) for p in written))
    return report


test.__test__ = False          # not a pytest test when a test module imports it


def _plot_pr(report: dict, compare: Sequence[PathLike], out: Path, ap_version: str) -> List[Path]:
    """pr_curve.png with ``report``'s curves and those of the ``compare`` files (none when no
    curve has a class)."""
    from .eval.plots import Curve, plot_pr_curves
    curves = [Curve.from_report(report)]
    for path in compare:
        try:
            curves.append(Curve.from_report(json.loads(Path(path).read_text())))
        except (OSError, ValueError, KeyError) as err:
            raise UsageError(f"--compare {path}: not a results.json of deeper-ssd test ({err})") from None
    if not any(c.per_class for c in curves):
        return []
    return [plot_pr_curves(curves, out / "pr_curve.png", title=f"PR ({ap_version})")]


def _default_test_iterations(net: Net, note: Echo) -> int:
    """Batches that read the test net's AnnotatedData LMDB once: ceil(records / batch_size)."""
    from .data.annoset import AnnosetError, AnnotatedDB
    for layer in net.layers:
        if isinstance(layer, AnnotatedData):
            source = layer.lp.data_param.source
            try:
                db = AnnotatedDB(source, f"layer '{layer.name}': data_param.source LMDB")
                records = len(db.keys())
                db.close()
            except AnnosetError as err:
                raise UsageError(str(err)) from None
            batch = layer.lp.data_param.batch_size
            if records % batch:
                _say(note, f"{records} records in batches of {batch}: the last batch wraps around and "
                           f"{batch - records % batch} image(s) are evaluated twice (as Caffe does)")
            return max(1, math.ceil(records / batch))
    raise UsageError("the test net has no AnnotatedData layer: give --iterations")


def format_test_report(report: dict) -> str:
    """The lines ``deeper-ssd test`` prints for a :func:`test` report."""
    def ap_text(value):
        return "n/a" if value is None else f"{value:.4f}"
    lines = [f"{report['name']}: {report['images']} images ({report['iterations']} x {report['batch']}), "
             f"{report['ap_version']} mAP {report['mAP']:.4f}"]
    for label, entry in report["per_class"].items():
        lines.append(f"  class {label} {entry['name']}: AP {entry['ap']:.4f} ({entry['objects']} objects)")
    for bucket, entry in report["size_buckets"].items():
        lines.append(f"  size {bucket:<2} ({entry['bounds']}): AP {ap_text(entry['mAP'])} "
                     f"({entry['objects']} objects)")
    speed = report["speed"]
    lines.append(f"  detection speed: {speed['images_per_s']:.2f} images/s on {speed['device']}, "
                 f"batch {speed['batch']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# demo

#: the zoo model the demo trains
DEMO_MODEL = "deeper_ssd500_tiny"


def demo(solver: Optional[PathLike] = None, seed: int = 0, out: PathLike = "runs/demo",
         workers: Optional[int] = None, progress: bool = True, echo: Echo = None, note: Echo = None) -> dict:
    """``deeper-ssd demo``: build the sample set and the tiny Deeper SSD (unless ``solver`` names
    another solver prototxt, whose data must exist), train on the CPU with ``seed``, test, draw
    the training curves. Run from the repository root. Writes train.log, results.json,
    pr_curve.png, training.png and demo.json into ``out``; returns the demo.json dict (mAP,
    size-bucket APs, seconds). ``echo`` receives the stage lines and the test report, ``note``
    non-fatal notes; training logs to stdout. Raises NonFiniteError when training stopped."""
    from .eval.plots import parse_training_log, plot_training_log
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    solver_path = str(solver) if solver is not None else None
    if solver_path is None:
        if not Path("data/labelmap_drone.prototxt").is_file():
            raise UsageError("run the demo from the repository root (data/labelmap_drone.prototxt "
                             "is read relative to the working directory, as Caffe does)")
        from .builder import zoo
        from .data.sample import make_sample_set
        model = zoo_model(DEMO_MODEL)
        data = Path(model.dataset.train_source).parent
        _say(echo, f"[1/4] sample set -> {data}")
        sample = make_sample_set(data, seed, test=model.dataset.num_test_image)
        _say(echo, sample.summary())
        _say(echo, f"[2/4] model {DEMO_MODEL} -> prototxt/{DEMO_MODEL}/")
        checked_build(model, lambda m: zoo.write_model(m, "prototxt"))
        solver_path = f"prototxt/{DEMO_MODEL}/solver.prototxt"
    param = read_solver(solver_path)
    _say(echo, f"[3/4] training {solver_path} (seed {seed})")
    log_path = out / "train.log"
    if log_path.exists():
        log_path.unlink()
    train(solver_path, log=str(log_path), workers=workers, progress=progress, channels_last=True, seed=seed,
          device="cpu")
    trained = time.perf_counter() - start
    weights = f"{param.snapshot_prefix}_iter_{param.max_iter}.caffemodel"
    test_net = param.test_net[0] if len(param.test_net) else param.net
    _say(echo, f"[4/4] testing {weights}")
    report = test(test_net, weights, out, ap_version=param.ap_version or "11point",
                  name=Path(solver_path).parent.name, workers=workers, echo=echo, note=note)
    curves = plot_training_log(parse_training_log(log_path), out / "training.png", title=Path(solver_path).parent.name)
    total = time.perf_counter() - start
    command_line = "deeper-ssd demo" + (f" --solver {shlex.quote(str(solver))}" if solver is not None else "") \
        + (f" --seed {seed}" if seed else "")
    summary = dict(command=command_line, solver=solver_path, seed=seed,
                   mAP=report["mAP"], ap_version=report["ap_version"], test_images=report["images"],
                   size_buckets={b: e["mAP"] for b, e in report["size_buckets"].items()},
                   train_seconds=round(trained, 1), total_seconds=round(total, 1),
                   device=report["speed"]["device"])
    (out / "demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    _say(echo, f"mAP ({report['ap_version']}) {report['mAP']:.4f} on {report['images']} test images, seed "
               f"{seed}; {total / 60:.1f} min in all (training {trained / 60:.1f} min). Wrote "
               f"{out / 'pr_curve.png'}, {curves}, {out / 'results.json'}, {out / 'demo.json'}")
    return summary


# ---------------------------------------------------------------------------------------------
# detect and diffmap: deploy nets on image files

def _trained_net(model: PathLike, weights: PathLike, device, note: Echo = None, fast: bool = False) -> Net:
    """The TEST net of ``model`` with ``weights`` (which must fill at least one layer; layers
    left at their fillers are noted); with ``fast``, its fast inference path
    (:func:`deeper_ssd.fast.optimize`, compiled graphs cached in
    :func:`~deeper_ssd.fast.default_cache_dir`)."""
    net = Net.from_prototxt(model, "TEST", device=torch_device(device))
    missing = net.load_trained(weights)
    if missing:
        _say(note, f"{weights} has no weights for {len(missing)} layer(s) of {model} "
                   f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): they keep their fillers")
    if fast:
        from . import fast as fast_path
        return fast_path.optimize(net, cache_dir=fast_path.default_cache_dir())
    return net


def _read_image(path: PathLike):
    try:
        return detection.read_image(path)
    except ValueError as err:
        raise UsageError(str(err)) from None


def detect(model: PathLike, weights: PathLike, images: Sequence[PathLike], labelmap: Optional[PathLike] = None,
           out: PathLike = "detections", threshold: float = 0.5, mean: Sequence[float] = (104.0, 117.0, 123.0),
           scale: float = 1.0, device="cpu", note: Echo = None, fast: bool = True) -> Tuple[List[list], Path]:
    """``deeper-ssd detect``: run the deploy net ``model`` (with a DetectionOutput layer) on
    image files; write ``<stem>_detections.jpg`` per image and ``detections.json`` into ``out``.
    ``mean`` (BGR) is subtracted and the result multiplied by ``scale``; detections scoring at
    least ``threshold`` are kept. Returns one list of :class:`deeper_ssd.detect.Detection`
    (pixels of the original image) per image and the path of detections.json. ``note`` receives
    warnings: layers the weights leave at their fillers, non-finite detections dropped.
    ``fast``: the fast inference path (deeper_ssd.fast), the exact executor where it cannot."""
    net = _trained_net(model, weights, device, note, fast)
    labels = {item.label: item.display_name or item.name
              for item in io.read_labelmap(labelmap).item} if labelmap else None
    pixels = [_read_image(path) for path in images]
    results = detection.detect(net, pixels, labels, list(mean), scale, threshold,
                               warn=note or (lambda line: None))
    report = detection.write_outputs([Path(p) for p in images], pixels, results, Path(out))
    return results, report


def diffmap(model: PathLike, weights: PathLike, images: Sequence[PathLike], out: PathLike = "diffmap",
            device="cpu", echo: Echo = None, note: Echo = None, fast: bool = True,
            ) -> List[Tuple[SRTODView, Dict[str, Path]]]:
    """``deeper-ssd diffmap``: SR-TOD's view of image files through a deploy net with the SR-TOD
    head: reconstruction, difference map and mask, written as PNGs (and side by side) into
    ``out``. Returns, per image, its :class:`deeper_ssd.diffmap.SRTODView` and the paths
    written (``side_by_side`` among them); ``echo`` receives one line per image as it is done,
    ``note`` the layers the weights leave at their fillers. ``fast``: the fast inference path
    (deeper_ssd.fast), the exact executor where it cannot."""
    net = _trained_net(model, weights, device, note)
    if fast:
        try:
            keep = srtod.view_blobs(net)
        except ValueError as err:
            raise UsageError(str(err)) from None
        from . import fast as fast_path
        net = fast_path.optimize(net, cache_dir=fast_path.default_cache_dir(), extra_outputs=keep)
    views = []
    for path in images:
        try:
            view = srtod.srtod_view(net, _read_image(path))
        except ValueError as err:
            raise UsageError(str(err)) from None
        paths = srtod.write_view(view, Path(out), Path(path).stem)
        _say(echo, f"{path}: threshold {view.threshold:.4f}, difference map max {view.difference.max():.4f}, "
                   f"mask above threshold {float((view.mask == 1).mean()):.2%}; wrote {paths['side_by_side']}")
        views.append((view, paths))
    return views
