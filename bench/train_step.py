"""One SGD iteration (forward, MultiBoxLoss, backward, update): the trainer vs hand-written PyTorch.

    python bench/train_step.py [--models ssd300 deeper_ssd500 deeper_ssd500_tiny] [--batch 8]
                               [--rounds 3] [--device cpu]

*Ours* is one ``Solver.step(1)`` of deeper_ssd.solver on the generated train net
(prototxt/ssd300_voc0712, prototxt/deeper_ssd500, prototxt/deeper_ssd500_tiny, the last with
SGD instead of its Adam): zeroing the gradients, the executor's forward with MultiBoxLoss,
backward, the loss/gradient-norm check, the smoothed loss, Caffe's SGD update.
*Hand-written* is the same network typed out as plain modules (bench/handwritten.py), the same
MultiBoxLoss layer object, ``torch.optim.SGD`` (momentum 0.9, weight decay 5e-4 on weights,
biases at 2x lr without decay) and ``loss.item()`` per step, as a PyTorch user writes it. Both
get the same weights and the same fixed batch (random image, 1-10 random boxes per image; the
train data layer is replaced by that batch — data loading is measured below). The first step
of each is checked to give the same loss, then steps alternate (order flipped every round) and
the medians are compared (target and numbers: docs/performance.md, "Training step").

Data loading: ``--data`` also times the train data layer of each model (default 1 worker, SSD
augmentation) on the bundled sample set, in images/s, against the images/s the training step
consumes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import handwritten  # noqa: E402
from synthetic import make_batch  # noqa: E402

from deeper_ssd import io  # noqa: E402
from deeper_ssd.solver import Solver  # noqa: E402

MODELS = {
    "ssd300": ("prototxt/ssd300_voc0712", handwritten.ssd300, 21),
    "deeper_ssd500": ("prototxt/deeper_ssd500", handwritten.deeper_ssd500, 2),
    "deeper_ssd500_tiny": ("prototxt/deeper_ssd500_tiny", handwritten.deeper_ssd500_tiny, 2),
}


def our_solver(folder: str, batch: int, device: str) -> Solver:
    param = io.read_solver(ROOT / folder / "solver.prototxt")
    param.ClearField("test_net")
    param.ClearField("test_iter")
    param.test_interval, param.snapshot, param.snapshot_after_train, param.display = 0, 0, False, 0
    net = io.read_net(ROOT / param.train_net)
    net.layer[0].data_param.batch_size = batch
    param.ClearField("train_net")
    param.train_net_param.CopyFrom(net)
    param.random_seed = 0
    param.type = "SGD"             # the tiny model trains with Adam; both sides time SGD here
    return Solver(param, device=device, log=lambda message: None)


def hand_optimizer(hand, param):
    weights, biases = [], []
    for name, p in hand.named_parameters():
        (biases if name.endswith(".bias") else weights).append(p)
    return torch.optim.SGD([dict(params=weights, lr=param.base_lr, weight_decay=param.weight_decay),
                            dict(params=biases, lr=2 * param.base_lr, weight_decay=0.0)],
                           lr=param.base_lr, momentum=param.momentum)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_model(name: str, batch: int, rounds: int, device: str) -> dict:
    folder, factory, classes = MODELS[name]
    solver = our_solver(folder, batch, device)
    net = solver.train_net
    data = next(layer for layer in net.layers if layer.is_source)
    size = net.blob_shapes[data.lp.top[0]][2]
    x, label = make_batch(batch, size, classes)
    data.forward = lambda: (x, label)                        # the fixed batch replaces the LMDB
    loss_layer = net.layer_by_name["mbox_loss"]
    hand = factory(classes).to(device)
    hand.copy_weights_from(net)
    opt = hand_optimizer(hand, solver.param)
    xd, ld = x.to(device), label.to(device)

    with torch.no_grad():
        ours0 = float(net(data=xd, label=ld).loss)
        theirs0 = float(loss_layer(*hand(xd), ld))
    assert abs(ours0 - theirs0) <= 1e-4 * max(1.0, abs(ours0)), (ours0, theirs0)

    def ours():
        solver.step(1)

    def theirs():
        loc, conf, priors = hand(xd)
        loss = loss_layer(loc, conf, priors, ld)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    def timed(fn):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    timed(ours), timed(theirs)                                 # warm-up
    times = {"ours": [], "hand": []}
    for r in range(rounds):
        order = (("ours", ours), ("hand", theirs)) if r % 2 == 0 else (("hand", theirs), ("ours", ours))
        for key, fn in order:
            times[key].append(timed(fn))
    ours_s, hand_s = statistics.median(times["ours"]), statistics.median(times["hand"])
    return dict(model=name, batch=batch, size=size, ours_s=ours_s, hand_s=hand_s, ratio=ours_s / hand_s,
                images_per_s=batch / ours_s)


def bench_data(name: str, batches: int = 10) -> dict:
    """Images/s of the model's train data layer (default worker count) on the sample set."""
    import tempfile
    from deeper_ssd.data.sample import make_sample_set
    from deeper_ssd.net import Net
    folder, _, _ = MODELS[name]
    sample = Path(tempfile.mkdtemp()) / "sample"
    make_sample_set(sample, seed=0, train=8 * batches, test=8)
    net_param = io.read_net(ROOT / folder / "train.prototxt")
    net_param.layer[0].data_param.source = str(sample / "trainval_lmdb")
    net_param.layer[0].annotated_data_param.label_map_file = str(sample / "labelmap_drone.prototxt")
    net = Net(net_param, "TRAIN", device="meta")
    layer = net.layers[0]
    layer()                                                    # start the workers
    start = time.perf_counter()
    for _ in range(batches):
        layer()
    elapsed = time.perf_counter() - start
    layer.close()
    return dict(model=name, images_per_s=batches * layer.top_shapes[0][0] / elapsed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", action="store_true", help="also time the train data layers")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print("| model | batch | ours s/iter | hand-written s/iter | ratio | ours images/s |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.models:
        row = bench_model(name, args.batch, args.rounds, args.device)
        rows.append(row)
        print(f"| {name} {row['size']}x{row['size']} | {row['batch']} | {row['ours_s']:.3f} | "
              f"{row['hand_s']:.3f} | {row['ratio']:.3f} | {row['images_per_s']:.2f} |", flush=True)
    if args.data:
        print("\n| model | data layer images/s (default workers) | training consumes images/s |")
        print("|---|---:|---:|")
        for row in rows:
            d = bench_data(row["model"])
            print(f"| {row['model']} | {d['images_per_s']:.1f} | {row['images_per_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
