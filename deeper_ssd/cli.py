"""The ``deeper-ssd`` command line; ``tools/*.py`` are thin wrappers over these subcommands.

Every subcommand reports bad input (unreadable file, parse error, inconsistent shapes) as one
line on stderr and exits with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

from . import io
from .errors import LayerError, UsageError
from .proto import caffe_pb2

__all__ = ["main", "UsageError"]


_COMMANDS: Dict[str, Callable] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn(args) -> exit status`` as subcommand ``name``; ``arguments(parser)`` adds
    its options. Each subcommand lives in its own section below."""
    def wrap(fn):
        _COMMANDS[name] = (fn, help, arguments)
        return fn
    return wrap


def _checked(model, build: Callable):
    """:func:`deeper_ssd.pipelines.checked_build` (imported when a command runs: building the
    parser and ``--help`` import no torch)."""
    from .pipelines import checked_build
    return checked_build(model, build)


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
    p.add_argument("--exact", action="store_true", help="run the exact executor (default: the fast "
                   "path, compiled once and checked equal to it, docs/performance.md)")


@command("detect", "run a deploy net on images; write annotated images and detections.json",
         _detect_arguments)
def cmd_detect(args) -> int:
    from . import pipelines
    try:
        mean = [float(v) for v in args.mean.split(",")]
    except ValueError:
        raise UsageError(f"--mean {args.mean!r}: give comma-separated numbers") from None
    results, report = pipelines.detect(args.model, args.weights, args.images, args.labelmap, args.out,
                                       args.threshold, mean, args.scale, args.device, note=_note,
                                       fast=not args.exact)
    for path, dets in zip(args.images, results):
        print(f"{path}: {len(dets)} detection(s)" + "".join(
            f"\n  {d.name} {d.score:.3f} [{d.xmin:.0f}, {d.ymin:.0f}, {d.xmax:.0f}, {d.ymax:.0f}]" for d in dets))
    print(f"wrote {report}")
    return 0


# ---------------------------------------------------------------------------------------------
# SR-TOD: the difference-map view of a net with the SR-TOD head (docs/srtod.md)

def _diffmap_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--model", required=True, help="deploy prototxt with the SR-TOD head "
                   "(deeper-ssd generate MODEL --head srtod)")
    p.add_argument("--weights", required=True, help=".caffemodel")
    p.add_argument("--out", default="diffmap", help="output folder (default: diffmap/)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--exact", action="store_true", help="run the exact executor (default: the fast "
                   "path, compiled once and checked equal to it, docs/performance.md)")


@command("diffmap", "SR-TOD's view of images: reconstruction, difference map and mask as PNGs "
         "side by side (the paper's Fig. 1)", _diffmap_arguments)
def cmd_diffmap(args) -> int:
    from . import pipelines
    pipelines.diffmap(args.model, args.weights, args.images, args.out, args.device, echo=print, note=_note,
                      fast=not args.exact)
    return 0


# ---------------------------------------------------------------------------------------------
# OpenCV: a deploy net against OpenCV's Caffe importer; nets with our own layer types refused

def _opencv_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="deploy prototxt")
    p.add_argument("--weights", help=".caffemodel (default: the net's fillers, seeded by --seed)")
    p.add_argument("--seed", type=int, default=0, help="weights and input seed (default 0)")
    p.add_argument("--batch", type=int, default=1, help="images in the input (default 1)")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="largest accepted |ours - OpenCV| / max |ours| per layer (default 1e-4)")
    p.add_argument("--all", action="store_true", help="print every layer, not only those that differ")


@command("opencv-check", "run a deploy net in deeper-ssd and in OpenCV's Caffe importer on one "
         "seeded input and compare every layer (nets with SR-TOD/ZoomInNet layers are refused)",
         _opencv_check_arguments)
def cmd_opencv_check(args) -> int:
    from . import opencv_check
    try:
        result = opencv_check.compare(args.model, args.weights, args.seed, batch=args.batch)
    except opencv_check.OpenCVUnsupported as err:
        raise UsageError(str(err)) from None
    failures = result.failures(args.rtol)
    shown = result.layers if args.all else failures
    width = max([len(d.layer) for d in shown] + [5])
    for d in shown:
        verdict = "ok" if d.relative <= args.rtol else "DIFFERS"
        print(f"{d.layer:<{width}}  {d.type:<16} {'x'.join(map(str, d.shape)):>14}  max |diff| "
              f"{d.max_abs_diff:.3g}  (relative {d.relative:.3g})  {verdict}  {d.note}".rstrip())
    worst = result.worst()
    print(f"{len(result.layers)} layers compared, {len(failures)} differ beyond rtol {args.rtol:g}; "
          f"largest relative difference {worst.relative:.3g} at {worst.layer} ({worst.type})")
    if result.skipped:
        print(f"not compared: {len(result.skipped)} layers from PriorBox on ({', '.join(result.skipped[:4])}"
              f"{', ...' if len(result.skipped) > 4 else ''}): the net has non-integer prior sizes, "
              "which Caffe truncates to int and OpenCV does not")
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------
# data: annotated LMDB creation and inspection, the bundled sample set

def create_data_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the SSD fork's scripts/create_annoset.py (same names and defaults), plus
    --skip-bad, --seed and --name-size."""
    p.add_argument("root", help="folder the list file's paths are relative to")
    p.add_argument("listfile", help="lines '<image> <annotation>' (or '<image> <int label>')")
    p.add_argument("outdir", help="the LMDB to write")
    p.add_argument("exampledir", nargs="?", help="folder to receive a symlink to the LMDB")
    p.add_argument("--redo", action="store_true", help="recreate the database if it exists")
    p.add_argument("--anno-type", default="classification", choices=("classification", "detection"))
    p.add_argument("--label-type", default="xml", choices=("xml", "json", "txt", "visdrone", "coco"),
                   help="xml: VOC; json: the fork's per-image COCO file; txt: 'label xmin ymin "
                   "xmax ymax'; visdrone: VisDrone-DET text; coco: an instances json holding the "
                   "image (COCO, AI-TOD); see docs/decisions.md for ignored regions and crowds")
    p.add_argument("--backend", default="lmdb", choices=("lmdb", "leveldb"))
    p.add_argument("--check-size", action="store_true", help="all images must have one size")
    p.add_argument("--encode-type", default="", help="encode images as this type (jpg, png ...)")
    p.add_argument("--encoded", action="store_true", help="store encoded images")
    p.add_argument("--gray", action="store_true", help="read images as grayscale")
    p.add_argument("--label-map-file", default="", help="LabelMap prototxt (detection)")
    p.add_argument("--min-dim", type=int, default=0)
    p.add_argument("--max-dim", type=int, default=0)
    p.add_argument("--resize-height", type=int, default=0)
    p.add_argument("--resize-width", type=int, default=0)
    p.add_argument("--shuffle", action="store_true", help="shuffle the list (seeded by --seed)")
    p.add_argument("--check-label", action="store_true", help="duplicate names/labels are fatal")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip and count unreadable images and bad annotations instead of stopping")
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle (default 0)")
    p.add_argument("--name-size", metavar="FILE",
                   help="also write '<stem> <height> <width>' per entry (get_image_size)")


@command("create-data", "build an annotated LMDB from images and VOC/COCO annotations "
         "(drop-in for the SSD fork's create_annoset.py)", create_data_arguments)
def cmd_create_data(args) -> int:
    import os
    from .data import annoset
    if args.backend != "lmdb":
        raise UsageError("--backend leveldb is not supported; use lmdb (what the SSD scripts use)")
    options = annoset.ConvertOptions(
        anno_type=args.anno_type, label_type=args.label_type, label_map_file=args.label_map_file,
        check_label=args.check_label, min_dim=args.min_dim, max_dim=args.max_dim,
        resize_width=args.resize_width, resize_height=args.resize_height,
        encode_type=args.encode_type, encoded=args.encoded, gray=args.gray,
        check_size=args.check_size, shuffle=args.shuffle, seed=args.seed, skip_bad=args.skip_bad)
    try:
        report = annoset.build_annoset(args.root, args.listfile, args.outdir, options, redo=args.redo)
        if args.name_size:
            annoset.write_name_size_file(args.root, args.listfile, args.name_size)
    except annoset.AnnosetError as err:
        raise UsageError(str(err)) from None
    for message in report.skipped:
        print(f"skipped {message}", file=sys.stderr)
    for message in report.warnings:
        print(f"warning: {message}", file=sys.stderr)
    if args.exampledir:
        os.makedirs(args.exampledir, exist_ok=True)
        link = os.path.join(args.exampledir, os.path.basename(os.path.normpath(args.outdir)))
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(os.path.abspath(args.outdir), link)
    print(report.summary())
    return 0


def _create_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="dataset root (the list paths are relative to it; create-data's ROOT)")
    p.add_argument("outdir", help="folder for trainval.txt, test.txt and test_name_size.txt")
    p.add_argument("--layout", required=True, choices=("voc", "folders", "coco"),
                   help="voc: VOCdevkit years; folders: Images/Labels (or images/annotations, "
                   "VisDrone) folder pairs; coco: IMAGES:JSON image folder + instances json")
    p.add_argument("--trainval", nargs="*", metavar="SPEC", help="parts of the training list "
                   "(voc default: VOC2007 VOC2012)")
    p.add_argument("--test", nargs="*", metavar="SPEC", help="parts of the test list (voc default: VOC2007)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trainval shuffle (default 0)")
    p.add_argument("--no-name-size", action="store_true", help="do not write test_name_size.txt")


@command("create-list", "write trainval.txt (shuffled), test.txt and test_name_size.txt for "
         "create-data from a VOCdevkit, image/label folder pairs (VisDrone) or COCO-style json "
         "(the SSD fork's create_list.sh)", _create_list_arguments)
def cmd_create_list(args) -> int:
    from .data import annoset, lists
    try:
        report = lists.create_lists(args.root, args.outdir, args.layout, args.trainval, args.test,
                                    seed=args.seed, name_size=not args.no_name_size)
    except annoset.AnnosetError as err:
        raise UsageError(str(err)) from None
    print(report.summary())
    return 0


def _convert_vgg_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="torchvision VGG16 state dict (.pth, e.g. vgg16-397923af.pth) or "
                   "Caffe's original VGG_ILSVRC_16_layers.caffemodel (V1 file)")
    p.add_argument("out", help="the .caffemodel to write (VGG_ILSVRC_16_layers_fc_reduced layout)")
    p.add_argument("--mean", default="104,117,123",
                   help="BGR mean the data layers subtract (transform_param mean_value; default SSD's)")


@command("convert-vgg", "convert torchvision's ImageNet VGG16 into the SSD fork's fc-reduced "
         "VGG16 base (BGR 0-255 mean-subtracted input, fc6/fc7 subsampled) for train --weights",
         _convert_vgg_arguments)
def cmd_convert_vgg(args) -> int:
    from . import convert_vgg
    try:
        mean = [float(v) for v in args.mean.split(",")]
    except ValueError:
        mean = []
    if len(mean) != 3:
        raise UsageError(f"--mean {args.mean!r}: give three comma-separated numbers (B,G,R)")
    try:
        names = convert_vgg.convert_file(args.source, args.out, mean)
    except convert_vgg.VGGConversionError as err:
        raise UsageError(str(err)) from None
    print(f"{args.out}: {len(names)} layers ({', '.join(names)})")
    return 0


def _data_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("db", help="annotated LMDB")
    p.add_argument("--list", action="store_true", help="one line per record")
    p.add_argument("--dump", nargs="+", default=[], metavar="KEY|INDEX",
                   help="print these records in full (image bytes by length)")


@command("data-info", "count, list and dump the records of an annotated LMDB", _data_info_arguments)
def cmd_data_info(args) -> int:
    from .data import annoset
    try:
        annoset.describe_db(args.db, args.list, args.dump)
    except annoset.AnnosetError as err:
        raise UsageError(str(err)) from None
    return 0


def _make_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="data/sample/generated", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=300, help="training images")
    p.add_argument("--test", type=int, default=100, help="test images")
    p.add_argument("--backgrounds", help="folder of background photos (default data/sample/backgrounds)")


@command("make-sample", "generate the bundled synthetic drone set (images, VOC XML, LMDBs)",
         _make_sample_arguments)
def cmd_make_sample(args) -> int:
    from .data.sample import make_sample_set
    try:
        report = make_sample_set(args.out, args.seed, args.train, args.test,
                                 backgrounds=args.backgrounds)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None
    print(report.summary())
    return 0


# ---------------------------------------------------------------------------------------------
# model zoo: generate prototxt, list models, compare with the paper's tables, draw nets

def _setting_arg(text: str):
    """``NAME=VALUE`` with VALUE a Python literal (``width=0.25``, ``batchnorm=False``)."""
    import ast
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def _zoo_model(name: str, settings=()):
    from .pipelines import zoo_model
    return zoo_model(name, **dict(settings))


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL", help="zoo model names (see `deeper-ssd zoo`)")
    p.add_argument("--all", action="store_true", help="every zoo model")
    p.add_argument("--out", default="prototxt", help="output folder (default prototxt/); the "
                   "solver refers to the nets as <out>/<model>/train.prototxt")
    p.add_argument("--set", dest="settings", action="append", type=_setting_arg, default=[],
                   metavar="NAME=VALUE", help="override a builder parameter or model field")
    p.add_argument("--head", choices=("srtod", "zoomin"), help="attach a head: srtod = SR-TOD's "
                   "reconstruction head + DGFE (docs/srtod.md); written to <out>/<model>_srtod/; zoomin = "
                   "ZoomInNet distillation (docs/zoominnet.md): the student to <out>/<model>_zoomin/, its 2x "
                   "teacher to <out>/<model>_zoomin_teacher/")
    p.add_argument("--srtod-source", metavar="BLOB", help="SR-TOD: the prediction source it "
                   "reconstructs from and enhances (default conv4_3; others get _srtod_<BLOB>)")
    p.add_argument("--head-set", dest="head_settings", action="append", type=_setting_arg,
                   default=[], metavar="NAME=VALUE",
                   help="override a head setting (deeper_ssd.builder.heads.SRTOD or ZoomIn fields)")


def _with_head(model, args):
    """``model`` with the head ``--head`` asks for (unchanged without one)."""
    settings = dict(args.head_settings)
    if args.srtod_source:
        settings["source"] = args.srtod_source
    if not args.head:
        if settings:
            raise UsageError("--srtod-source and --head-set need --head")
        return model
    import dataclasses
    from .builder import heads, settings as checks
    kind, attach = {"srtod": (heads.SRTOD, heads.with_srtod),
                    "zoomin": (heads.ZoomIn, heads.with_zoomin)}[args.head]
    if args.srtod_source and args.head != "srtod":
        raise UsageError("--srtod-source needs --head srtod")
    try:
        return attach(model, kind(**checks.check(settings, checks.hints(kind))))
    except TypeError:
        known = ", ".join(f.name for f in dataclasses.fields(kind))
        raise UsageError(f"--head-set {', '.join(settings)}: {kind.__name__} settings are {known}") from None
    except ValueError as err:
        raise UsageError(str(err)) from None


def _write_model(model, out: str):
    """Write a zoo model's files (a ZoomInNet student writes its teacher's too); returns the paths."""
    from .builder import heads, zoo
    if isinstance(model, heads.ZoomInModel):
        return heads.write_zoomin(model, out)
    return zoo.write_model(model, out)


@command("generate", "write prototxt/<model>/{train,test,deploy,solver}.prototxt for zoo models",
         _generate_arguments)
def cmd_generate(args) -> int:
    from .builder import zoo
    if args.all == bool(args.models):
        raise UsageError("name models or give --all")
    models = [_with_head(_zoo_model(name, args.settings), args)     # every name and setting
              for name in (zoo.names() if args.all else args.models)]  # checked before writing
    for model in models:
        paths = _checked(model, lambda m: _write_model(m, args.out))
        for folder in dict.fromkeys(path.parent for path in paths):      # ZoomInNet: two folders
            stems = ",".join(path.stem for path in paths if path.parent == folder)
            print(f"{folder.name}: {folder}/{{{stems}}}.prototxt")
    return 0


def _zoo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL", help="only these (default: all)")
    p.add_argument("--format", choices=("md", "json"), default="md")


@command("zoo", "list the zoo: input size, prediction layers, priors, parameters, GFLOPs",
         _zoo_arguments)
def cmd_zoo(args) -> int:
    import json
    from .builder import zoo
    summaries = [_checked(_zoo_model(name), lambda m: zoo.summarize(m.name, m))
                 for name in (args.models or zoo.names())]
    if args.format == "json":
        print(json.dumps([dict(name=s.name, input_size=s.input_size, prediction_layers=s.prediction_layers,
                               map_sizes=s.map_sizes, priors=s.priors, params=s.params, macs=s.macs,
                               gflops=round(s.gflops, 3), description=s.description)
                          for s in summaries], indent=1))
        return 0
    from .builder.paper import markdown_table
    print(markdown_table(
        ["model", "input", "pred. layers", "priors", "params (M)", "GFLOPs", "description"],
        [[s.name, f"{s.input_size}x{s.input_size}", str(s.prediction_layers), str(s.priors),
          f"{s.params / 1e6:.2f}", f"{s.gflops:.1f}", s.description] for s in summaries]))
    print("\nGFLOPs = 2 x multiply-accumulates of one 1-image forward of the deploy net.")
    return 0


def _layer_sizes_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--paper", choices=("table1", "table4", "table6"),
                       help="a paper table beside the built nets, agreements marked")
    group.add_argument("--model", help="per-layer sizes of a zoo model's deploy net")


@command("layer-sizes", "the paper's Tables 1, 4, 6 beside the built nets (or a zoo model's sizes)",
         _layer_sizes_arguments)
def cmd_layer_sizes(args) -> int:
    from . import shapes
    from .builder import paper
    if args.model:
        net = _checked(_zoo_model(args.model), lambda m: m.nets()["deploy"])
        print(shapes.format_table(shapes.infer_shapes(net, caffe_pb2.TEST)))
    elif args.paper == "table1":
        print(paper.format_table1(), end="")
    else:
        print(paper.format_module_table(args.paper), end="")
    return 0


def _draw_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("net", help="net prototxt, or a zoo model name (its deploy net)")
    p.add_argument("out", help="output image: .png, .svg, .pdf (matplotlib) or .dot (Graphviz source)")
    p.add_argument("--phase", type=_phase_arg, default=caffe_pb2.TEST, help="TRAIN or TEST (default TEST)")
    p.add_argument("--rankdir", choices=("TB", "LR"), default="TB", help="top-bottom or left-right")


@command("draw", "draw a net: layers, blobs and their shapes (like Caffe's draw_net)", _draw_arguments)
def cmd_draw(args) -> int:
    from pathlib import Path
    from .builder import draw, zoo
    if not Path(args.net).exists() and args.net in zoo.names():
        net = _checked(_zoo_model(args.net), lambda m: m.nets()["deploy"])
    else:
        net = io.read_net(args.net)
    try:
        print(draw.draw(net, args.out, args.phase, args.rankdir))
    except LayerError as err:                          # shapes that fail: nothing drawn
        raise UsageError(f"{args.net}: {err}") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"{args.out}: {err}") from None
    return 0


# ---------------------------------------------------------------------------------------------
# training and testing: train, test, plot-training-log, demo (deeper_ssd.pipelines)

def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", required=True, help="solver prototxt")
    p.add_argument("--weights", help="comma-separated .caffemodel files whose layers are copied by "
                   "name before training (fine-tuning; Caffe's --weights); PREFIX=FILE copies layer X "
                   "of FILE into layer PREFIX+X (e.g. teacher/=teacher.caffemodel for --head zoomin)")
    p.add_argument("--snapshot", help=".solverstate to resume from (Caffe's --snapshot)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the solver's solver_mode; GPU "
                   "without CUDA is an error, --device cpu the fallback); under torchrun rank r uses "
                   "cuda:LOCAL_RANK")
    p.add_argument("--gpus", help="comma-separated GPU ids: one training process per GPU, each "
                   "with the net's batch_size, gradients averaged (Caffe's --gpu)")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision: convolutions under "
                   "autocast, priors/box coding/losses/Normalize/DetectionOutput in float32; fp16 "
                   "with loss scaling (default: float32 throughout)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in CUDA convolutions and matrix "
                   "products (default off: float32, for parity with Caffe)")
    p.add_argument("--collective-timeout", type=float, metavar="SECONDS", help="how long a "
                   "multi-process collective may wait before the run fails (default 1800)")
    p.add_argument("--workers", type=int, help="data worker processes of each data layer, train and "
                   "test nets (default: min(8, cores // training processes), at least 1)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its convolution "
                   "algorithms and keep the fastest (default off: run-to-run reproducible choice)")
    p.add_argument("--log", help="also append the log to this file (default <snapshot_prefix>.log)")
    p.add_argument("--sigint-effect", choices=("stop", "snapshot", "none"), default="stop",
                   help="on SIGINT/Ctrl-C (default stop: snapshot, then stop)")
    p.add_argument("--sighup-effect", choices=("stop", "snapshot", "none"), default="snapshot",
                   help="on SIGHUP (default snapshot and continue)")
    p.add_argument("--sigterm-effect", choices=("stop", "snapshot", "none"), default="stop",
                   help="on SIGTERM, what cluster schedulers send before preemption (default stop: "
                   "snapshot, then stop)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory for the "
                   "nets (faster convolutions on CPU for thin, high-resolution layers)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


@command("train", "train a net with Caffe's solver: tests, snapshots, resume, multi-GPU "
         "(tools/train.py)", _train_arguments)
def cmd_train(args) -> int:
    from . import pipelines
    from .solver import NonFiniteError
    gpus = []
    if args.gpus:
        try:
            gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
        except ValueError:
            raise UsageError(f"--gpus {args.gpus!r}: give comma-separated GPU ids like 0,1") from None
    try:
        pipelines.train(args.solver, [w for w in (args.weights or "").split(",") if w], args.snapshot,
                        device=args.device, gpus=gpus, workers=args.workers, log=args.log,
                        sigint_effect=args.sigint_effect, sighup_effect=args.sighup_effect,
                        sigterm_effect=args.sigterm_effect, channels_last=args.channels_last,
                        progress=not args.no_progress, amp=args.amp, tf32=args.tf32,
                        cudnn_benchmark=args.cudnn_benchmark,
                        collective_timeout=args.collective_timeout)
    except pipelines.TrainingProcessError as err:
        print(f"deeper-ssd train: a training process failed: {err}", file=sys.stderr)
        return 1
    except NonFiniteError as err:
        print(f"deeper-ssd train: stopped: {err}", file=sys.stderr)
        return 1
    return 0


def _test_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="test net prototxt (AnnotatedData + DetectionOutput + "
                   "DetectionEvaluate)")
    p.add_argument("--weights", required=True, help=".caffemodel")
    p.add_argument("--iterations", type=int, help="test batches (default: the test LMDB once, "
                   "ceil(records / batch_size))")
    p.add_argument("--out", default="runs/test", help="folder for results.json and pr_curve.png "
                   "(default runs/test)")
    p.add_argument("--ap-version", default="11point", choices=("11point", "MaxIntegral", "Integral"),
                   help="headline AP (all three are in the JSON); default 11point as the paper")
    p.add_argument("--compare", nargs="+", default=[], metavar="JSON",
                   help="results.json of other models to draw on the same PR plot")
    p.add_argument("--name", help="this model's name in the plot (default: the weights file's stem)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, help="data worker processes (default: min(8, cores))")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its convolution "
                   "algorithms and keep the fastest (default off: run-to-run reproducible choice)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory for the net "
                   "(faster convolutions on CPU for thin, high-resolution layers)")
    p.add_argument("--exact", action="store_true", help="run the exact executor (default: the fast "
                   "path, compiled once and checked equal to it, docs/performance.md)")


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


@command("test", "evaluate a test net: mAP, per-class and per-size AP, PR curve, detection speed "
         "(tools/test.py)", _test_arguments)
def cmd_test(args) -> int:
    from . import pipelines
    pipelines.test(args.model, args.weights, args.out, args.iterations, args.ap_version, args.compare,
                   args.name, args.device, args.workers, cudnn_benchmark=args.cudnn_benchmark,
                   channels_last=args.channels_last, fast=not args.exact,
                   echo=print, note=_note)
    return 0


def _plot_log_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("log", help="training log (deeper-ssd train's, or real Caffe's)")
    p.add_argument("--out", help="PNG to write (default: the log's name with .png)")


@command("plot-training-log", "draw loss, learning rate and test mAP against the iteration from a "
         "training log (tools/plot_training_log.py)", _plot_log_arguments)
def cmd_plot_training_log(args) -> int:
    from pathlib import Path
    from .eval.plots import parse_training_log, plot_training_log
    try:
        log = parse_training_log(args.log)
    except OSError as err:
        raise UsageError(f"{args.log}: {err.strerror or err}") from None
    if not log.loss and not log.tests:
        raise UsageError(f"{args.log}: no 'Iteration N, loss = ...' or test output lines")
    out = plot_training_log(log, args.out or Path(args.log).with_suffix(".png"), title=Path(args.log).stem)
    print(f"{len(log.loss)} loss, {len(log.lr)} lr and {sum(map(len, log.tests.values()))} test points; wrote {out}")
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", help="train this solver instead of the tiny model's (e.g. "
                   "prototxt/deeper_ssd500/solver.prototxt for the paper's; its data must exist)")
    p.add_argument("--seed", type=int, default=0, help="random_seed of training and of the sample set "
                   "(default 0)")
    p.add_argument("--out", default="runs/demo", help="folder for the log, results and figures")
    p.add_argument("--workers", type=int, help="data worker processes (default: min(8, cores))")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


@command("demo", "the main job: build the sample set and the tiny Deeper SSD, train it on the CPU, "
         "test it (mAP, PR curve)", _demo_arguments)
def cmd_demo(args) -> int:
    from . import pipelines
    from .solver import NonFiniteError
    try:
        pipelines.demo(args.solver, args.seed, args.out, args.workers, progress=not args.no_progress,
                       echo=lambda line: print(line, flush=True), note=_note)
    except NonFiniteError as err:
        print(f"deeper-ssd demo: training stopped: {err}", file=sys.stderr)
        return 1
    return 0


def _upgrade_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="old net prototxt or .caffemodel (V0/V1 layers, net-level inputs, ...)")
    p.add_argument("output", help="the upgraded file, text or binary as the input is")


@command("upgrade", "rewrite an old Caffe net or model file in the current format (Caffe's "
         "upgrade_net_proto_text / _binary)", _upgrade_arguments)
def cmd_upgrade(args) -> int:
    from . import upgrade
    binary, done = upgrade.upgrade_file(args.input, args.output)
    kind = "binary" if binary else "text"
    if done:
        print(f"wrote {args.output} ({kind}): upgraded {', '.join(done)}")
    else:
        print(f"{args.input} is already in the current format; wrote it unchanged to {args.output} ({kind})")
    return 0


# ---------------------------------------------------------------------------------------------

def _merge_bn_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("deploy", help="deploy prototxt whose BatchNorm/Scale/Bias layers follow convolutions")
    p.add_argument("weights", help="its .caffemodel")
    p.add_argument("out_deploy", metavar="OUT.prototxt", help="merged deploy prototxt to write")
    p.add_argument("out_weights", metavar="OUT.caffemodel", help="merged weights to write")


@command("merge-bn", "fold BatchNorm + Scale (+ Bias) into the Convolution/Deconvolution before them "
         "for deployment; prints what was folded and the merged outputs' largest relative difference "
         "on a random input", _merge_bn_arguments)
def cmd_merge_bn(args) -> int:
    from .merge_bn import MergeError, merge_bn_files
    try:
        report, differences = merge_bn_files(args.deploy, args.weights, args.out_deploy, args.out_weights)
    except MergeError as err:
        raise UsageError(str(err)) from None
    print(report.summary())
    if differences:
        worst = max(differences, key=differences.get)
        print(f"max relative difference of the outputs on a random input: {differences[worst]:.3g} ('{worst}')")
    print(f"wrote {args.out_deploy} and {args.out_weights}")
    return 0


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("deploy", help="deploy prototxt with one DetectionOutput layer")
    p.add_argument("--weights", required=True, help=".caffemodel")
    p.add_argument("out", metavar="OUT.onnx", help="ONNX model to write")
    p.add_argument("--no-nms", action="store_true", help="leave DetectionOutput out: outputs are its "
                   "input blobs (loc, conf probabilities, priors) and the decoded boxes (default: "
                   "DetectionOutput as ONNX TopK + NonMaxSuppression, output 'detections')")
    p.add_argument("--batch", type=int, help="batch size of the model's inputs (default: the deploy net's)")


@command("export", "write a deploy net as an ONNX model for ONNX Runtime, TensorRT or edge runtimes "
         "(docs/performance.md)", _export_arguments)
def cmd_export(args) -> int:
    from .export import ExportError, export_onnx
    from .net import Net
    try:
        net = Net.from_prototxt(args.deploy, "TEST", device="cpu")
        net.load_trained(args.weights)
        names = export_onnx(net, args.out, nms=not args.no_nms, batch=args.batch)
    except ExportError as err:
        raise UsageError(str(err)) from None
    print(f"wrote {args.out}: inputs {', '.join(net.inputs)}; outputs {', '.join(names)}")
    return 0


def _time_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("net", help="net prototxt (train, test or deploy)")
    p.add_argument("--phase", type=_phase_arg, default=caffe_pb2.TRAIN,
                   help="TRAIN or TEST (default TRAIN, as caffe time)")
    p.add_argument("--iterations", type=int, default=50, help="timed iterations (default 50)")
    p.add_argument("--format", choices=("md", "csv", "json"), default="md")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--input", type=_shape_arg, metavar="N,C,H,W",
                   help="shape of the first input blob (default: as the net declares it)")


@command("time", "caffe time: average forward and backward milliseconds per layer and per pass, on "
         "filler weights; backward runs from the loss, or from every output with force_backward: "
         "true in the net, as in Caffe. Data layers (AnnotatedData, Input) are fed synthetic images and "
         "random ground-truth boxes, no database is read: the net is timed, not the reader", _time_arguments)
def cmd_time(args) -> int:
    from .timing import TimingError, format_timing, time_file
    try:
        result = time_file(args.net, args.phase, args.iterations, args.device, args.input)
    except TimingError as err:
        raise UsageError(str(err)) from None
    print(format_timing(result, args.format))
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


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing every block over its
    mmap/trim thresholds back to the kernel (large activations are then not mapped afresh every
    iteration; docs/performance.md, "CPU memory allocator", has the timings). Freed memory
    stays with the process (resident size near its peak). Returns False where this is not
    glibc."""
    import ctypes
    import ctypes.util
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, largest = -1, -3, 2 ** 31 - 1
    return bool(mallopt(m_mmap_threshold, largest) and mallopt(m_trim_threshold, largest))


#: the commands that run nets on many batches
_HEAVY_COMMANDS = {"train", "test", "demo", "detect", "diffmap"}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in _HEAVY_COMMANDS:
        keep_freed_memory()
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
