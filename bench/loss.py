"""MultiBoxLoss forward + backward: the batched layer vs the per-image reference.

    python bench/loss.py [--batch 8] [--runs 7] [--threads 1] [--device cpu] [--seed 0]

For each configuration (SSD300's 8732 priors with 21 classes; Deeper SSD500's 28132 priors, read
from prototxt/deeper_ssd500/deploy.prototxt, with its 2 classes and with 21) it draws one batch
with 1-20 objects per image and random loc/conf values, then times, alternating, the batched
layer (``deeper_ssd.layers.multibox_loss.MultiBoxLoss``) and the deliberately simple per-image reference
(``tests/support/multibox.py``), both forward + backward with SSD's loss settings. It prints
the median times, their ratio and the peak memory of each (each variant measured once in a fresh
subprocess: peak resident-set growth over the inputs, sampled every 0.5 ms, on CPU;
``max_memory_allocated`` growth on CUDA).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deeper_ssd import io, shapes  # noqa: E402
from deeper_ssd.layers.multibox_loss import MultiBoxLoss  # noqa: E402
from deeper_ssd.layers.priorbox import PriorBox  # noqa: E402
from deeper_ssd.proto import caffe_pb2  # noqa: E402

VARIANCE = "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2"
# (feature map, image, prior_box_param) of SSD300 (docs/semantics.md, "SSD300 reference settings")
SSD300 = [(38, 300, "min_size: 30 max_size: 60 aspect_ratio: 2 step: 8"),
          (19, 300, "min_size: 60 max_size: 111 aspect_ratio: 2 aspect_ratio: 3 step: 16"),
          (10, 300, "min_size: 111 max_size: 162 aspect_ratio: 2 aspect_ratio: 3 step: 32"),
          (5, 300, "min_size: 162 max_size: 213 aspect_ratio: 2 aspect_ratio: 3 step: 64"),
          (3, 300, "min_size: 213 max_size: 264 aspect_ratio: 2 step: 100"),
          (1, 300, "min_size: 264 max_size: 315 aspect_ratio: 2 step: 300")]
DEEPER_SSD500 = ROOT / "prototxt" / "deeper_ssd500" / "deploy.prototxt"
CONFIGS = [("SSD300", 21), ("Deeper SSD500", 2), ("Deeper SSD500", 21)]
SSD_LOSS = "code_type: CENTER_SIZE"          # every other field at SSD's (= the default) value


def layer_param(text: str) -> caffe_pb2.LayerParameter:
    return io.parse_text(text, caffe_pb2.LayerParameter())


def make_priors(layout: str) -> torch.Tensor:
    """The mbox_priorbox blob of SSD300 or of the generated Deeper SSD500 deploy net."""
    if layout == "SSD300":
        tops = []
        for fm, img, params in SSD300:
            lp = layer_param(f'name: "p" type: "PriorBox" bottom: "f" bottom: "data" top: "p" '
                             f'prior_box_param {{ {params} {VARIANCE} }}')
            tops.append(PriorBox(lp, [(1, 1, fm, fm), (1, 3, img, img)]).priors((fm, fm), (img, img)))
        return torch.cat(tops, dim=2)
    plan = shapes.plan_net(io.read_net(DEEPER_SSD500), caffe_pb2.TEST, device="meta")
    tops = [step.layer.priors(plan.blob_shapes[step.bottoms[0]][2:], plan.blob_shapes[step.bottoms[1]][2:])
            for step in plan.layers if step.layer.caffe_type == "PriorBox"]
    return torch.cat(tops, dim=2)


def make_batch(layout, classes, batch, seed, device):
    rng = np.random.default_rng(seed)
    prior = make_priors(layout).to(device)
    k = prior.shape[2] // 4
    rows = []
    for i in range(batch):
        for _ in range(rng.integers(1, 21)):
            xy = rng.uniform(0, 0.9, 2)
            wh = rng.uniform(0.02, 0.6, 2)
            rows.append([i, rng.integers(1, classes), 0, *xy, *np.minimum(xy + wh, 1.0), 0])
    label = torch.tensor(rows, dtype=torch.float32, device=device).view(1, 1, -1, 8)
    gen = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch, 4 * k, generator=gen).to(device).requires_grad_()
    conf = torch.randn(batch, classes * k, generator=gen).to(device).requires_grad_()
    return loc, conf, prior, label


def variants(classes, shapes):
    from support.multibox import multibox_loss
    lp = layer_param(f'name: "mbox_loss" type: "MultiBoxLoss" bottom: "mbox_loc" bottom: "mbox_conf" '
                     f'bottom: "mbox_priorbox" bottom: "label" top: "mbox_loss" '
                     f'multibox_loss_param {{ num_classes: {classes} {SSD_LOSS} }}')
    layer = MultiBoxLoss(lp, shapes, caffe_pb2.TRAIN)
    return {"batched": layer,
            "reference": lambda *b: multibox_loss(*b, num_classes=classes, code_type="CENTER_SIZE")}


def step(fn, loc, conf, prior, label):
    loc.grad = conf.grad = None
    loss = fn(loc, conf, prior, label)
    loss.backward()
    if loc.is_cuda:
        torch.cuda.synchronize()
    return loss.item()


def measure_memory(args, layout, classes, name) -> float:
    """Peak memory (MiB) of one variant, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--memory-probe", json.dumps([layout, classes, name]),
                          "--batch", str(args.batch), "--seed", str(args.seed), "--device", args.device,
                          "--threads", str(args.threads)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_probe(args):
    layout, classes, name = json.loads(args.memory_probe)
    batch = make_batch(layout, classes, args.batch, args.seed, args.device)
    fn = variants(classes, [tuple(t.shape) for t in batch])[name]
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, *batch)
        print((torch.cuda.max_memory_allocated() - base) / 2 ** 20)
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * page

    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    base = rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    step(fn, *batch)
    done.set()
    sampler.join()
    print((max(peak[0], rss()) - base) / 2 ** 20)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=7, help="timed runs of each variant (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (CPU; on a shared machine more threads mostly measure contention)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args)
    print(f"MultiBoxLoss forward+backward, batch {args.batch}, 1-20 objects per image, device "
          f"{args.device}, {args.threads} thread(s), median of {args.runs} alternating runs")
    print(f"{'priors':>7} {'classes':>7} {'objects':>7} {'batched ms':>11} {'reference ms':>13} "
          f"{'ratio':>6} {'batched MiB':>12} {'reference MiB':>14}")
    for layout, classes in CONFIGS:
        batch = make_batch(layout, classes, args.batch, args.seed, args.device)
        fns = variants(classes, [tuple(t.shape) for t in batch])
        losses = {name: step(fn, *batch) for name, fn in fns.items()}       # warm-up + agreement
        if abs(losses["batched"] - losses["reference"]) > 1e-4 * abs(losses["reference"]):
            raise SystemExit(f"batched and reference disagree: {losses}")
        times = {name: [] for name in fns}
        for _ in range(args.runs):
            for name, fn in fns.items():
                start = time.perf_counter()
                step(fn, *batch)
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) * 1000 for name, t in times.items()}
        mem = {name: measure_memory(args, layout, classes, name) for name in fns}
        print(f"{batch[2].shape[2] // 4:>7} {classes:>7} {batch[3].shape[2]:>7} {med['batched']:>11.1f} "
              f"{med['reference']:>13.1f} {med['reference'] / med['batched']:>6.1f} "
              f"{mem['batched']:>12.1f} {mem['reference']:>14.1f}")


if __name__ == "__main__":
    main()
