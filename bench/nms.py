"""DetectionOutput (decode, top_k, NMS, keep_top_k) on SSD300's priors: the layer vs the first,
one-candidate-at-a-time implementation (tests/support/nms_reference.py).

    python bench/nms.py [--batches 1 8] [--runs 9] [--threads 1]

SSD300's 8732 priors, 21 classes, SSD's settings (CENTER_SIZE, nms_threshold 0.45, top_k 400,
keep_top_k 200, confidence_threshold 0.01), random loc offsets and softmax scores of random
logits, so every class has 400 candidates. The two variants alternate (order flipped every
round) in this process; both outputs are checked equal first. Prints the medians of wall time
and of process CPU time (steadier on a shared machine) and the ratio layer / reference.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import torch  # noqa: E402

from deeper_ssd.layers.detection_output import DetectionOutput  # noqa: E402
from loss import layer_param, make_priors  # noqa: E402
from support.nms_reference import detect as reference_detect  # noqa: E402

SSD = ("num_classes: 21 share_location: true background_label_id: 0 code_type: CENTER_SIZE "
       "nms_param { nms_threshold: 0.45 top_k: 400 } keep_top_k: 200 confidence_threshold: 0.01")


def inputs(batch: int, seed: int = 0):
    prior = make_priors("SSD300")
    k = prior.shape[2] // 4
    gen = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch, 4 * k, generator=gen)
    conf = torch.softmax(torch.randn(batch, k, 21, generator=gen), -1).view(batch, -1)
    return loc, conf, prior


def bench(batch: int, runs: int):
    loc, conf, prior = inputs(batch)
    lp = layer_param(f'name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" '
                     f'top: "out" detection_output_param {{ {SSD} }}')
    layer = DetectionOutput(lp, [tuple(loc.shape), tuple(conf.shape), tuple(prior.shape)])
    variants = {"layer": lambda: layer(loc, conf, prior),
                "reference": lambda: reference_detect(layer, loc, conf, prior)}
    assert torch.equal(variants["layer"](), variants["reference"]()), "layer and reference differ"
    wall = {key: [] for key in variants}
    cpu = {key: [] for key in variants}
    for r in range(runs):
        for key in (("layer", "reference") if r % 2 == 0 else ("reference", "layer")):
            w, c = time.perf_counter(), time.process_time()
            variants[key]()
            wall[key].append(time.perf_counter() - w)
            cpu[key].append(time.process_time() - c)
    med = {f"{kind}_{key}": statistics.median(series[key]) * 1000
           for kind, series in (("wall", wall), ("cpu", cpu)) for key in variants}
    print(f"batch {batch}: layer {med['wall_layer']:7.1f} ms wall ({med['cpu_layer']:6.1f} ms CPU), "
          f"reference {med['wall_reference']:7.1f} ms wall ({med['cpu_reference']:6.1f} ms CPU), "
          f"ratio {med['wall_layer'] / med['wall_reference']:.3f} wall, "
          f"{med['cpu_layer'] / med['cpu_reference']:.3f} CPU", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu")
    for batch in args.batches:
        bench(batch, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
