"""The model zoo: reference parity, prior counts, committed prototxt, OpenCV, refusal of bad nets."""
import filecmp
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from deeper_ssd import cli, io, shapes
from deeper_ssd.layers import LayerError
from deeper_ssd.proto import caffe_pb2
from deeper_ssd.builder import deeper, heads, ssd, zoo
from support import zip_same

REPO = Path(__file__).resolve().parent.parent

#: every zoo model's prior count (Σ map² × priors per cell over its prediction layers)
PRIOR_COUNTS = {
    "ssd300_voc0712": 8732, "ssd512_voc0712": 24564, "ssd300": 8732, "ssd500": 24148,
    "deeper_ssd500": 28132,
    "deeper_ssd500_up1_concat": 51946, "deeper_ssd500_up2_concat": 34276,
    "deeper_ssd500_up3_concat": 29668, "deeper_ssd500_up12_concat": 58090,
    "deeper_ssd500_up13_concat": 53482, "deeper_ssd500_up23_concat": 35812,
    "deeper_ssd500_up123_concat": 59626, "deeper_ssd500_up1_eltwise": 51946,
    "deeper_ssd500_up2_eltwise": 34276, "deeper_ssd500_up3_eltwise": 29668,
    "deeper_ssd500_down1_concat": 31306, "deeper_ssd500_down2_concat": 28858,
    "deeper_ssd500_down1_eltwise": 31306, "deeper_ssd500_down2_eltwise": 28858,
    "deeper_ssd500_down12_eltwise": 32032, "deeper_ssd500_up123_concat_down12_eltwise": 63526,
    "deeper_ssd500_tiny": 28132,
    "ssd300_visdrone": 8732, "deeper_ssd500_visdrone": 28132, "ssd300_aitod": 8732,
    "deeper_ssd500_aitod": 28132,
}

#: fields that name dataset or output locations (parity is "dataset paths aside")
PATH_FIELDS = {
    "data_param": ("source",), "annotated_data_param": ("label_map_file",),
    "detection_evaluate_param": ("name_size_file",),
}


def _without_paths(message):
    copy = type(message)()
    copy.CopyFrom(message)
    if isinstance(copy, caffe_pb2.SolverParameter):
        for name in ("train_net", "test_net", "snapshot_prefix"):
            copy.ClearField(name)
        return copy
    for layer in copy.layer:
        for param, names in PATH_FIELDS.items():
            for name in names:
                getattr(layer, param).ClearField(name)
        save = layer.detection_output_param.save_output_param
        for name in ("output_directory", "label_map_file", "name_size_file"):
            save.ClearField(name)
    return copy


@pytest.mark.parametrize("model, folder", [("ssd300_voc0712", "ssd300_official"),
                                           ("ssd512_voc0712", "ssd512_reconstructed")])
def test_generator_reproduces_the_reference_files(model, folder, reference_dir):
    built = zoo.get(model)
    ours = dict(built.nets(), solver=zoo.solver_for(built))
    for phase, message in ours.items():
        path = reference_dir / folder / f"{phase}.prototxt"
        reference = (io.read_solver if phase == "solver" else io.read_net)(path)
        assert _without_paths(message) == _without_paths(reference), f"{model} {phase} differs"
        if phase != "solver":
            assert [l.name for l in message.layer] == [l.name for l in reference.layer]


def test_layer_counts_of_the_reference_nets():
    for model, counts in (("ssd300_voc0712", (99, 103, 101)), ("ssd512_voc0712", (110, 114, 112))):
        nets = zoo.get(model).nets()
        assert tuple(len(nets[p].layer) for p in ("train", "test", "deploy")) == counts


def test_every_model_has_its_prior_count_and_prediction_layers(capsys):
    assert set(zoo.names()) == set(PRIOR_COUNTS)
    for name in zoo.names():
        model = zoo.get(name)
        plan = model.plan()
        deploy = {r.name: r for r in shapes.infer_shapes(model.nets()["deploy"], caffe_pb2.TEST)}
        static = deploy["mbox_priorbox"].shapes[0][2] // 4
        print(f"{name}: {plan.num_priors} priors, {len(plan.layers)} prediction layers")
        assert plan.num_priors == static == PRIOR_COUNTS[name], name
        modules = len(model.modules)
        base = len(model.sources)
        assert len(plan.layers) == base + modules
    counts = {name: len(zoo.get(name).plan().layers) for name in zoo.names()}
    # the paper: 6 (SSD), 9 (Deeper SSD), 12 with up-sampling, 11 with down-sampling, 14 with both
    assert counts["ssd300"] == counts["ssd500"] == 6 and counts["deeper_ssd500"] == 9
    assert counts["deeper_ssd500_up123_concat"] == 12
    assert counts["deeper_ssd500_down12_eltwise"] == 11
    assert counts["deeper_ssd500_up123_concat_down12_eltwise"] == 14
    assert "deeper_ssd500_tiny: 28132 priors" in capsys.readouterr().out


def test_deeper_ssd500_matches_table1_sizes():
    plan = zoo.get("deeper_ssd500").plan()
    assert [(l.source, l.map_size) for l in plan.layers] == [
        ("conv4_3", 63), ("fc7", 32), ("conv6_2", 16), ("conv7_2", 16), ("conv8_2", 14),
        ("conv9_2", 12), ("conv10_2", 10), ("conv11_2", 8), ("conv12_2", 6)]
    combined = zoo.get("deeper_ssd500_up123_concat_down12_eltwise").plan()
    sizes = {l.source: (l.map_size, l.channels) for l in combined.layers}
    assert sizes["up1"] == (63, 1024) and sizes["up2"] == (32, 1536) and sizes["up3"] == (16, 384)
    assert sizes["down1"] == (23, 256) and sizes["down2"] == (11, 256)


def test_prior_rules_reproduce_the_fork():
    assert ssd.ratio_rule_sizes(300, 6) == [(30, 60), (60, 111), (111, 162), (162, 213), (213, 264), (264, 315)]
    sizes512 = ssd.ratio_rule_sizes(512, 7, 15, 90, (7, 15))
    assert sizes512[0] == (35.84, 76.8) and sizes512[-1] == (460.8, 537.6)
    # 11 and 14 layers: the script's range() would yield one ratio too many; the first count-1
    assert len(ssd.ratio_rule_sizes(500, 11)) == 11 and ssd.ratio_rule_sizes(500, 11)[-1] == (415, 450)
    assert len(ssd.ratio_rule_sizes(500, 14)) == 14 and ssd.ratio_rule_sizes(500, 14)[-1] == (400, 425)
    steps = [l.prior.step for l in zoo.get("deeper_ssd500").plan().layers]
    assert steps[:4] == [8, 16, 32, 32] and steps[4] == pytest.approx(500 / 14)
    assert ssd.default_aspect_ratios(6) == [(2.,), (2., 3.), (2., 3.), (2., 3.), (2.,), (2.,)]


def test_paper_models_use_the_drone_label_map_and_the_papers_solver():
    model = zoo.get("deeper_ssd500_up123_concat_down12_eltwise")
    nets = model.nets()
    data = nets["train"].layer[0]
    assert data.annotated_data_param.label_map_file == "data/labelmap_drone.prototxt"
    assert data.data_param.batch_size == 8
    loss = [l for l in nets["train"].layer if l.type == "MultiBoxLoss"][0]
    assert loss.multibox_loss_param.num_classes == 2
    out = [l for l in nets["deploy"].layer if l.type == "DetectionOutput"][0]
    assert out.detection_output_param.nms_param.nms_threshold == pytest.approx(0.5)
    assert not out.detection_output_param.HasField("save_output_param")
    solver = zoo.solver_for(model)
    assert (solver.lr_policy, list(solver.stepvalue), solver.max_iter) == ("multistep", [60000, 90000, 120000], 150000)
    assert (solver.base_lr, solver.gamma, solver.momentum, solver.weight_decay) == pytest.approx((0.001, 0.1, 0.9, 0.0005))
    assert (solver.eval_type, solver.ap_version, solver.test_iter[0]) == ("detection", "11point", 626)
    labels = io.read_labelmap(REPO / "data" / "labelmap_voc.prototxt")
    assert len(labels.item) == 21 and labels.item[0].display_name == "background"


def test_tiny_model_is_narrow_with_batchnorm_and_its_settings_are_parameters():
    model = zoo.get("deeper_ssd500_tiny")
    deploy = model.nets()["deploy"]
    types = [l.type for l in deploy.layer]
    assert types.count("BatchNorm") == types.count("Scale") == 15 + 14        # VGG + extras
    assert model.plan().layers[0].prior.min_size == 12 and len(model.plan().layers) == 9
    conv4_3 = [l for l in deploy.layer if l.name == "conv4_3"][0]
    assert conv4_3.convolution_param.num_output == 64 and not conv4_3.convolution_param.bias_term
    assert zoo.summarize("deeper_ssd500_tiny").params < 1_000_000
    tuned = zoo.get("deeper_ssd500_tiny", base_lr=0.02, max_iter=500, stepvalues=(300,), width=0.25)
    solver = zoo.solver_for(tuned)
    assert (solver.base_lr, solver.max_iter, list(solver.stepvalue)) == (pytest.approx(0.02), 500, [300])
    assert tuned.width == 0.25 and solver.solver_mode == caffe_pb2.SolverParameter.CPU
    with pytest.raises(KeyError, match="unknown setting"):
        zoo.get("deeper_ssd500_tiny", learning_rate=1)


def test_tiny_model_departs_from_the_fork_where_docs_decisions_says():
    train = zoo.get("deeper_ssd500_tiny").nets()["train"]
    layers = {l.name: l for l in train.layer}
    assert layers["conv1_1"].convolution_param.weight_filler.type == "msra"
    assert layers["fc7_bn"].batch_norm_param.moving_average_fraction == pytest.approx(0.9)
    assert layers["conv4_3_norm"].norm_param.scale_filler.value == pytest.approx(7)
    transform = layers["data"].transform_param
    assert not transform.HasField("expand_param") or transform.expand_param.prob == 0
    assert not transform.HasField("distort_param")            # no photometric distortion
    assert len(layers["data"].annotated_data_param.batch_sampler) == 1     # the whole image only
    mbox = layers["mbox_loss"].multibox_loss_param
    assert (mbox.overlap_threshold, mbox.neg_overlap) == (pytest.approx(0.25), pytest.approx(0.25))
    solver = zoo.solver_for(zoo.get("deeper_ssd500_tiny"))
    assert (solver.type, solver.momentum2, solver.base_lr) == ("Adam", pytest.approx(0.999), pytest.approx(0.001))
    assert solver.test_iter[0] * 10 == 100                    # 10 batches of 10: each test image once
    # the fork's ConvBNLayer values stay the default for every other model with BatchNorm
    fork = zoo.get("deeper_ssd500").replace(batchnorm=True).nets()["train"]
    fork_layers = {l.name: l for l in fork.layer}
    filler = fork_layers["conv1_1"].convolution_param.weight_filler
    assert (filler.type, filler.std) == ("gaussian", pytest.approx(0.01))
    assert fork_layers["fc7_bn"].batch_norm_param.moving_average_fraction == pytest.approx(0.999)
    assert len(fork_layers["data"].annotated_data_param.batch_sampler) == 7
    assert fork_layers["data"].transform_param.HasField("distort_param")
    fork_mbox = fork_layers["mbox_loss"].multibox_loss_param
    assert (fork_mbox.overlap_threshold, fork_mbox.neg_overlap) == (pytest.approx(0.5), pytest.approx(0.5))
    with pytest.raises(ValueError, match="moving_average_fraction"):
        zoo.get("deeper_ssd500_tiny", bn_moving_average_fraction=1.0).nets()


def test_committed_prototxt_equals_a_fresh_generation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", "--all", "--out", "prototxt"]) == 0
    committed = REPO / "prototxt"
    fresh = tmp_path / "prototxt"
    # head variants (prototxt/<model>_srtod) are regenerated by their own tests (test_srtod.py)
    assert sorted(p.name for p in committed.iterdir() if p.is_dir()) == \
        sorted(zoo.names() + heads.committed_variants())
    for name in zoo.names():
        for phase in ("train", "test", "deploy", "solver"):
            a, b = committed / name / f"{phase}.prototxt", fresh / name / f"{phase}.prototxt"
            assert filecmp.cmp(a, b, shallow=False), f"{a} is stale: run `deeper-ssd generate --all`"


def test_opencv_reads_every_committed_deploy():
    for name in zoo.names():
        net = cv2.dnn.readNetFromCaffe(str(REPO / "prototxt" / name / "deploy.prototxt"))
        assert not net.empty(), name


# ---------------------------------------------------------------------------------------------
# OpenCV forwards with random weights

def _blob(array: np.ndarray) -> caffe_pb2.BlobProto:
    """A BlobProto for ``array``, encoded directly (packed floats) — repeated-field appends are
    slow for the 26 M weights of a full-width net."""
    def varint(n):
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    shape = caffe_pb2.BlobShape(dim=list(array.shape)).SerializeToString()
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    blob = caffe_pb2.BlobProto()
    blob.ParseFromString(b"\x3a" + varint(len(shape)) + shape + b"\x2a" + varint(len(data)) + data)
    return blob


def _random_caffemodel(net: caffe_pb2.NetParameter, path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    weights = caffe_pb2.NetParameter(name=net.name)
    for step in shapes.plan_net(net, caffe_pb2.TEST, device="meta").layers:
        layer = step.layer
        if not len(layer.blobs):
            continue
        lp = weights.layer.add(name=layer.name, type=layer.caffe_type)
        for i, blob in enumerate(layer.blobs):
            shape = tuple(blob.shape)
            if layer.caffe_type == "BatchNorm":          # mean 0, variance 1, factor 1
                array = np.full(shape, 0.0 if i == 0 else 1.0, np.float32)
            elif layer.caffe_type in ("Normalize", "Scale") and i == 0:
                array = np.full(shape, 20.0 if layer.caffe_type == "Normalize" else 1.0, np.float32)
            else:
                scale = 1 / math.sqrt(max(1, int(np.prod(shape[1:])))) if len(shape) > 1 else 0.01
                array = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
            lp.blobs.append(_blob(array))
    io.write_caffemodel(weights, path)


def _check_opencv_shapes(net: caffe_pb2.NetParameter, plan: ssd.SSDPlan, tmp_path: Path) -> None:
    """OpenCV's forward gives every prediction source, module and output our static shape."""
    for layer in net.layer:
        layer.detection_output_param.ClearField("save_output_param")
    io.write_net(net, tmp_path / "deploy.prototxt")
    _random_caffemodel(net, tmp_path / "weights.caffemodel")
    rows = {r.name: r.shapes[0] for r in shapes.infer_shapes(net, caffe_pb2.TEST)}
    names = [l.source for l in plan.layers] + [f"{l.head_input}_mbox_priorbox" for l in plan.layers]
    names += ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox", "detection_out"]
    cv_net = cv2.dnn.readNetFromCaffe(str(tmp_path / "deploy.prototxt"), str(tmp_path / "weights.caffemodel"))
    size = net.input_shape[0].dim[2]
    cv_net.setInput(np.random.default_rng(1).uniform(-120, 130, (1, 3, size, size)).astype(np.float32))
    for name, out in zip_same(names, cv_net.forward(names), "OpenCV outputs"):
        ours = rows[name]
        assert len(out.shape) == len(ours), (name, out.shape, ours)
        assert all(o == d or d == -1 for o, d in zip(out.shape, ours)), (name, out.shape, ours)


@pytest.mark.parametrize("name", zoo.names())
def test_opencv_runs_every_model_with_our_static_shapes(name, tmp_path):
    # at 1/8 width (the tiny model as it is): the same layers, sizes and priors as the committed
    # net, with weights small enough to write and run in well under a second
    model = zoo.get(name)
    if model.width == 1.0:
        model = model.replace(width=1 / 8)
    _check_opencv_shapes(model.nets()["deploy"], model.plan(), tmp_path)


def test_opencv_runs_the_largest_committed_deploy_at_full_width(tmp_path):
    name = "deeper_ssd500_up123_concat_down12_eltwise"
    net = io.read_net(REPO / "prototxt" / name / "deploy.prototxt")
    _check_opencv_shapes(net, zoo.get(name).plan(), tmp_path)


# ---------------------------------------------------------------------------------------------
# shape-inconsistent variants are refused at generation time

def _with_module(name: str, index: int, module: deeper.Module):
    model = zoo.get(name)
    modules = list(model.modules)
    modules[index] = module
    return model.replace(modules=tuple(modules))


def test_a_module_with_the_wrong_deconvolution_stride_is_refused():
    up1 = deeper.up_module(1)
    stages = list(up1.high_branch)
    stages[2] = deeper.deconv(512, 3, 3)             # the paper's stride 3: 31 → 93, not 63
    model = _with_module("deeper_ssd500_up1_concat", 0, up1.replace(high_branch=tuple(stages)))
    with pytest.raises(LayerError) as err:
        model.nets()
    message = str(err.value)
    assert "'up1'" in message and "Concat" in message
    assert "conv4_3" in message and "63x63" in message and "93x93" in message


def test_an_eltwise_join_with_mismatched_channels_is_refused():
    up2 = deeper.up_module(2, "concat").replace(join="eltwise")    # 1024 + 512 channels
    model = _with_module("deeper_ssd500_up2_eltwise", 0, up2)
    with pytest.raises(LayerError, match=r"'up2'.*1x1024x32x32.*1x512x32x32"):
        model.plan()


def test_a_crop_past_the_border_is_refused():
    down1 = deeper.down_module(1).replace(crop_offset=10)    # 32 − 10 < 23
    with pytest.raises(LayerError, match="down1_crop"):
        _with_module("deeper_ssd500_down1_eltwise", 0, down1).plan()


# ---------------------------------------------------------------------------------------------
# the command line

def test_generate_refuses_a_net_that_does_not_fit_its_input(tmp_path, capsys):
    status = cli.main(["generate", "deeper_ssd500", "--out", str(tmp_path), "--set", "input_size=300"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "conv12_2" in err and "too small" in err
    assert cli.main(["generate", "no_such_model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_generate_with_settings_writes_four_files(tmp_path, capsys):
    assert cli.main(["generate", "deeper_ssd500_tiny", "--out", str(tmp_path),
                     "--set", "base_lr=0.02", "--set", "batch_size=2"]) == 0
    folder = tmp_path / "deeper_ssd500_tiny"
    assert sorted(p.name for p in folder.iterdir()) == [f"{p}.prototxt" for p in
                                                         ("deploy", "solver", "test", "train")]
    solver = io.read_solver(folder / "solver.prototxt")
    assert solver.base_lr == pytest.approx(0.02)
    assert solver.train_net == f"{tmp_path}/deeper_ssd500_tiny/train.prototxt"
    assert io.read_net(folder / "train.prototxt").layer[0].data_param.batch_size == 2


def test_zoo_lists_every_model_with_priors_parameters_and_gflops(capsys):
    assert cli.main(["zoo"]) == 0
    out = capsys.readouterr().out
    for name, priors in PRIOR_COUNTS.items():
        line = next(l for l in out.splitlines() if l.startswith(f"| {name} "))
        assert f" {priors} " in line
    cells = [c.strip() for c in next(l for l in out.splitlines() if l.startswith("| ssd300_voc0712 ")).split("|")]
    params, gflops = float(cells[5]), float(cells[6])
    assert params == 26.29 and gflops == pytest.approx(62.7, abs=0.5)    # 26.3 M parameters, 31.4 GMAC


def test_layer_sizes_table1_explains_every_disagreement(capsys):
    assert cli.main(["layer-sizes", "--paper", "table1"]) == 0
    out = capsys.readouterr().out
    assert "UNEXPLAINED" not in out
    disagreeing = {line.split("|")[1].strip() for line in out.splitlines() if "DISAGREE" in line}
    assert disagreeing == {"conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "pool3", "conv7_2"}
    assert "38x38" in out and "ceil" in out and "3x3/1/1 16x16" in out


@pytest.mark.parametrize("table, modules", [("table4", ("up1", "up2", "up3")), ("table6", ("down1", "down2"))])
def test_layer_sizes_module_tables(table, modules, capsys):
    assert cli.main(["layer-sizes", "--paper", table]) == 0
    out = capsys.readouterr().out
    for module in modules:
        assert f"\n{module}: " in out
    for line in out.splitlines():
        if "DISAGREE" in line:
            assert line.rstrip(" |").split("|")[-1].strip(), f"unexplained: {line}"
    if table == "table4":
        assert "3x3/2/1 | 512x31x31" in out and "1536x32x32" in out
    else:
        assert "down1_crop" in out and "256x23x23" in out and "256x11x11" in out


def test_draw_writes_png_svg_and_dot(tmp_path, capsys):
    deploy = REPO / "prototxt" / "deeper_ssd500_tiny" / "deploy.prototxt"
    assert cli.main(["draw", str(deploy), str(tmp_path / "net.png")]) == 0
    assert (tmp_path / "net.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["draw", "deeper_ssd500_down1_eltwise", str(tmp_path / "net.dot")]) == 0
    dot = (tmp_path / "net.dot").read_text()
    assert '"layer:down1_crop"' in dot and "1x256x23x23" in dot and "+ down1_relu (ReLU)" in dot
    assert cli.main(["draw", str(deploy), str(tmp_path / "net.svg"), "--rankdir", "LR"]) == 0
    assert b"<svg" in (tmp_path / "net.svg").read_bytes()[:400]


@pytest.mark.parametrize("name", zoo.names())
def test_models_hash_by_value(name):
    model, again = zoo.get(name), zoo.get(name)
    assert model == again and hash(model) == hash(again) and {model: name}[again] == name
    other = model.replace(normalizations={**model.normalizations, "fc7": 10})
    assert other != model and other.normalizations == {**model.normalizations, "fc7": 10}
    assert other == model.replace(normalizations={**model.normalizations, "fc7": 10})
    assert hash(other) == hash(model.replace(normalizations={**model.normalizations, "fc7": 10}))


def test_head_models_hash_by_value():
    srtod = lambda: heads.with_srtod(zoo.get("ssd300"), heads.SRTOD(channels=[8, 8, 8]))
    assert srtod() == srtod() and hash(srtod()) == hash(srtod()) and srtod().head.channels == (8, 8, 8)
    settings = lambda: heads.ZoomIn(pairs=[["fc7", "fc7"]], akdp={"std_mode": "POPULATION"})
    zoomin = lambda: heads.with_zoomin(zoo.get("ssd300"), settings())
    assert zoomin() == zoomin() and hash(zoomin()) == hash(zoomin())
    assert settings().akdp == {"std_mode": "POPULATION"} and settings().pairs == (("fc7", "fc7"),)
    assert zoomin() != heads.with_zoomin(zoo.get("ssd300"), heads.ZoomIn(akdp={"std_mode": "SAMPLE"}))
