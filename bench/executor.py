"""Forward time of the executor vs the same network written by hand (bench/handwritten.py).

    python bench/executor.py [--models ssd300 deeper_ssd500] [--batches 1 8] [--rounds 5]

Both run in this process on the same weights and inputs, alternating (the order flips every
round so neither side always runs on a warm cache); the median of each is reported with the
ratio executor / hand-written (target and numbers: docs/performance.md, "Executor forward").
OpenCV's Caffe importer runs the
same deploy.prototxt + .caffemodel for reference. Outputs are checked equal before timing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import handwritten  # noqa: E402

from deeper_ssd import io  # noqa: E402
from deeper_ssd.net import Net  # noqa: E402

MODELS = {
    "ssd300": ("prototxt/ssd300_voc0712/deploy.prototxt", handwritten.ssd300, 21),
    "deeper_ssd500": ("prototxt/deeper_ssd500/deploy.prototxt", handwritten.deeper_ssd500, 2),
}


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(name: str, batches, rounds: int, opencv: bool) -> list:
    deploy, factory, classes = MODELS[name]
    net_param = io.read_net(HERE.parent / deploy)
    for layer in net_param.layer:        # result files would need the VOC label map; not timed
        layer.detection_output_param.ClearField("save_output_param")
    deploy = Path(tempfile.mkdtemp()) / "deploy.prototxt"
    io.write_net(net_param, deploy)
    net = Net(net_param, "TEST", seed=0)
    data = net.inputs[0]
    detections = [layer for layer in net.layers if layer.caffe_type == "DetectionOutput"][0]
    hand = factory(classes, detections)
    hand.copy_weights_from(net)
    net.eval()
    hand.eval()
    rows = []
    for batch in batches:
        x = torch.randn((batch,) + tuple(net.blob_shapes[data][1:])) * 50
        with torch.no_grad():
            ours_out = net(**{data: x})[detections.lp.top[0]]
            hand_out = hand.detect(x)
            assert ours_out.shape == hand_out.shape and torch.allclose(ours_out, hand_out, atol=1e-4), \
                f"{name}: executor and hand-written outputs differ"
            times = {"executor": [], "hand": []}
            runs = {"executor": lambda: net(**{data: x}), "hand": lambda: hand.detect(x)}
            for r in range(rounds):
                order = ("executor", "hand") if r % 2 == 0 else ("hand", "executor")
                for key in order:
                    times[key].append(_time(runs[key]))
        ours, base = statistics.median(times["executor"]), statistics.median(times["hand"])
        row = {"model": name, "batch": batch, "executor_s": ours, "hand_s": base, "ratio": ours / base}
        if opencv:
            row["opencv_s"] = _opencv_time(net, deploy, x, rounds)
        rows.append(row)
        print(_format(row), flush=True)
    return rows


def _opencv_time(net: Net, deploy: Path, x: torch.Tensor, rounds: int) -> float:
    import cv2
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "w.caffemodel"
        net.save_caffemodel(weights)
        cv_net = cv2.dnn.readNetFromCaffe(str(deploy), str(weights))
    blob = x.numpy()
    cv_net.setInput(blob)
    cv_net.forward()
    times = []
    for _ in range(rounds):
        cv_net.setInput(blob)
        times.append(_time(cv_net.forward))
    return statistics.median(times)


def _format(row: dict) -> str:
    text = (f"{row['model']:>14} batch {row['batch']}: executor {row['executor_s'] * 1000:8.1f} ms, "
            f"hand-written {row['hand_s'] * 1000:8.1f} ms, ratio {row['ratio']:.3f}")
    if "opencv_s" in row:
        text += f"  (OpenCV {row['opencv_s'] * 1000:.1f} ms)"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-opencv", action="store_true")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    for name in args.models:
        bench_model(name, args.batches, args.rounds, not args.no_opencv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
