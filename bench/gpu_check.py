"""The GPU check: does training run on this machine's GPU(s), agree with the CPU, and how fast?

    bash bench/gpu_check.sh                       # on a GPU machine: ssd300 and deeper_ssd500
    python bench/gpu_check.py --dry-run           # the same steps on the CPU, tiny model (a test)
    python bench/gpu_check.py --models ssd300 --iterations 20 --batch 8 --device cuda:1

For each model (the generated train nets in prototxt/: ssd300_voc0712, deeper_ssd500,
deeper_ssd500_tiny), with one fixed synthetic batch (random image, 1-10 random boxes per image)
in place of the train data layer:

1. first-iteration loss on the device against the CPU's, same weights (random_seed 0): equal
   within ``--tolerance`` (default 1e-4, relative; TF32 off), else the check fails;
2. ``--iterations`` updates of :class:`deeper_ssd.solver.Solver` on one device, in float32 and
   with ``--amp`` bf16 and fp16 (CUDA; bf16 only on the CPU): images/s after one warm-up step,
   and every loss finite;
3. with two or more GPUs: the same with two processes over NCCL (one GPU each), images/s per GPU
   (``--dry-run``: two CPU processes over gloo).

Prints one line per run and a summary; exits 1 when a check failed, 2 on bad arguments. The
figures belong in docs/performance.md, "GPU check".
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from deeper_ssd import io  # noqa: E402
from deeper_ssd.solver import Solver, distributed  # noqa: E402
from deeper_ssd.solver.devices import DeviceError, describe, parse_device  # noqa: E402
from deeper_ssd.solver.precision import set_tf32  # noqa: E402
from synthetic import make_batch  # noqa: E402

#: model -> generated prototxt folder
MODELS = {"ssd300": "prototxt/ssd300_voc0712", "deeper_ssd500": "prototxt/deeper_ssd500",
          "deeper_ssd500_tiny": "prototxt/deeper_ssd500_tiny"}


def make_solver(model: str, batch: int, device, amp=None, comm=None) -> Solver:
    """The model's generated solver on ``device`` with SGD, no tests or snapshots, seed 0,
    and the train data layer replaced by :func:`make_batch`'s batch."""
    folder = ROOT / MODELS[model]
    param = io.read_solver(folder / "solver.prototxt")
    for field in ("test_net", "test_iter", "train_net"):
        param.ClearField(field)
    net = io.read_net(ROOT / io.read_solver(folder / "solver.prototxt").train_net)
    net.layer[0].data_param.batch_size = batch
    param.train_net_param.CopyFrom(net)
    param.test_interval, param.snapshot, param.snapshot_after_train, param.display = 0, 0, False, 0
    param.random_seed, param.type = 0, "SGD"
    solver = Solver(param, device=device, log=lambda line: None, comm=comm, data_workers=0, amp=amp)
    data = next(layer for layer in solver.train_net.layers if layer.is_source)
    size = solver.train_net.blob_shapes[data.lp.top[0]][2]
    classes = solver.train_net.layer_by_name["mbox_loss"].lp.multibox_loss_param.num_classes
    images, label = make_batch(batch, size, classes)
    data.forward = lambda: (images, label)
    solver.fixed_batch = (images, label)
    return solver


def first_loss(solver: Solver) -> float:
    """The loss of one forward pass on the fixed batch (no update)."""
    images, label = solver.fixed_batch
    with torch.no_grad():
        return float(solver.train_net(data=images.to(solver.device), label=label.to(solver.device)).loss)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_training(solver: Solver, iterations: int) -> dict:
    """One warm-up update, then ``iterations`` more: images/s of this process and the losses."""
    losses = []
    solver.log = lambda line: None
    solver.step(1)
    _sync(solver.device)
    start = time.perf_counter()
    for _ in range(iterations):
        solver.step(1)
        losses.append(solver.smoothed_loss)
    _sync(solver.device)
    seconds = time.perf_counter() - start
    batch = solver.batch_size * solver.param.iter_size
    return dict(images_per_s=batch * iterations / seconds, losses=losses,
                finite=all(math.isfinite(v) for v in losses))


def _rank(comm, model: str, batch: int, iterations: int, amp):
    solver = make_solver(model, batch, comm.device, amp=amp, comm=comm)
    try:
        return timed_training(solver, iterations)
    finally:
        solver.close()


def check(models, device: torch.device, batch: int, iterations: int, tolerance: float, amps, ranks=(),
          say=print) -> bool:
    """Run the check (module docstring) on ``device`` and, when ``ranks`` names two devices,
    with two processes on those; ``say`` gets each line. True when everything passed."""
    set_tf32(False)
    ok = True
    say(f"device {describe(device)}; torch {torch.__version__}; TF32 off; batch {batch}; {iterations} iterations")
    for model in models:
        cpu = make_solver(model, batch, "cpu")
        reference = first_loss(cpu)
        cpu.close()
        solver = make_solver(model, batch, device)
        loss = first_loss(solver)
        same = abs(loss - reference) <= tolerance * max(1.0, abs(reference))
        ok &= same
        say(f"{model}: first-iteration loss {loss:.6f} on {device}, {reference:.6f} on cpu: "
            f"{'equal' if same else 'DIFFERENT'} (tolerance {tolerance:g} relative)")
        solver.close()
        for amp in amps:
            solver = make_solver(model, batch, device, amp=amp)
            try:
                run = timed_training(solver, iterations)
            finally:
                solver.close()
            ok &= run["finite"]
            say(f"{model}: 1 x {device.type}, {amp or 'float32'}: {run['images_per_s']:.1f} images/s"
                + ("" if run["finite"] else "; NON-FINITE LOSS"))
        if len(ranks) >= 2:
            kind, backend = torch.device(ranks[0]).type, distributed.backend_for(torch.device(ranks[0]))
            for amp in amps:
                runs = distributed.spawn(_rank, list(ranks), args=(model, batch, iterations, amp))
                finite = all(r["finite"] for r in runs)
                ok &= finite
                say(f"{model}: {len(ranks)} x {kind} ({backend}), {amp or 'float32'}: "
                    f"{sum(r['images_per_s'] for r in runs) / len(runs):.1f} images/s per "
                    f"{'GPU' if kind == 'cuda' else 'process'}" + ("" if finite else "; NON-FINITE LOSS"))
    say("GPU check " + ("passed" if ok else "FAILED"))
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ssd300,deeper_ssd500", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="images per GPU")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--dry-run", action="store_true", help="CPU only, deeper_ssd500_tiny, batch 2, "
                        "1 iteration, two processes over gloo: the script's own check")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.models, args.device, args.batch, args.iterations = "deeper_ssd500_tiny", "cpu", 2, 1
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(MODELS)}")
    if args.iterations < 1 or args.batch < 1 or not args.tolerance > 0:
        parser.error("--iterations and --batch must be >= 1, --tolerance > 0")
    try:
        device = parse_device(args.device)
    except DeviceError as err:
        parser.error(str(err))
    cuda = device.type == "cuda"
    amps = [None, "bf16", "fp16"] if cuda else [None, "bf16"]
    ranks = ["cuda:0", "cuda:1"] if cuda and torch.cuda.device_count() >= 2 else (["cpu", "cpu"] if args.dry_run else [])
    return 0 if check(models, device, args.batch, args.iterations, args.tolerance, amps, ranks) else 1


if __name__ == "__main__":
    sys.exit(main())
