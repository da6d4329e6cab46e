"""A tiny SSD (64x64 input, three convolutions, two prediction maps) on a tiny synthetic drone set,
for solver, trainer, test-tool and distributed tests that must run in seconds on two cores.

    paths = make_tiny(tmp_path, batchnorm=True)   # data + train/test prototxt + solver
    paths["solver"], paths["train"], paths["test"], paths["data"]
"""
from pathlib import Path

from deeper_ssd import io
from deeper_ssd.data.sample import make_sample_set
from deeper_ssd.proto import caffe_pb2

_CONV = """layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"
  param {{ lr_mult: 1 decay_mult: 1 }} {bias_param}
  convolution_param {{ num_output: {out} kernel_size: 3 pad: 1 stride: {stride} {bias_term}
    weight_filler {{ type: "xavier" }} {bias_filler} }} }}
"""
_BN = """layer {{ name: "{name}_bn" type: "BatchNorm" bottom: "{name}" top: "{name}"
  param {{ lr_mult: 0 decay_mult: 0 }} param {{ lr_mult: 0 decay_mult: 0 }} param {{ lr_mult: 0 decay_mult: 0 }}
  batch_norm_param {{ eps: 0.001 moving_average_fraction: 0.999 }} }}
layer {{ name: "{name}_scale" type: "Scale" bottom: "{name}" top: "{name}"
  param {{ lr_mult: 1 decay_mult: 0 }} param {{ lr_mult: 1 decay_mult: 0 }}
  scale_param {{ bias_term: true filler {{ type: "constant" value: 1 }} bias_filler {{ type: "constant" value: 0 }} }} }}
"""
_RELU = """layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}
"""
_HEAD = """layer {{ name: "{src}_mbox_{kind}" type: "Convolution" bottom: "{src}" top: "{src}_mbox_{kind}"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  convolution_param {{ num_output: {out} kernel_size: 3 pad: 1 weight_filler {{ type: "xavier" }}
    bias_filler {{ type: "constant" value: 0 }} }} }}
layer {{ name: "{src}_mbox_{kind}_perm" type: "Permute" bottom: "{src}_mbox_{kind}" top: "{src}_mbox_{kind}_perm"
  permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}
layer {{ name: "{src}_mbox_{kind}_flat" type: "Flatten" bottom: "{src}_mbox_{kind}_perm" top: "{src}_mbox_{kind}_flat"
  flatten_param {{ axis: 1 }} }}
"""
_PRIOR = """layer {{ name: "{src}_mbox_priorbox" type: "PriorBox" bottom: "{src}" bottom: "data" top: "{src}_mbox_priorbox"
  prior_box_param {{ min_size: {mn} max_size: {mx} aspect_ratio: 2 flip: true clip: false
    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: {step} offset: 0.5 }} }}
"""
_DATA = """layer {{ name: "data" type: "AnnotatedData" top: "data" top: "label" include {{ phase: {phase} }}
  transform_param {{ {mirror} mean_value: 104 mean_value: 117 mean_value: 123
    resize_param {{ prob: 1 resize_mode: WARP height: 64 width: 64 interp_mode: LINEAR }} }}
  data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }}
  annotated_data_param {{ batch_sampler {{ {sampler} }} label_map_file: "{labelmap}" }} }}
"""
_LOSS = """layer { name: "mbox_loss" type: "MultiBoxLoss" bottom: "mbox_loc" bottom: "mbox_conf"
  bottom: "mbox_priorbox" bottom: "label" top: "mbox_loss" include { phase: TRAIN }
  propagate_down: true propagate_down: true propagate_down: false propagate_down: false
  loss_param { normalization: VALID }
  multibox_loss_param { loc_loss_type: SMOOTH_L1 conf_loss_type: SOFTMAX loc_weight: 1 num_classes: 2
    share_location: true match_type: PER_PREDICTION overlap_threshold: 0.5 use_prior_for_matching: true
    background_label_id: 0 use_difficult_gt: true neg_pos_ratio: 3 neg_overlap: 0.5 code_type: CENTER_SIZE
    ignore_cross_boundary_bbox: false mining_type: MAX_NEGATIVE } }
"""
_DETECT = """layer { name: "mbox_conf_reshape" type: "Reshape" bottom: "mbox_conf" top: "mbox_conf_reshape"
  reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }
layer { name: "mbox_conf_softmax" type: "Softmax" bottom: "mbox_conf_reshape" top: "mbox_conf_softmax"
  softmax_param { axis: 2 } }
layer { name: "mbox_conf_flatten" type: "Flatten" bottom: "mbox_conf_softmax" top: "mbox_conf_flatten"
  flatten_param { axis: 1 } }
layer { name: "detection_out" type: "DetectionOutput" bottom: "mbox_loc" bottom: "mbox_conf_flatten"
  bottom: "mbox_priorbox" top: "detection_out" include { phase: TEST }
  detection_output_param { num_classes: 2 share_location: true background_label_id: 0
    nms_param { nms_threshold: 0.45 top_k: 100 } code_type: CENTER_SIZE keep_top_k: 50
    confidence_threshold: 0.01 } }
layer { name: "detection_eval" type: "DetectionEvaluate" bottom: "detection_out" bottom: "label"
  top: "detection_eval" include { phase: TEST }
  detection_evaluate_param { num_classes: 2 background_label_id: 0 overlap_threshold: 0.5
    evaluate_difficult_gt: false } }
"""
SOURCES = (("conv2", 16, 10, 24, 4), ("conv3", 8, 24, 50, 8))   # blob, map size, min, max, step
PRIORS_PER_CELL = 4


def tiny_net(phase: str, source: str, labelmap: str, batch: int = 4, batchnorm: bool = True) -> str:
    """The train (phase "TRAIN") or test ("TEST") net as prototxt text."""
    train = phase == "TRAIN"
    text = f'name: "tiny_{phase.lower()}"\n' + _DATA.format(
        phase=phase, mirror="mirror: true" if train else "", source=source, batch=batch,
        sampler="max_sample: 1 max_trials: 1" if train else "", labelmap=labelmap)
    bottom = "data"
    for name, out in (("conv1", 8), ("conv2", 16), ("conv3", 16)):
        bias = "" if batchnorm else "param { lr_mult: 2 decay_mult: 0 }"
        text += _CONV.format(name=name, bottom=bottom, out=out, stride=2, bias_param=bias,
                             bias_term="bias_term: false" if batchnorm else "",
                             bias_filler="" if batchnorm else 'bias_filler { type: "constant" value: 0 }')
        if batchnorm:
            text += _BN.format(name=name)
        text += _RELU.format(name=name)
        bottom = name
    for src, _, mn, mx, step in SOURCES:
        text += _HEAD.format(src=src, kind="loc", out=4 * PRIORS_PER_CELL)
        text += _HEAD.format(src=src, kind="conf", out=2 * PRIORS_PER_CELL)
        text += _PRIOR.format(src=src, mn=mn, mx=mx, step=step)
    for kind, axis in (("loc", 1), ("conf", 1), ("priorbox", 2)):
        suffix = "" if kind == "priorbox" else "_flat"
        bottoms = " ".join(f'bottom: "{src}_mbox_{kind}{suffix}"' for src, *_ in SOURCES)
        text += (f'layer {{ name: "mbox_{kind}" type: "Concat" {bottoms} top: "mbox_{kind}" '
                 f'concat_param {{ axis: {axis} }} }}\n')
    return text + (_LOSS if train else _DETECT)


SOLVER = dict(test_iter=[2], test_interval=1000, base_lr=0.01, lr_policy="multistep", gamma=0.1,
              stepvalue=[3], momentum=0.9, weight_decay=0.0005, display=1, average_loss=3, max_iter=6,
              snapshot=0, random_seed=7, solver_mode=caffe_pb2.SolverParameter.CPU,
              test_initialization=False, eval_type="detection", ap_version="11point")


def make_tiny(folder, batchnorm: bool = True, batch: int = 4, train_images: int = 16,
              test_images: int = 8, **solver) -> dict:
    """Data (``folder/data``), ``train.prototxt``, ``test.prototxt`` and ``solver.prototxt``
    (:data:`SOLVER` updated by ``solver`` keyword fields) in ``folder``."""
    folder = Path(folder)
    data = folder / "data"
    if not (data / "test_lmdb").exists():
        make_sample_set(data, seed=0, train=train_images, test=test_images, width=128, height=96)
    labelmap = str(data / "labelmap_drone.prototxt")
    paths = dict(data=data, train=folder / "train.prototxt", test=folder / "test.prototxt",
                 solver=folder / "solver.prototxt", prefix=folder / "snap" / "tiny")
    paths["train"].write_text(tiny_net("TRAIN", str(data / "trainval_lmdb"), labelmap, batch, batchnorm))
    paths["test"].write_text(tiny_net("TEST", str(data / "test_lmdb"), labelmap, batch, batchnorm))
    io.write_solver(solver_param(paths, **solver), paths["solver"])
    return paths


def solver_param(paths: dict, **fields) -> caffe_pb2.SolverParameter:
    """The tiny nets' SolverParameter: :data:`SOLVER` updated by ``fields`` (None clears one)."""
    values = dict(SOLVER, train_net=str(paths["train"]), test_net=[str(paths["test"])],
                  snapshot_prefix=str(paths["prefix"]))
    values.update(fields)
    param = caffe_pb2.SolverParameter()
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, list):
            getattr(param, key).extend(value)
        else:
            setattr(param, key, value)
    return param
