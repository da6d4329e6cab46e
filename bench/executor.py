"""Forward time (to detections) of every way this project runs a deploy net, against OpenCV and
against the same network written by hand (bench/handwritten.py).

    python bench/executor.py [--models ssd300 deeper_ssd500] [--batches 1 8] [--rounds 5]
                             [--threads N] [--clock wall|cpu]

In this process, on the same weights and input, round-robin (the order rotates every round so
no variant always runs on a warm cache), medians reported:

* exact: the executor (deeper_ssd.net.Net);
* fast: its fast inference path (deeper_ssd.fast.optimize, default backend: ONNX Runtime
  when installed, else a frozen TorchScript graph; ``fast-ts`` times the TorchScript backend
  as well when ONNX Runtime is the default);
* onnx: ONNX Runtime on the ``deeper-ssd export --no-nms`` model, followed by the same
  DetectionOutput layer;
* opencv: OpenCV's Caffe importer on the same deploy.prototxt + .caffemodel;
* hand: the hand-written PyTorch network with the same DetectionOutput.

Ratios are printed against OpenCV and against the hand-written network. Outputs are checked
equal (exact vs hand-written) first. OpenCV and ONNX Runtime use as many threads as torch.
"""
from __future__ import annotations

import argparse
import importlib.util
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
from deeper_ssd.export import export_onnx  # noqa: E402
from deeper_ssd.fast import optimize  # noqa: E402
from deeper_ssd.net import Net  # noqa: E402

MODELS = {
    "ssd300": ("prototxt/ssd300_voc0712/deploy.prototxt", handwritten.ssd300, 21),
    "deeper_ssd500": ("prototxt/deeper_ssd500/deploy.prototxt", handwritten.deeper_ssd500, 2),
}


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def _time(fn) -> float:
    start = clock()
    fn()
    return clock() - start


def bench_model(name: str, batches, rounds: int, opencv: bool) -> list:
    deploy, factory, classes = MODELS[name]
    net_param = io.read_net(HERE.parent / deploy)
    for layer in net_param.layer:        # result files would need the VOC label map; not timed
        layer.detection_output_param.ClearField("save_output_param")
    folder = Path(tempfile.mkdtemp())
    deploy = folder / "deploy.prototxt"
    io.write_net(net_param, deploy)
    net = Net(net_param, "TEST", seed=0)
    data = net.inputs[0]
    detections = [layer for layer in net.layers if layer.caffe_type == "DetectionOutput"][0]
    top = detections.lp.top[0]
    hand = factory(classes, detections)
    hand.copy_weights_from(net)
    net.eval()
    hand.eval()
    weights = folder / "w.caffemodel"
    net.save_caffemodel(weights)
    rows = []
    for batch in batches:
        x = torch.randn((batch,) + tuple(net.blob_shapes[data][1:])) * 50
        runs, compile_s = _variants(net, hand, data, x, detections, folder, opencv, deploy, weights)
        with torch.no_grad():
            ours_out = net(**{data: x})[top]
            hand_out = hand.detect(x)
            assert ours_out.shape == hand_out.shape and torch.allclose(ours_out, hand_out, atol=1e-4), \
                f"{name}: executor and hand-written outputs differ"
            times = {key: [] for key in runs}
            keys = list(runs)
            for r in range(rounds):
                for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                    times[key].append(_time(runs[key]))
        row = {"model": name, "batch": batch, "compile_s": compile_s,
               **{key: statistics.median(value) for key, value in times.items()}}
        rows.append(row)
        print(_format(row), flush=True)
    return rows


def _variants(net, hand, data, x, detections, folder, opencv, deploy, weights):
    """The timed callables by name, and the fast path's compile times (cold, warm from the cache)."""
    runs = {"exact": lambda: net(**{data: x}), "hand": lambda: hand.detect(x)}
    compile_s = {}
    backends = [None]
    if importlib.util.find_spec("onnxruntime"):
        backends.append("torchscript")
    cache = folder / "cache"
    for backend in backends:
        fast_net = optimize(net, backend=backend, cache_dir=cache)
        fast_net(**{data: x})
        cold = fast_net.last_compile_s
        warm_net = optimize(net, backend=backend, cache_dir=cache)      # a second process would do this
        warm_net(**{data: x})
        label = "fast" if backend is None else "fast-ts"
        compile_s[label] = (cold, warm_net.last_compile_s, fast_net.backend)
        runs[label] = (lambda f: lambda: f(**{data: x}))(warm_net)
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime
        names = export_onnx(net, folder / "net.onnx", batch=x.shape[0])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(str(folder / "net.onnx"), options,
                                               providers=["CPUExecutionProvider"])
        bottoms = [names.index(b) for b in detections.lp.bottom[:3]]

        def onnx_run():
            outs = session.run(None, {data: x.numpy()})
            return detections(*(torch.from_numpy(outs[i]) for i in bottoms))
        runs["onnx"] = onnx_run
    if opencv:
        import cv2
        cv2.setNumThreads(torch.get_num_threads())
        cv_net = cv2.dnn.readNetFromCaffe(str(deploy), str(weights))
        blob = x.numpy()

        def cv_run():
            cv_net.setInput(blob)
            return cv_net.forward()
        runs["opencv"] = cv_run
    return runs, compile_s


def _format(row: dict) -> str:
    names = [k for k in ("exact", "fast", "fast-ts", "onnx", "opencv", "hand") if k in row]
    text = f"{row['model']} batch {row['batch']}: " + ", ".join(f"{k} {row[k] * 1000:.1f} ms" for k in names)
    for base in ("opencv", "hand"):
        if base in row:
            text += f"\n  / {base}: " + ", ".join(f"{k} {row[k] / row[base]:.3f}" for k in names if k != base)
    for label, (cold, warm, backend) in row["compile_s"].items():
        text += f"\n  {label} ({backend}) start: {cold:.1f} s cold, {warm:.1f} s from the cache"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-opencv", action="store_true")
    parser.add_argument("--threads", type=int, help="threads of torch, ONNX Runtime and OpenCV "
                        "(default: torch's)")
    parser.add_argument("--clock", choices=list(CLOCK), default="wall", help="wall time, or the "
                        "process's CPU time (steadier on a shared machine; use with --threads 1)")
    args = parser.parse_args(argv)
    global clock
    clock = CLOCK[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, {args.clock} time")
    for name in args.models:
        bench_model(name, args.batches, args.rounds, not args.no_opencv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
