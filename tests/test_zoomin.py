"""ZoomInNet: the layers (Upsample, AKDPMask, PositionAwareL2Loss) with their index conventions,
hand-computed masks and losses and gradients into the student only; teacher weights under a
prefix; the builder's teacher, distillation net and frozen teacher."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deeper_ssd import io, shapes
from deeper_ssd.layers import LayerError
from deeper_ssd.net import Net
from deeper_ssd.proto import caffe_pb2
from deeper_ssd.builder import heads, ssd, zoo
from deeper_ssd.builder.solver import SolverSettings
from support.layers import build, run_ours

REPO = Path(__file__).resolve().parent.parent

UP = 'name: "up" type: "Upsample" bottom: "x" top: "y"'


# ---------------------------------------------------------------------------------------------
# Upsample

def test_upsample_integer_scale_copies_each_cell_into_its_block():
    x = np.arange(6.0).reshape(1, 1, 2, 3)
    y = run_ours(UP, [x])["tops"][0]
    assert y.shape == (1, 1, 4, 6)
    for i in range(4):
        for j in range(6):
            assert y[0, 0, i, j] == x[0, 0, i // 2, j // 2]
    y3 = run_ours(UP + " upsample_param { scale: 3 }", [x])["tops"][0]
    np.testing.assert_array_equal(y3[0, 0], np.kron(x[0, 0], np.ones((3, 3))))


def test_upsample_explicit_size_uses_floor_of_i_times_in_over_out():
    """Non-integer factors: y[i, j] = x[floor(i*h/H), floor(j*w/W)], PyTorch's legacy nearest."""
    x = np.arange(6.0).reshape(1, 1, 2, 3)
    y = run_ours(UP + " upsample_param { out_height: 5 out_width: 4 }", [x])["tops"][0]
    rows, cols = [i * 2 // 5 for i in range(5)], [j * 3 // 4 for j in range(4)]
    assert rows == [0, 0, 0, 1, 1] and cols == [0, 0, 1, 2]
    np.testing.assert_array_equal(y[0, 0], x[0, 0][np.ix_(rows, cols)])
    ref = F.interpolate(torch.tensor(x), size=(5, 4), mode="nearest").numpy()
    np.testing.assert_array_equal(y, ref)


def test_upsample_backward_sums_each_block():
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 2))
    g = np.random.default_rng(1).normal(size=(2, 3, 6, 4))
    out = run_ours(UP, [x], top_grads=[g])
    expected = g.reshape(2, 3, 3, 2, 2, 2).sum((3, 5))
    np.testing.assert_allclose(out["bottom_grads"][0], expected, rtol=1e-12)


def test_upsample_shapes_and_errors():
    assert build(UP, [(2, 8, 63, 63)]).top_shapes == [(2, 8, 126, 126)]
    assert build(UP + " upsample_param { out_height: 125 out_width: 125 }",
                 [(2, 8, 63, 63)]).top_shapes == [(2, 8, 125, 125)]
    with pytest.raises(LayerError, match="both out_height and out_width"):
        build(UP + " upsample_param { out_height: 5 }", [(1, 1, 2, 2)])
    with pytest.raises(LayerError, match="scale must be >= 1"):
        build(UP + " upsample_param { scale: 0 }", [(1, 1, 2, 2)])
    with pytest.raises(LayerError, match="N x C x h x w"):
        build(UP, [(1, 4)])


# ---------------------------------------------------------------------------------------------
# AKDPMask

QUADRANTS = [[0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1], [.5, .5, 1, 1]]   # cells of a 2x2 map


def _prior_blob(boxes):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1)
    return np.stack([boxes, np.full_like(boxes, 0.1)])[None]                  # 1 x 2 x 4K


def _labels(rows):
    """rows (item, xmin, ymin, xmax, ymax[, difficult]) -> 1 x 1 x G x 8, label 1."""
    full = [[r[0], 1, i, *r[1:5], r[5] if len(r) > 5 else 0] for i, r in enumerate(rows)]
    return np.asarray(full, dtype=np.float64).reshape(1, 1, -1, 8)


def _akdp(params="", levels=1):
    bottoms = "".join(f' bottom: "f{l}" bottom: "p{l}"' for l in range(levels))
    tops = "".join(f' top: "m{l}"' for l in range(levels))
    return f'name: "akdp" type: "AKDPMask"{bottoms} bottom: "label"{tops} akdp_mask_param {{ {params} }}'


def test_akdp_hand_computed_threshold_mean_plus_sample_std():
    # object [0, 0, .5, .75]: IoU 2/3 with cell (0,0), 1/4 with cell (1,0), 0 with the others
    iou = np.array([2 / 3, 0, 1 / 4, 0])
    mean = iou.mean()                                   # 0.2291667
    std = np.sqrt(((iou - mean) ** 2).sum() / 3)        # sample std: 0.3145764
    threshold = (mean + std) * (2 / 3)                  # 0.3625 -> only cell (0,0)
    assert 1 / 4 < threshold < 2 / 3
    feat = np.zeros((1, 5, 2, 2))
    mask = run_ours(_akdp(), [feat, _prior_blob(QUADRANTS), _labels([(0, 0, 0, .5, .75)])])["tops"][0]
    np.testing.assert_array_equal(mask, [[[[1, 0], [0, 0]]]])
    # a fixed factor of 0.3 (threshold 0.2) also takes cell (1,0)
    mask = run_ours(_akdp("threshold_mode: FIXED fixed_factor: 0.3"),
                    [feat, _prior_blob(QUADRANTS), _labels([(0, 0, 0, .5, .75)])])["tops"][0]
    np.testing.assert_array_equal(mask, [[[[1, 0], [1, 0]]]])


def test_akdp_sample_and_population_std_differ_where_the_threshold_is_close():
    """8 priors (2x2 map, 2 per cell) with IoUs [1, 0, .56, 0, ...] against one object: the
    population lambda (.5502) keeps prior 2 (cell (0,1)), the sample lambda (.5747) does not."""
    x = 0.56
    side = np.sqrt(x * 0.25)                                           # a box inside the object
    far = [.6, .6, 1, 1]
    priors = [[0, 0, .5, .5], far, [0, 0, side, side]] + [far] * 5
    iou = np.array([1, 0, x, 0, 0, 0, 0, 0])
    assert iou.mean() + iou.std() < x < iou.mean() + iou.std(ddof=1)
    args = [np.zeros((1, 1, 2, 2)), _prior_blob(priors), _labels([(0, 0, 0, .5, .5)])]
    np.testing.assert_array_equal(run_ours(_akdp(), args)["tops"][0].ravel(), [1, 0, 0, 0])
    np.testing.assert_array_equal(run_ours(_akdp("std_mode: POPULATION"), args)["tops"][0].ravel(),
                                  [1, 1, 0, 0])


def test_akdp_prior_layout_batch_difficult_and_counts():
    """Two priors per cell (prior (i*w + j)*P + p: the quadrant, then its top-left quarter);
    image 1 has no object (the item-2 row is outside the batch); the difficult object counts
    only with use_difficult_gt; binarize: false counts (prior, object) pairs."""
    priors = []
    for cell in QUADRANTS:
        priors += [cell, [cell[0], cell[1], (cell[0] + cell[2]) / 2, (cell[1] + cell[3]) / 2]]
    rows = [(0, .5, .5, 1, 1), (0, .5, .5, .75, .75), (2, 0, 0, .5, .5), (0, 0, 0, .5, .5, 1)]
    feat = np.zeros((2, 3, 2, 2))
    labels = _labels(rows)
    # with the difficult object: 24 IoUs, three 1s and three .25s: lambda = .15625 + .3363 < 1
    # and > .25, so each object keys only its IoU-1 prior: priors 6, 7 (cell (1,1)) and 0
    keep = run_ours(_akdp(), [feat, _prior_blob(priors), labels])["tops"][0]
    np.testing.assert_array_equal(keep[0, 0], [[1, 0], [0, 1]])
    np.testing.assert_array_equal(keep[1, 0], [[0, 0], [0, 0]])
    drop = run_ours(_akdp("use_difficult_gt: false"), [feat, _prior_blob(priors), labels])["tops"][0]
    np.testing.assert_array_equal(drop[0, 0], [[0, 0], [0, 1]])
    counts = run_ours(_akdp("use_difficult_gt: false binarize: false"),
                      [feat, _prior_blob(priors), labels])["tops"][0]
    np.testing.assert_array_equal(counts[0, 0], [[0, 0], [0, 2]])     # (6, obj 0) and (7, obj 1)


def test_akdp_scope_all_levels_shares_statistics_and_best_iou():
    """Object [0, 0, .4, .4]: IoU .64 with the fine level's cell (0,0), .25 with the single
    coarse prior. Per level both are key; over both levels lambda = .458, the threshold
    .458 * .64 = .293 drops the coarse prior."""
    label = _labels([(0, 0, 0, .4, .4)])
    args = [np.zeros((1, 1, 2, 2)), _prior_blob(QUADRANTS), np.zeros((1, 1, 1, 1)),
            _prior_blob([[0, 0, .8, .8]]), label]
    per_level = run_ours(_akdp(levels=2), args)["tops"]
    np.testing.assert_array_equal(per_level[0].ravel(), [1, 0, 0, 0])
    np.testing.assert_array_equal(per_level[1].ravel(), [1])
    iou = np.array([.64, 0, 0, 0, .25])
    assert (iou.mean() + iou.std(ddof=1)) * .64 > .25
    joint = run_ours(_akdp("scope: ALL_LEVELS", levels=2), args)["tops"]
    np.testing.assert_array_equal(joint[0].ravel(), [1, 0, 0, 0])
    np.testing.assert_array_equal(joint[1].ravel(), [0])


def test_akdp_uses_the_priorbox_layout_of_a_real_layer():
    """PriorBox top -> AKDPMask: an object on cell (2, 1) of a 4x4 map marks that cell."""
    text = ('layer { name: "in" type: "Input" top: "f" top: "img" top: "label" input_param { '
            'shape { dim: 1 dim: 2 dim: 4 dim: 4 } shape { dim: 1 dim: 3 dim: 32 dim: 32 } '
            'shape { dim: 1 dim: 1 dim: 1 dim: 8 } } }\n'
            'layer { name: "pb" type: "PriorBox" bottom: "f" bottom: "img" top: "pb" '
            'prior_box_param { min_size: 8 aspect_ratio: 2 flip: true } }\n'
            'layer { name: "akdp" type: "AKDPMask" bottom: "f" bottom: "pb" bottom: "label" top: "mask" }')
    net = Net(io.parse_text(text, caffe_pb2.NetParameter()), "TEST")
    label = torch.tensor([[[[0, 1, 0, 8 / 32, 16 / 32, 16 / 32, 24 / 32, 0]]]])
    out = net(f=torch.zeros(1, 2, 4, 4), img=torch.zeros(1, 3, 32, 32), label=label)
    mask = out["mask"][0, 0]
    assert mask[2, 1] == 1 and mask.sum() == 1


def test_akdp_shape_rules():
    ok = build(_akdp(levels=2), [(4, 8, 3, 3), (1, 2, 4 * 9 * 6), (4, 8, 2, 2), (1, 2, 4 * 4 * 4),
                                 (1, 1, -1, 8)])
    assert ok.top_shapes == [(4, 1, 3, 3), (4, 1, 2, 2)] and ok.cell_priors == [6, 4]
    with pytest.raises(LayerError, match="do not tile"):
        build(_akdp(), [(4, 8, 3, 3), (1, 2, 4 * 10), (1, 1, -1, 8)])
    with pytest.raises(LayerError, match="1x1xGx8"):
        build(_akdp(), [(4, 8, 3, 3), (1, 2, 4 * 9), (1, 1, 3, 7)])
    with pytest.raises(LayerError, match="one top per level"):
        build(_akdp(levels=2).replace(' top: "m1"', ""), [(4, 8, 3, 3), (1, 2, 36)] * 2 + [(1, 1, 2, 8)])


# ---------------------------------------------------------------------------------------------
# PositionAwareL2Loss

LOSS = 'name: "distill" type: "PositionAwareL2Loss" bottom: "s" bottom: "t" bottom: "m" top: "loss"'


def test_position_aware_l2_hand_computed():
    s = np.zeros((2, 2, 1, 2))
    t = np.array([[[[1, 2]], [[3, 4]]], [[[0, 1]], [[1, 0]]]], dtype=float)
    m = np.array([[[[1, 0]]], [[[1, 1]]]], dtype=float)
    # per cell, channel sum: image 0: [1+9, 4+16] = [10, 20]; image 1: [0+1, 1+0] = [1, 1]
    assert run_ours(LOSS, [s, t, m])["tops"][0] == pytest.approx((10 + 1 + 1) / 3)
    mean = run_ours(LOSS + " position_aware_l2_loss_param { channel_reduce: MEAN }", [s, t, m])["tops"][0]
    assert mean == pytest.approx((5 + .5 + .5) / 3)
    per_image = run_ours(LOSS + " position_aware_l2_loss_param { normalization: PER_IMAGE }", [s, t, m])
    assert per_image["tops"][0] == pytest.approx((10 / 1 + 2 / 2) / 2)
    none = run_ours(LOSS + " position_aware_l2_loss_param { normalization: NONE }", [s, t, m])
    assert none["tops"][0] == pytest.approx(12)
    empty = run_ours(LOSS, [s, t, np.zeros_like(m)])["tops"][0]
    assert empty == 0


def test_position_aware_l2_gradient_reaches_only_the_student():
    layer = build(LOSS, [(2, 3, 4, 5), (2, 3, 4, 5), (2, 1, 4, 5)]).double()
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(2, 1, 4, 5, generator=g) > 0.5).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: layer(x, t, m), (s,))
    loss = layer(s, t, m)
    loss.backward()
    assert t.grad is None and m.grad is None
    np.testing.assert_allclose(s.grad, -2 * m.detach() * (t.detach() - s.detach()) / m.sum().item())


def test_position_aware_l2_refuses_teacher_gradients_and_mismatched_shapes():
    with pytest.raises(LayerError, match="cannot back-propagate to the teacher"):
        build(LOSS + " propagate_down: true propagate_down: true propagate_down: false",
              [(1, 2, 3, 3), (1, 2, 3, 3), (1, 1, 3, 3)])
    assert build(LOSS + " propagate_down: true propagate_down: false propagate_down: false",
                 [(1, 2, 3, 3), (1, 2, 3, 3), (1, 1, 3, 3)]).top_shapes == [()]
    with pytest.raises(LayerError, match="crop or adapt"):
        build(LOSS, [(1, 2, 4, 4), (1, 2, 3, 3), (1, 1, 3, 3)])
    with pytest.raises(LayerError, match="mask must be"):
        build(LOSS, [(1, 2, 3, 3), (1, 2, 3, 3), (1, 2, 3, 3)])


# ---------------------------------------------------------------------------------------------
# teacher weights under a name prefix

def _conv_net(names):
    layers = "".join(f'layer {{ name: "{n}" type: "Convolution" bottom: "data" top: "{n}" '
                     'convolution_param { num_output: 2 kernel_size: 1 '
                     'weight_filler { type: "gaussian" } } }\n'
                     for n in names)
    data = ('layer { name: "in" type: "Input" top: "data" '
            'input_param { shape { dim: 1 dim: 3 dim: 2 dim: 2 } } }\n')
    return io.parse_text(data + layers, caffe_pb2.NetParameter())


def test_load_caffemodel_with_prefix_fills_only_the_prefixed_copy(tmp_path):
    teacher = Net(_conv_net(["conv"]), seed=1)
    teacher.save_caffemodel(tmp_path / "teacher.caffemodel")
    both = Net(_conv_net(["conv", "teacher/conv"]), seed=2)
    student_before = both.params["conv"][0].clone()
    assert both.load_caffemodel(tmp_path / "teacher.caffemodel", prefix="teacher/") == ["teacher/conv"]
    assert torch.equal(both.params["teacher/conv"][0], teacher.params["conv"][0])
    assert torch.equal(both.params["conv"][0], student_before)


# ---------------------------------------------------------------------------------------------
# the distillation net (deeper_ssd.builder.heads, ZoomInNet section)

def _small_model(**changes):
    """A 1/16-width SSD with four levels at 64x64: conv4_3 8, fc7 4, conv6_2 2, conv7_2 2 (pad 1,
    stride 1, as Deeper SSD's); at 128 (the teacher) every map doubles exactly."""
    settings = SolverSettings(base_lr=0.01, stepvalues=(100,), max_iter=100, solver_mode="CPU")
    model = ssd.SSDModel(name="small", net_name="small", input_size=64, dataset=zoo.DRONE_SAMPLE,
                         extras=(*ssd.extra_pair(6), *ssd.extra_pair(7, 1, 1)),
                         sources=("conv4_3", "fc7", "conv6_2", "conv7_2"), width=1 / 16, batchnorm=True,
                         prior_sizes=((8, 16), (16, 24), (24, 40), (40, 60)), batch_size=2, solver=settings)
    return model.replace(**changes)


def _inputs(batch=2, size=128):
    g = torch.Generator().manual_seed(3)
    label = torch.tensor([[[[0, 1, 0, .1, .1, .3, .35, 0], [1, 1, 0, .5, .4, .7, .6, 0],
                            [1, 1, 1, .05, .6, .2, .9, 0]]]])
    return dict(data_2x=torch.randn(batch, 3, size, size, generator=g) * 50, label=label)


def _teacher_blobs(net):
    return {(layer.name, i): blob.detach().clone() for layer in net.layers
            if layer.name.startswith("teacher/")
            for i, blob in enumerate(layer.blobs)}


def test_teacher_is_the_model_at_twice_the_input_with_the_students_prior_pixels():
    student = zoo.get("deeper_ssd500")
    teacher = heads.zoomin_teacher(student)
    s_plan, t_plan = student.plan(), teacher.plan()
    assert teacher.input_size == 1000 and teacher.name == "deeper_ssd500_teacher"
    assert [l.prior.min_size for l in t_plan.layers] == [l.prior.min_size for l in s_plan.layers]
    assert [l.map_size for l in t_plan.layers] == [125, 63, 32, 32, 30, 28, 26, 24, 22]
    # steps: the student's where the map doubles (8, 16, 32, 32), 1000 / map elsewhere
    assert [l.prior.step for l in t_plan.layers][:4] == [l.prior.step for l in s_plan.layers][:4]
    assert t_plan.layers[4].prior.step == pytest.approx(1000 / 30)
    doubled = heads.zoomin_teacher(student, heads.ZoomIn(teacher_prior_scale=2)).plan()
    assert doubled.layers[0].prior.min_size == 2 * s_plan.layers[0].prior.min_size


def test_generated_distillation_net_static_shapes():
    model = heads.with_zoomin(zoo.get("deeper_ssd500"))
    nets = model.nets()
    assert list(nets) == ["train", "train_nodistill", "test", "deploy"]
    train = nets["train"]
    blobs = shapes.plan_net(train, caffe_pb2.TRAIN, device="meta").blob_shapes
    assert blobs["data_2x"] == (8, 3, 1000, 1000) and blobs["data"] == (8, 3, 500, 500)
    expected = {  # student head input (LA) vs teacher map: crop the student where it is one larger
        "conv4_3_norm": ((8, 512, 126, 126), (8, 512, 125, 125)),
        "fc7": ((8, 1024, 64, 64), (8, 1024, 63, 63)),
        "conv6_2": ((8, 512, 32, 32), (8, 512, 32, 32)), "conv7_2": ((8, 256, 32, 32), (8, 256, 32, 32))}
    for head, (up, teacher) in expected.items():
        assert blobs[f"{head}_up"] == up and blobs[f"teacher/{head}"] == teacher
        assert blobs[f"zoomin/mask_{head}"] == (8, 1, *teacher[2:])
        assert blobs[f"zoomin/loss_{head}"] == ()
    assert blobs["zoomin/conv4_3_norm_crop"] == (8, 512, 125, 125)
    losses = [l for l in train.layer if l.type == "PositionAwareL2Loss"]
    assert [l.name for l in losses] == [f"zoomin/loss_{h}" for h in expected]        # conv8_2 ...: 28 vs 30
    for layer in losses:
        assert list(layer.loss_weight) == [pytest.approx(0.01)]
        assert list(layer.propagate_down) == [True, False, False]
    teacher = [l for l in train.layer if l.name.startswith("teacher/")]
    assert teacher and all(p.lr_mult == 0 and p.decay_mult == 0 for l in teacher for p in l.param)
    assert not any(l.type in ("MultiBoxLoss", "AnnotatedData") for l in teacher)
    assert {l.name for l in teacher} >= {"teacher/conv1_1", "teacher/conv7_2", "teacher/conv4_3_norm"}
    assert "teacher/conv8_2" not in {l.name for l in teacher}
    # the student's PriorBoxes live in the 2x frame; test and deploy are the student at 500
    prior = next(l for l in train.layer if l.name == "conv4_3_norm_mbox_priorbox")
    assert list(prior.bottom) == ["conv4_3_norm_up", "data"] and prior.prior_box_param.img_size == 1000
    deploy = shapes.plan_net(nets["deploy"], caffe_pb2.TEST, device="meta").blob_shapes
    assert deploy["data"] == (1, 3, 500, 500) and deploy["conv4_3_norm_up"] == (1, 512, 126, 126)
    assert not any(l.name.startswith(("teacher/", "zoomin/")) for l in nets["deploy"].layer)


def test_alignment_none_subsamples_the_teacher_and_explicit_pairs_get_adapters():
    none = heads.with_zoomin(_small_model(), heads.ZoomIn(alignment="NONE")).nets()["train"]
    blobs = shapes.plan_net(none, caffe_pb2.TRAIN, device="meta").blob_shapes
    assert blobs["zoomin/conv4_3_norm_teacher_sub"] == blobs["conv4_3_norm"]
    assert not any(l.type == "Upsample" for l in none.layer)
    crossed = heads.with_zoomin(_small_model(), heads.ZoomIn(pairs=(("conv6_2", "conv7_2"),)))
    blobs = shapes.plan_net(crossed.nets()["train"], caffe_pb2.TRAIN, device="meta").blob_shapes
    # LA: conv6_2_up (32 channels, 4x4) against the teacher's conv7_2 (16 channels, 4x4)
    assert blobs["conv6_2_up"][1:] == (32, 4, 4) and blobs["teacher/conv7_2"][1:] == (16, 4, 4)
    assert blobs["zoomin/conv6_2_adapt"][1:] == (16, 4, 4)
    with pytest.raises(ValueError, match=r"aligned maps \(8, 8\) and \(16, 16\)"):
        heads.with_zoomin(_small_model(), heads.ZoomIn(pairs=(("fc7", "conv4_3_norm"),))).nets()


def test_la_student_priors_are_the_teachers():
    model = heads.with_zoomin(_small_model())
    student = Net(model.nets()["deploy"], "TEST", seed=0)
    teacher = Net(model.teacher().nets()["deploy"], "TEST", seed=0)
    student.forward(keep_blobs=True, data=torch.zeros(1, 3, 64, 64))
    teacher.forward(keep_blobs=True, data=torch.zeros(1, 3, 128, 128))
    assert torch.equal(student.blobs["mbox_priorbox"], teacher.blobs["mbox_priorbox"])


def test_teacher_loads_its_own_caffemodel_gets_no_gradient_and_never_changes(tmp_path):
    """Through the trainer: ``--weights teacher/=teacher.caffemodel`` fills the frozen copy,
    which then computes what the teacher computes alone, takes no gradient and keeps every blob
    (BatchNorm statistics included) through solver steps while the student learns."""
    from deeper_ssd.data.sample import make_sample_set
    from deeper_ssd.solver import Solver
    data = tmp_path / "data"
    make_sample_set(data, seed=0, train=4, test=2, width=128, height=96)
    dataset = ssd.Dataset("tiny", 2, str(REPO / "data" / "labelmap_drone.prototxt"),
                          str(data / "trainval_lmdb"), str(data / "test_lmdb"), num_test_image=2)
    model = heads.with_zoomin(_small_model(dataset=dataset, test_batch_size=2))
    heads.write_zoomin(model, str(tmp_path))
    teacher_own = Net(model.teacher().nets()["deploy"], "TEST", seed=5)
    with torch.no_grad():                                   # stored BatchNorm statistics, not zeros
        for layer in teacher_own.layers:
            if layer.caffe_type == "BatchNorm":
                layer.blobs[0].normal_(0, 0.1), layer.blobs[1].uniform_(0.5, 2), layer.blobs[2].fill_(1)
    teacher_own.save_caffemodel(tmp_path / "teacher.caffemodel")
    param = io.read_solver(tmp_path / "small_zoomin" / "solver.prototxt")
    param.snapshot_prefix = str(tmp_path / "snapshots" / "small_zoomin")
    solver = Solver(param, log=lambda line: None)
    solver.load_weights([f"teacher/={tmp_path / 'teacher.caffemodel'}"])
    net = solver.train_net
    inputs = _inputs()
    teacher_own.forward(keep_blobs=True, data=inputs["data_2x"])
    net.forward(keep_blobs=True, **inputs)
    torch.testing.assert_close(net.blobs["teacher/conv4_3_norm"], teacher_own.blobs["conv4_3_norm"])
    params = net.learnable_params
    assert all(not p.blob.requires_grad for p in params if p.layer.startswith("teacher/"))
    out = net(**inputs)
    out.loss.backward()
    assert all(p.blob.grad is None for p in params if p.layer.startswith("teacher/"))
    assert all(out[f"zoomin/loss_{h}"].item() > 0 for h in ("conv4_3_norm", "fc7", "conv6_2", "conv7_2"))
    frozen = _teacher_blobs(net)
    student_before = net.params["conv1_1"][0].detach().clone()
    solver.step(3)
    solver.close()
    after = _teacher_blobs(net)
    assert after.keys() == frozen.keys() and all(torch.equal(after[k], frozen[k]) for k in frozen)
    assert not torch.equal(net.params["conv1_1"][0], student_before)


def test_student_weights_start_equal_with_and_without_distillation():
    nets = heads.with_zoomin(_small_model()).nets()
    with_teacher = Net(nets["train"], "TRAIN", seed=7)
    baseline = Net(nets["train_nodistill"], "TRAIN", seed=7)
    for name, blobs in baseline.params.items():
        for a, b in zip(blobs, with_teacher.params[name]):
            assert torch.equal(a, b), name


def test_generate_head_zoomin_writes_the_student_and_its_teacher(tmp_path, capsys):
    from deeper_ssd import cli
    assert cli.main(["generate", "deeper_ssd500_tiny", "--head", "zoomin", "--head-set", "loss_weight=0.02",
                     "--out", str(tmp_path)]) == 0
    student, teacher = tmp_path / "deeper_ssd500_tiny_zoomin", tmp_path / "deeper_ssd500_tiny_zoomin_teacher"
    assert sorted(p.name for p in student.iterdir()) == sorted(
        f"{n}.prototxt" for n in ("train", "train_nodistill", "test", "deploy", "solver", "solver_nodistill"))
    assert sorted(p.name for p in teacher.iterdir()) == sorted(
        f"{n}.prototxt" for n in ("train", "test", "deploy", "solver"))
    assert io.read_solver(student / "solver_nodistill.prototxt").train_net == \
        f"{tmp_path}/deeper_ssd500_tiny_zoomin/train_nodistill.prototxt"
    train = io.read_net(student / "train.prototxt")
    weights = [list(l.loss_weight) for l in train.layer if l.type == "PositionAwareL2Loss"]
    assert weights == [[pytest.approx(0.02)]] * 4
    assert "deeper_ssd500_tiny_zoomin_teacher:" in capsys.readouterr().out
    assert cli.main(["generate", "deeper_ssd500_tiny", "--head", "zoomin", "--head-set", "alignment='FA'",
                     "--out", str(tmp_path)]) == 2
