"""The ``deeper-ssd`` command line; ``tools/*.py`` are thin wrappers over these subcommands.

Every subcommand reports bad input (unreadable file, parse error, inconsistent shapes) as one
line on stderr and exits with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

from . import io
from .layers import LayerError
from .proto import caffe_pb2

__all__ = ["main", "UsageError"]


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


_COMMANDS: Dict[str, Callable] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn(args) -> exit status`` as subcommand ``name``; ``arguments(parser)`` adds
    its options. Each subcommand lives in its own section below."""
    def wrap(fn):
        _COMMANDS[name] = (fn, help, arguments)
        return fn
    return wrap


def _shape_arg(text: str):
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,300,300") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r}: dimensions must be positive")
    return dims


def _phase_arg(text: str) -> int:
    try:
        return caffe_pb2.Phase.Value(text.upper())
    except ValueError:
        raise argparse.ArgumentTypeError(f"phase must be TRAIN or TEST, not {text!r}") from None


# ---------------------------------------------------------------------------------------------

def _sizes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("net", help="net prototxt (train, test or deploy)")
    p.add_argument("--input", type=_shape_arg, metavar="N,C,H,W",
                   help="shape of the first input blob (default: as the net declares it)")
    p.add_argument("--phase", type=_phase_arg, default=caffe_pb2.TEST, help="TRAIN or TEST (default TEST)")
    p.add_argument("--format", choices=("md", "csv", "json"), default="md")


@command("sizes", "per-layer output shapes, parameters and multiply-accumulates of a net",
         _sizes_arguments)
def cmd_sizes(args) -> int:
    from . import shapes
    net = io.read_net(args.net)
    overrides = None
    if args.input:
        plan = shapes.plan_net(net, args.phase, device="meta")
        sources = [step for step in plan.layers if step.layer.is_source]
        if not sources:
            raise UsageError(f"{args.net}: --input given but the net has no input layer")
        overrides = {sources[0].tops[0]: args.input}
    rows = shapes.infer_shapes(net, args.phase, input_shapes=overrides)
    print(shapes.format_table(rows, args.format))
    return 0


# ---------------------------------------------------------------------------------------------

def _detect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", required=True, help="deploy prototxt (with a DetectionOutput layer)")
    p.add_argument("--weights", required=True, help=".caffemodel")
    p.add_argument("--labelmap", help="label map prototxt (names in the output)")
    p.add_argument("--out", default="detections", help="output folder (default: detections/)")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum score drawn and listed")
    p.add_argument("--mean", default="104,117,123", help="BGR mean subtracted (default SSD's)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplier after mean subtraction")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


@command("detect", "run a deploy net on images; write annotated images and detections.json",
         _detect_arguments)
def cmd_detect(args) -> int:
    from pathlib import Path
    import torch
    from . import detect
    from .net import Net
    try:
        mean = [float(v) for v in args.mean.split(",")]
    except ValueError:
        raise UsageError(f"--mean {args.mean!r}: give comma-separated numbers") from None
    device = torch.device(args.device)
    net = Net.from_prototxt(args.model, "TEST", device=device)
    net.load_caffemodel(args.weights)
    labels = {item.label: item.display_name or item.name
              for item in io.read_labelmap(args.labelmap).item} if args.labelmap else None
    try:
        images = [detect.read_image(path) for path in args.images]
    except ValueError as err:
        raise UsageError(str(err)) from None
    results = detect.detect(net, images, labels, mean, args.scale, args.threshold)
    report = detect.write_outputs([Path(p) for p in args.images], images, results, Path(args.out))
    for path, dets in zip(args.images, results):
        print(f"{path}: {len(dets)} detection(s)" + "".join(
            f"\n  {d.name} {d.score:.3f} [{d.xmin:.0f}, {d.ymin:.0f}, {d.xmax:.0f}, {d.ymax:.0f}]" for d in dets))
    print(f"wrote {report}")
    return 0


# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeper-ssd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (fn, help_text, arguments) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        arguments(sp)
        sp.set_defaults(func=fn)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (UsageError, io.CaffeFormatError, LayerError) as err:
        print(f"deeper-ssd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deeper-ssd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
