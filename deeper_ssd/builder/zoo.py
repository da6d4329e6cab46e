"""The model zoo: stable model names → :class:`~deeper_ssd.builder.ssd.SSDModel` builders.

* ``ssd300_voc0712``, ``ssd512_voc0712`` — the SSD fork's PASCAL VOC0712 nets (21 classes),
  equal to the fork's own SSD300 prototxt and to SSD512 as its script writes it (dataset paths
  aside; tests/test_zoo.py compares them with the reference files when those are present);
* the paper's models on the drone label map (2 classes, data/labelmap_drone.prototxt) with the
  paper's solver: ``ssd300``, ``ssd500``, ``deeper_ssd500`` and every module configuration of
  Tables 5, 7 and 8 (``deeper_ssd500_up<modules>_<concat|eltwise>``,
  ``deeper_ssd500_down<modules>_<concat|eltwise>``, ``deeper_ssd500_up123_concat_down12_eltwise``);
* ``ssd300_visdrone``, ``deeper_ssd500_visdrone``, ``ssd300_aitod``, ``deeper_ssd500_aitod`` — the
  paper's SSD300 and Deeper SSD500 with its solver on VisDrone2019-DET and AI-TOD;
* ``deeper_ssd500_tiny`` — a width-reduced Deeper SSD500 with BatchNorm, small priors and a
  short CPU solver for the bundled sample set; its settings are keyword parameters.

``get(name, **overrides)`` builds one; keywords that the entry's builder takes go to it, the rest
replace :class:`SSDModel` fields (``width``, ``batchnorm``, ``input_size``, ``prior_sizes`` …).
:func:`write_model` writes ``<out>/<name>/{train,test,deploy,solver}.prototxt``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .. import io, shapes
from . import settings
from ..proto import caffe_pb2
from .deeper import DEEPER_SSD500_EXTRAS, DEEPER_SSD500_SOURCES, down_module, up_module
from .solver import PAPER_SOLVER, SSD_VOC0712_SOLVER, SolverSettings, build_solver
from .ssd import (SSD300_EXTRAS, SSD512_EXTRAS, SSD_SOURCES, Dataset, Detection, Matching, SSDModel,
                  TrainTransform)

__all__ = ["VOC0712", "DRONE", "DRONE_SAMPLE", "VISDRONE", "AITOD", "names", "get", "description", "write_model",
           "ModelSummary", "summarize", "PHASES"]

PHASES = ("train", "test", "deploy")

VOC0712 = Dataset(
    "VOC0712", num_classes=21, label_map_file="data/labelmap_voc.prototxt",
    train_source="examples/VOC0712/VOC0712_trainval_lmdb",
    test_source="examples/VOC0712/VOC0712_test_lmdb",
    num_test_image=4952, name_size_file="data/VOC0712/test_name_size.txt",
    result_directory="$HOME/data/VOCdevkit/results/VOC2007/SSD_{size}x{size}/Main")

#: the paper's drone data set (not public; build the LMDBs and the name-size file with
#: `deeper-ssd create-data`): validation set W has 5,001 images
DRONE = Dataset(
    "drone", num_classes=2, label_map_file="data/labelmap_drone.prototxt",
    train_source="examples/drone/drone_trainval_lmdb", test_source="examples/drone/drone_test_lmdb",
    num_test_image=5001, name_size_file="data/drone/test_name_size.txt")

#: the bundled synthetic sample set, as `deeper-ssd make-sample` writes it (data/sample/README.md)
DRONE_SAMPLE = Dataset(
    "drone_sample", num_classes=2, label_map_file="data/labelmap_drone.prototxt",
    train_source="data/sample/generated/trainval_lmdb", test_source="data/sample/generated/test_lmdb",
    num_test_image=100, name_size_file="data/sample/generated/test_name_size.txt")

#: §4.2: "the NMS threshold is 0.5" (the fork's default is 0.45)
PAPER_DETECTION = Detection(nms_threshold=0.5)


@dataclass(frozen=True)
class _Entry:
    description: str
    build: Callable[..., SSDModel]


_ZOO: Dict[str, _Entry] = {}


def _register(name: str, description: str, build: Callable[..., SSDModel]) -> None:
    if name in _ZOO:
        raise ValueError(f"zoo model {name!r} registered twice")
    _ZOO[name] = _Entry(description, build)


def names() -> List[str]:
    return list(_ZOO)


def description(name: str) -> str:
    return _entry(name).description


def _entry(name: str) -> _Entry:
    try:
        return _ZOO[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; the zoo has: {', '.join(_ZOO)}") from None


def get(name: str, **overrides) -> SSDModel:
    """Build zoo model ``name``; ``overrides`` go to its builder or replace SSDModel fields."""
    entry = _entry(name)
    params = inspect.signature(entry.build).parameters
    rest = {k: v for k, v in overrides.items() if k not in params}
    allowed = {f.name for f in fields(SSDModel)}
    unknown = sorted(set(rest) - allowed)
    if unknown:
        raise KeyError(f"{name}: unknown setting(s) {', '.join(unknown)}; builder parameters: "
                       f"{', '.join(params) or 'none'}; model fields: {', '.join(sorted(allowed))}")
    built = settings.check({k: v for k, v in overrides.items() if k in params}, settings.hints(entry.build))
    rest = settings.check(rest, settings.hints(SSDModel))
    model = entry.build(**built)
    return model.replace(**rest) if rest else model


# ---------------------------------------------------------------------------------------------
# the SSD fork's VOC0712 models

_register("ssd300_voc0712", "SSD300 on PASCAL VOC0712, as the SSD fork's ssd_pascal.py", lambda: SSDModel(
    name="ssd300_voc0712", net_name="VGG_VOC0712_SSD_300x300", input_size=300, dataset=VOC0712,
    solver=SSD_VOC0712_SOLVER))

_register("ssd512_voc0712", "SSD512 on PASCAL VOC0712 (reconstructed ssd_pascal_512.py)", lambda: SSDModel(
    name="ssd512_voc0712", net_name="VGG_VOC0712_SSD_512x512", input_size=512, dataset=VOC0712,
    extras=SSD512_EXTRAS, sources=SSD_SOURCES + ("conv10_2",), min_ratio=15, first_ratios=(7, 15),
    solver=SSD_VOC0712_SOLVER))


# ---------------------------------------------------------------------------------------------
# the paper's models (drone label map, paper solver, NMS 0.5)

def _paper_model(name: str, input_size: int = 500, extras=DEEPER_SSD500_EXTRAS,
                 sources=DEEPER_SSD500_SOURCES, modules: Tuple = (), dataset: Dataset = DRONE,
                 matching: Matching = Matching()) -> SSDModel:
    return SSDModel(name=name, net_name=name, input_size=input_size, dataset=dataset, extras=extras,
                    sources=sources, modules=modules, detection=PAPER_DETECTION, solver=PAPER_SOLVER,
                    matching=matching)


_register("ssd300", "SSD300 on the drone label map (paper Tables 3, 8)",
          lambda: _paper_model("ssd300", 300, SSD300_EXTRAS, SSD_SOURCES))
_register("ssd500", "SSD500: the SSD300 structure at 500x500 (paper Tables 3, 8)",
          lambda: _paper_model("ssd500", 500, SSD300_EXTRAS, SSD_SOURCES))
_register("deeper_ssd500", "Deeper SSD500, 9 prediction layers (paper Table 1)",
          lambda: _paper_model("deeper_ssd500"))


# ---------------------------------------------------------------------------------------------
# public drone / aerial data sets: the paper's models, schedule and batch on their label maps

#: VisDrone2019-DET, 10 classes (data/labelmap_visdrone.prototxt), at the paths the README's
#: recipe writes (`create-list --layout folders` into data/VisDrone, LMDBs in
#: examples/VisDrone); tested on the val split, 548 images
VISDRONE = Dataset(
    "VisDrone", num_classes=11, label_map_file="data/labelmap_visdrone.prototxt",
    train_source="examples/VisDrone/VisDrone_trainval_lmdb",
    test_source="examples/VisDrone/VisDrone_test_lmdb",
    num_test_image=548, name_size_file="data/VisDrone/test_name_size.txt")

#: AI-TOD, 8 classes (data/labelmap_aitod.prototxt), `create-list --layout coco` into
#: data/AI-TOD; tested on the test split, 14,018 images
AITOD = Dataset(
    "AI-TOD", num_classes=9, label_map_file="data/labelmap_aitod.prototxt",
    train_source="examples/AI-TOD/AI-TOD_trainval_lmdb", test_source="examples/AI-TOD/AI-TOD_test_lmdb",
    num_test_image=14018, name_size_file="data/AI-TOD/test_name_size.txt")

#: VisDrone's score-0 boxes and COCO crowds are stored `difficult` (docs/decisions.md): they
#: are left out of training's matching as they are out of evaluation
WITHOUT_DIFFICULT = Matching(use_difficult_gt=False)

for _data, _tag in ((VISDRONE, "visdrone"), (AITOD, "aitod")):
    _register(f"ssd300_{_tag}", f"SSD300 on {_data.name} ({_data.num_classes - 1} classes), the paper's solver",
              lambda d=_data, t=_tag: _paper_model(f"ssd300_{t}", 300, SSD300_EXTRAS, SSD_SOURCES,
                                                   dataset=d, matching=WITHOUT_DIFFICULT))
    _register(f"deeper_ssd500_{_tag}", f"Deeper SSD500 on {_data.name} ({_data.num_classes - 1} classes), "
              "the paper's solver",
              lambda d=_data, t=_tag: _paper_model(f"deeper_ssd500_{t}", dataset=d, matching=WITHOUT_DIFFICULT))


def _module_name(kind: str, indices: Sequence[int], join: str) -> str:
    return f"{kind}{''.join(str(i) for i in indices)}_{join}"


#: Table 5 (up-sampling) and Table 7 (down-sampling): (modules, connection) as evaluated
UP_CONFIGS = [((1,), "concat"), ((2,), "concat"), ((3,), "concat"), ((1, 2), "concat"),
              ((1, 3), "concat"), ((2, 3), "concat"), ((1, 2, 3), "concat"),
              ((1,), "eltwise"), ((2,), "eltwise"), ((3,), "eltwise")]
DOWN_CONFIGS = [((1,), "concat"), ((2,), "concat"), ((1,), "eltwise"), ((2,), "eltwise"),
                ((1, 2), "eltwise")]
#: Table 8's last row: up-sampling (Concat, 1+2+3) and down-sampling (Eltwise, 1+2)
COMBINED_CONFIG = (((1, 2, 3), "concat"), ((1, 2), "eltwise"))


def _register_modules(ups: Tuple, downs: Tuple, table: str) -> None:
    parts, modules, words = [], [], []
    for kind, config, make, count in (("up", ups, up_module, 12), ("down", downs, down_module, 11)):
        if config:
            indices, join = config
            parts.append(_module_name(kind, indices, join))
            modules += [make(i, join) for i in indices]
            words.append(f"{kind}-sampling module{'s' if len(indices) > 1 else ''} "
                         f"{'+'.join(map(str, indices))} ({join})")
    name = "deeper_ssd500_" + "_".join(parts)
    text = f"Deeper SSD500 + {' + '.join(words)}, {9 + len(modules)} prediction layers ({table})"
    _register(name, text, lambda: _paper_model(name, modules=tuple(modules)))


for _config in UP_CONFIGS:
    _register_modules(_config, (), "Table 5")
for _config in DOWN_CONFIGS:
    _register_modules((), _config, "Table 7")
_register_modules(*COMBINED_CONFIG, "Table 8")


# ---------------------------------------------------------------------------------------------
# the CPU-sized model for the bundled sample set

def deeper_ssd500_tiny(width: float = 1 / 8, batchnorm: bool = True, input_size: int = 500,
                       prior_sizes: Tuple[Tuple[float, float], ...] = (
                           (12, 24), (24, 40), (40, 64), (64, 96), (96, 140), (140, 200),
                           (200, 280), (280, 370), (370, 460)),
                       conv4_3_normalization: float = 7.0,
                       batchnorm_filler: str = "msra", bn_moving_average_fraction: float = 0.9,
                       expand_prob: float = 0.0, random_crop: bool = False, distort: bool = False,
                       overlap_threshold: float = 0.25, neg_overlap: float = 0.25,
                       batch_size: int = 4, test_batch_size: int = 10,
                       solver_type: str = "Adam", base_lr: float = 0.001, max_iter: int = 800,
                       stepvalues: Tuple[int, ...] = (640,), gamma: float = 0.1,
                       momentum: float = 0.9, weight_decay: float = 0.0005,
                       test_interval: int = 800, dataset: Dataset = DRONE_SAMPLE) -> SSDModel:
    """Deeper SSD500 at 1/8 width with BatchNorm + Scale after every feature convolution, sized
    to train on this project's 2-core CPU within the demo's 15 minutes: a 12 px first prior (the
    sample set is 63 % small drones, <= 17 px at 500x500), no zoom-out expansion (it would
    shrink them further), MSRA weights under BatchNorm, a fast BatchNorm average (0.9: with
    0.999 the averages of a 500-iteration run lag the drifting weights and the test net's
    activations grow layer after layer), conv4_3 Normalize 7 (20 / sqrt(512 / 64): the scale
    for BatchNorm'd 64-channel features), MultiBoxLoss matching and mining thresholds of 0.25
    (a drone of a few pixels gets several positive priors, and the neighbours that half
    overlap it are no longer mined as negatives), no crop samplers or photometric distortion
    (crops enlarge the drones to sizes the test set lacks) and Adam at batch 4 for 800
    iterations. Every setting is a parameter; the reasons and measurements are in
    docs/decisions.md."""
    solver = SolverSettings(base_lr=base_lr, stepvalues=tuple(stepvalues), max_iter=max_iter,
                            gamma=gamma, momentum=momentum, weight_decay=weight_decay,
                            snapshot=max_iter, test_interval=test_interval, solver_mode="CPU",
                            type=solver_type)
    return SSDModel(name="deeper_ssd500_tiny", net_name="deeper_ssd500_tiny", input_size=input_size,
                    dataset=dataset, extras=DEEPER_SSD500_EXTRAS, sources=DEEPER_SSD500_SOURCES,
                    width=width, batchnorm=batchnorm, prior_sizes=tuple(prior_sizes),
                    normalizations={"conv4_3": conv4_3_normalization},
                    batchnorm_filler=(("type", batchnorm_filler),),
                    bn_moving_average_fraction=bn_moving_average_fraction,
                    transform=TrainTransform(expand_prob=expand_prob, random_crop=random_crop,
                                             distort=distort),
                    matching=Matching(overlap_threshold=overlap_threshold, neg_overlap=neg_overlap),
                    batch_size=batch_size, test_batch_size=test_batch_size, detection=PAPER_DETECTION,
                    solver=solver)


_register("deeper_ssd500_tiny", "Deeper SSD500 at 1/8 width with BatchNorm, small priors, "
          "matching 0.25, 800-iteration Adam CPU solver, batch 4 (sample set)", deeper_ssd500_tiny)


# ---------------------------------------------------------------------------------------------
# files and summaries

def solver_for(model: SSDModel, out: str = "prototxt") -> caffe_pb2.SolverParameter:
    """The model's solver; net paths are ``<out>/<name>/{train,test}.prototxt`` as given
    (Caffe resolves them against the working directory), snapshots go to
    ``snapshots/<name>/<name>_iter_N``."""
    folder = f"{out.rstrip('/')}/{model.name}"
    return build_solver(model.solver, f"{folder}/train.prototxt", f"{folder}/test.prototxt",
                        model.dataset.num_test_image, model.test_batch_size,
                        f"snapshots/{model.name}/{model.name}")


def write_model(model: SSDModel, out: str = "prototxt") -> List[Path]:
    """Write ``<out>/<name>/{train,test,deploy,solver}.prototxt``; returns the paths."""
    folder = Path(out) / model.name
    written = []
    for phase, net in model.nets().items():
        io.write_net(net, folder / f"{phase}.prototxt")
        written.append(folder / f"{phase}.prototxt")
    io.write_solver(solver_for(model, out), folder / "solver.prototxt")
    written.append(folder / "solver.prototxt")
    return written


@dataclass(frozen=True)
class ModelSummary:
    """One line of ``deeper-ssd zoo``."""
    name: str
    input_size: int
    prediction_layers: int
    map_sizes: Tuple[int, ...]
    priors: int
    params: int
    macs: int
    description: str

    @property
    def gflops(self) -> float:
        """2 floating-point operations per multiply-accumulate."""
        return 2 * self.macs / 1e9


def summarize(name: str, model: Optional[SSDModel] = None) -> ModelSummary:
    """Prior count from the plan; parameters and multiply-accumulates of the deploy net."""
    model = model or get(name)
    plan = model.plan()
    rows = shapes.infer_shapes(model.nets()["deploy"], caffe_pb2.TEST)
    return ModelSummary(name, model.input_size, len(plan.layers), tuple(l.map_size for l in plan.layers),
                        plan.num_priors, sum(r.params for r in rows), sum(r.macs for r in rows),
                        description(name) if name in _ZOO else "")
