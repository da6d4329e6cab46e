"""MultiBoxLoss: hand-worked cases for matching, mining, encoding and every normalisation,
Caffe's quirks pinned, float64 gradcheck, the per-image reference on random batches, and
value + gradient parity with real Caffe (when the oracle is present)."""
import math
import re

import numpy as np
import pytest
import torch

from deeper_ssd.layers import LayerError
from deeper_ssd.layers.multibox_loss import MultiBoxLoss
from deeper_ssd.proto import caffe_pb2
from support import zip_same
from support.layers import layer_param
from support.multibox import HAND_IOU, OBJECT, PRIORS, VAR, prior_blob
from support.multibox import multibox_loss as reference_loss

LN3 = math.log(3)


def layer_text(fields="", loss_param="", extra=""):
    return (f'name: "mbox_loss" type: "MultiBoxLoss" bottom: "loc" bottom: "conf" bottom: "prior" '
            f'bottom: "label" top: "loss" {extra} {loss_param} multibox_loss_param {{ {fields} }}')


def make(fields, shapes, loss_param="", extra="", device=None):
    return MultiBoxLoss(layer_param(layer_text(fields, loss_param, extra)), shapes, caffe_pb2.TRAIN, device=device)


def label_blob(rows):
    return torch.tensor(rows, dtype=torch.float32).view(1, 1, -1, 8)


def run(fields, loc, conf, prior, label, loss_param="", extra="", dtype=torch.float64):
    layer = make(fields, [tuple(loc.shape), tuple(conf.shape), tuple(prior.shape), tuple(label.shape)],
                 loss_param, extra)
    loc = loc.to(dtype).requires_grad_()
    conf = conf.to(dtype).requires_grad_()
    terms = layer.terms(loc, conf, prior, label)
    terms.loss.backward()
    grad = lambda t: torch.zeros_like(t) if t.grad is None else t.grad  # noqa: E731
    return terms, grad(loc), grad(conf)


# ---------------------------------------------------------------------------------------------
# the three-prior, one-object case of test_box (IoU 0.281 / 0.426 / 0.025), worked by hand

HAND_LABEL = [[0, 1, 0, *OBJECT[0].tolist(), 0]]
B_TARGET = [-2, -2, math.log(0.8) / 0.2, math.log(0.8) / 0.2]


def hand(fields="num_classes: 3 code_type: CENTER_SIZE", conf=None, loss_param="", **kw):
    conf = torch.zeros(1, 9) if conf is None else conf
    return run(fields, torch.zeros(1, 12), conf, prior_blob(PRIORS), label_blob(HAND_LABEL), loss_param, **kw)


def test_hand_case_value_and_gradients():
    terms, dloc, dconf = hand()
    assert terms.indices[0, 0].tolist() == [-1, 0, -1]
    assert terms.negatives[0].tolist() == [True, False, True]     # min(int(1 * 3), 2 eligible)
    smooth = sum(abs(t) - 0.5 if abs(t) >= 1 else 0.5 * t * t for t in B_TARGET)
    assert terms.loc_sum.item() == pytest.approx(smooth, rel=1e-6)
    assert terms.conf_sum.item() == pytest.approx(3 * LN3, rel=1e-6)
    assert terms.num_matches.item() == 1 and terms.normalizer.item() == 1
    assert terms.loss.item() == pytest.approx(smooth + 3 * LN3, rel=1e-6)
    # loc: sign(pred - target) = +1 on all four coordinates of prior B only
    np.testing.assert_allclose(dloc.view(3, 4).numpy(), [[0] * 4, [1] * 4, [0] * 4])
    # conf: softmax - onehot on the three selected rows (B towards class 1, A and C background)
    third = 1 / 3
    np.testing.assert_allclose(dconf.view(3, 3).numpy(), [[third - 1, third, third],
                                                           [third, third - 1, third],
                                                           [third - 1, third, third]], rtol=1e-6)


def test_mining_ranks_by_background_loss_and_truncates_the_ratio():
    conf = torch.zeros(1, 9)
    conf[0, 6] = -1.0                          # prior C: lower background logit -> larger loss
    terms, _, _ = hand("num_classes: 3 code_type: CENTER_SIZE neg_pos_ratio: 1.9", conf)
    assert terms.negatives[0].tolist() == [False, False, True]     # int(1 * 1.9) = 1
    terms, _, _ = hand("num_classes: 3 code_type: CENTER_SIZE neg_pos_ratio: 0.9", conf)
    assert not terms.negatives.any()                                # int(0.9) = 0
    assert terms.conf_sum.item() == pytest.approx(LN3, rel=1e-6)


def test_neg_overlap_is_strict_and_overlap_threshold_inclusive():
    # prior A's best IoU is 0.28125: eligible below neg_overlap 0.3, not at exactly 0.28125
    terms, _, _ = hand(f"num_classes: 3 code_type: CENTER_SIZE neg_overlap: {HAND_IOU[0]!r}")
    assert terms.negatives[0].tolist() == [False, False, True]
    terms, _, _ = hand(f"num_classes: 3 code_type: CENTER_SIZE overlap_threshold: {HAND_IOU[0]!r}")
    assert terms.indices[0, 0].tolist() == [0, 0, -1]
    terms, _, _ = hand(f"num_classes: 3 code_type: CENTER_SIZE overlap_threshold: {HAND_IOU[0]!r} "
                       "match_type: BIPARTITE")
    assert terms.indices[0, 0].tolist() == [-1, 0, -1]


@pytest.mark.parametrize("normalization,expected", [("VALID", 1), ("BATCH_SIZE", 1), ("FULL", 3), ("NONE", 1)])
def test_normalizations(normalization, expected):
    base, _, _ = hand()
    terms, _, _ = hand(loss_param=f"loss_param {{ normalization: {normalization} }}")
    assert terms.normalizer.item() == expected
    assert terms.loss.item() == pytest.approx(base.loss.item() / expected, rel=1e-6)


def test_normalizer_counts_matches_over_the_batch_and_is_at_least_one():
    prior = prior_blob(PRIORS)
    label = label_blob([[0, 1, 0, *OBJECT[0].tolist(), 0], [1, 2, 0, 0.5, 0.5, 1, 1, 0]])
    terms, _, _ = run("num_classes: 3 code_type: CENTER_SIZE overlap_threshold: 0.25",
                      torch.zeros(2, 12), torch.zeros(2, 9), prior, label)
    assert terms.num_matches.item() == 3           # A, B in image 0; C in image 1
    assert terms.loss.item() == pytest.approx((terms.loc_sum + terms.conf_sum).item() / 3)
    for mode, norm in (("FULL", 6), ("BATCH_SIZE", 2), ("NONE", 1)):
        t, _, _ = run("num_classes: 3 code_type: CENTER_SIZE overlap_threshold: 0.25", torch.zeros(2, 12),
                      torch.zeros(2, 9), prior, label, f"loss_param {{ normalization: {mode} }}")
        assert t.normalizer.item() == norm
    legacy, _, _ = run("num_classes: 3", torch.zeros(2, 12), torch.zeros(2, 9), prior, label,
                       "loss_param { normalize: false }")
    assert legacy.normalizer.item() == 2            # normalize: false = BATCH_SIZE
    empty, _, _ = run("num_classes: 3", torch.zeros(2, 12), torch.zeros(2, 9), prior, label_blob([[-1] * 8]))
    assert empty.num_matches.item() == 0 and empty.normalizer.item() == 1 and empty.loss.item() == 0


def test_images_without_objects_contribute_nothing_unless_every_prior_is_used():
    prior = prior_blob(PRIORS)
    label = label_blob(HAND_LABEL)                  # image 1 has no object
    conf = torch.randn(2, 9, generator=torch.Generator().manual_seed(0))
    mined, _, dconf = run("num_classes: 3 code_type: CENTER_SIZE", torch.zeros(2, 12), conf, prior, label)
    assert not mined.negatives[1].any() and (dconf[1] == 0).all()
    single, _, _ = run("num_classes: 3 code_type: CENTER_SIZE", torch.zeros(1, 12), conf[:1], prior, label)
    assert mined.loss.item() == pytest.approx(single.loss.item())
    every, _, dconf = run("num_classes: 3 code_type: CENTER_SIZE mining_type: NONE", torch.zeros(2, 12), conf,
                          prior, label)
    background = -torch.log_softmax(conf[1].double().view(3, 3), 1)[:, 0].sum()
    assert (dconf[1] != 0).all()
    assert every.conf_sum.item() == pytest.approx(
        background.item() - torch.log_softmax(conf[0].double().view(3, 3), 1)[[0, 1, 2], [0, 1, 0]].sum().item())


def test_difficult_objects_and_ignored_cross_boundary_priors():
    difficult = label_blob([[0, 1, 0, *OBJECT[0].tolist(), 1]])
    terms, _, _ = run("num_classes: 3 use_difficult_gt: false", torch.zeros(1, 12), torch.zeros(1, 9),
                      prior_blob(PRIORS), difficult)
    assert terms.num_matches.item() == 0 and terms.loss.item() == 0
    outside = PRIORS.clone()
    outside[1, 0] = -0.01                                                 # prior B leaves the image
    terms, _, _ = run("num_classes: 3 ignore_cross_boundary_bbox: true", torch.zeros(1, 12),
                      torch.zeros(1, 9), prior_blob(outside), label_blob(HAND_LABEL))
    assert terms.indices[0, 0].tolist() == [0, -2, -1]                    # A takes the object


def test_flt_min_clamp_keeps_the_softmax_gradient():
    conf = torch.zeros(1, 9)
    conf[0, 4] = 200.0                            # prior B: class-1 logit huge -> p(bg) underflows
    conf[0, 3] = 0.0
    conf[0, 5] = 0.0
    terms, _, dconf = hand("num_classes: 3 code_type: CENTER_SIZE mining_type: NONE", conf)
    conf[0, 4] = -200.0                           # now B's own class (1) underflows
    terms, _, dconf = hand("num_classes: 3 code_type: CENTER_SIZE mining_type: NONE", conf, dtype=torch.float32)
    flt_min_loss = -math.log(np.finfo(np.float32).tiny)                   # 87.336...
    assert terms.conf_sum.item() == pytest.approx(2 * LN3 + flt_min_loss, rel=1e-5)
    np.testing.assert_allclose(dconf.view(3, 3)[1].numpy(), [0.5, -1.0, 0.5], atol=1e-6)


def test_encode_variance_in_target_gradient_is_caffes():
    """Caffe divides prediction and target by the variance and copies d loss / d(pred / v) to
    mbox_loc unscaled: the gradient is smoothL1'(pred/v - t/v), not that times 1/v."""
    loc = torch.zeros(1, 12)
    loc[0, 4:8] = torch.tensor([-0.15, 0.0, 0.3, -0.3])
    layer = make("num_classes: 3 code_type: CENTER_SIZE encode_variance_in_target: true",
                 [(1, 12), (1, 9), (1, 2, 12), (1, 1, 1, 8)])
    loc = loc.double().requires_grad_()
    layer(loc, torch.zeros(1, 9, dtype=torch.float64), prior_blob(PRIORS), label_blob(HAND_LABEL)).backward()
    raw = torch.tensor([-0.2, -0.2, math.log(0.8), math.log(0.8)], dtype=torch.float64)   # no variance
    diff = (loc[0, 4:8].detach() - raw) / torch.tensor(VAR, dtype=torch.float64)
    expected = torch.where(diff.abs() < 1, diff, diff.sign())
    np.testing.assert_allclose(loc.grad[0, 4:8].numpy(), expected.numpy(), rtol=1e-5)


def test_logistic_targets_when_every_prior_is_used_are_misplaced_like_caffe():
    """EncodeConfPrediction advances by K, not K*C, per image: image 1's one-hot lands in image 0."""
    prior = prior_blob([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
    label = label_blob([[1, 1, 0, 0, 0, 0.5, 0.5, 0]])                   # image 1, prior 0, class 1
    conf = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)).double()
    terms, _, _ = run("num_classes: 2 conf_loss_type: LOGISTIC mining_type: NONE", torch.zeros(2, 8), conf,
                      prior, label)
    goal = torch.zeros(8, dtype=torch.float64)
    goal[1 * 2 + 0 * 2 + 1] = 1                                           # flat 3 = image 0, prior 1
    expected = torch.nn.functional.binary_cross_entropy_with_logits(conf.view(-1), goal, reduction="sum")
    assert terms.conf_sum.item() == pytest.approx(expected.item(), rel=1e-9)


def test_logistic_with_mining_uses_one_hot_rows():
    conf = torch.randn(1, 9, generator=torch.Generator().manual_seed(2)).double()
    terms, _, _ = hand("num_classes: 3 code_type: CENTER_SIZE conf_loss_type: LOGISTIC", conf)
    goal = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0]], dtype=torch.float64)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(conf.view(3, 3), goal, reduction="sum")
    assert terms.conf_sum.item() == pytest.approx(expected.item(), rel=1e-9)


def test_hard_example_mining_demotes_unselected_positives():
    conf = torch.zeros(1, 9)
    conf[0, 0] = -3.0                 # prior A: background loss 3.72, class-1 loss 0.72
    conf[0, 6] = -2.0                 # prior C: background loss 2.76; B: ln 3 = 1.10
    # A and B both positive (threshold 0.25): A 0.72 + loc 6.23 beats B 1.10 + loc 4.23
    terms, _, _ = hand("num_classes: 3 code_type: CENTER_SIZE overlap_threshold: 0.25 mining_type: HARD_EXAMPLE "
                       "sample_size: 1", conf)
    assert terms.indices[0, 0].tolist() == [0, -1, -1] and terms.num_matches.item() == 1
    assert not terms.negatives.any()
    # only B positive: B 5.33, A 3.72, C 2.76 -> B stays, A becomes the negative
    terms, _, _ = hand("num_classes: 3 code_type: CENTER_SIZE mining_type: HARD_EXAMPLE sample_size: 2", conf)
    assert terms.indices[0, 0].tolist() == [-1, 0, -1] and terms.negatives[0].tolist() == [True, False, False]


def test_mining_nms_without_top_k_selects_nothing():
    """MultiBoxLoss reads the unset nms_param.top_k as 0, so ApplyNMS returns no candidate."""
    terms, _, _ = hand("num_classes: 3 code_type: CENTER_SIZE nms_param { nms_threshold: 0.5 }")
    assert not terms.negatives.any() and terms.conf_sum.item() == pytest.approx(LN3)
    priors = PRIORS.clone()
    priors[2] = torch.tensor([0.1, 0.0, 0.6, 0.5])       # IoU 2/3 with A, 0.41 with the object
    for threshold, negatives in ((0.5, [True, False, False]), (0.7, [True, False, True])):
        terms, _, _ = run(f"num_classes: 3 code_type: CENTER_SIZE use_prior_for_nms: true "
                          f"nms_param {{ nms_threshold: {threshold} top_k: 5 }}", torch.zeros(1, 12),
                          torch.zeros(1, 9), prior_blob(priors), label_blob(HAND_LABEL))
        assert terms.negatives[0].tolist() == negatives


def test_map_object_to_agnostic_trains_class_one():
    terms, _, dconf = run("num_classes: 2 map_object_to_agnostic: true code_type: CENTER_SIZE",
                          torch.zeros(1, 12), torch.zeros(1, 6), prior_blob(PRIORS),
                          label_blob([[0, 7, 0, *OBJECT[0].tolist(), 0]]))
    np.testing.assert_allclose(dconf.view(3, 2)[1].numpy(), [0.5, -0.5])


def test_propagate_down_drops_a_term():
    full, _, _ = hand()
    loc_only, _, dconf = hand(extra="propagate_down: true propagate_down: false propagate_down: false "
                                    "propagate_down: false")
    assert loc_only.loss.item() == pytest.approx(full.loc_sum.item()) and (dconf == 0).all()
    conf_only, dloc, _ = hand(extra="propagate_down: false propagate_down: true propagate_down: false "
                                    "propagate_down: false")
    assert conf_only.loss.item() == pytest.approx(full.conf_sum.item()) and (dloc == 0).all()


def test_loc_weight_and_l2():
    base, _, _ = hand()
    terms, _, _ = hand("num_classes: 3 code_type: CENTER_SIZE loc_weight: 2.5 loc_loss_type: L2")
    l2 = sum(0.5 * t * t for t in B_TARGET)
    assert terms.loc_sum.item() == pytest.approx(l2, rel=1e-5)
    assert terms.loss.item() == pytest.approx(2.5 * l2 + base.conf_sum.item(), rel=1e-5)


SHAPES = [(2, 12), (2, 9), (1, 2, 12), (1, 1, 2, 8)]


@pytest.mark.parametrize("fields,extra,message", [
    ("", "", "num_classes"),
    ("num_classes: 3 share_location: false", "", "share_location"),
    ("num_classes: 3 do_neg_mining: false", "", "do_neg_mining"),
    ("num_classes: 3 background_label_id: 3", "", "background_label_id"),
    ("num_classes: 3 map_object_to_agnostic: true", "", "num_classes: 2"),
    ("num_classes: 3 mining_type: HARD_EXAMPLE sample_size: 0", "", "sample_size"),
    ("num_classes: 3", "propagate_down: true propagate_down: true propagate_down: true propagate_down: false",
     "prior or label"),
    ("num_classes: 4", "", "bottom 'conf'"),
])
def test_bad_configuration_is_refused(fields, extra, message):
    with pytest.raises(LayerError, match=message):
        make(fields, SHAPES, extra=extra)


def test_bad_labels_are_refused():
    layer = make("num_classes: 3", SHAPES)
    for rows, message in (([[0, 0, 0, 0, 0, 1, 1, 0]], "background label"),
                          ([[0, 3, 0, 0, 0, 1, 1, 0]], "outside")):
        with pytest.raises(LayerError, match=message):
            layer(torch.zeros(2, 12), torch.zeros(2, 9), prior_blob(PRIORS), label_blob(rows))


def test_shape_only_setup_and_scalar_top():
    layer = make("num_classes: 21", [(8, 34928), (8, 183372), (1, 2, 34928), (1, 1, -1, 8)], device="meta")
    assert layer.top_shapes == [()] and layer.num_priors == 8732


# ---------------------------------------------------------------------------------------------
# random batches: gradcheck, the per-image reference, real Caffe

def random_batch(seed, n=4, k=60, c=5, loc_classes=1, background=0, empty_image=True):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-0.1, 0.9, (k, 2))
    priors = np.concatenate([xy, xy + rng.uniform(0.05, 0.4, (k, 2))], 1)
    rows = []
    for i in range(n):
        if empty_image and i == 1:
            continue
        for _ in range(rng.integers(1, 5)):
            q, w = rng.uniform(0, 0.7, 2), rng.uniform(0.05, 0.3, 2)
            rows.append([i, rng.choice([x for x in range(c) if x != background]), 0, *q, *(q + w),
                         rng.integers(0, 2)])
    return [torch.tensor(rng.normal(0, 1, (n, 4 * k * loc_classes)), dtype=torch.float32),
            torch.tensor(rng.normal(0, 1, (n, c * k)), dtype=torch.float32),
            prior_blob(priors), label_blob(rows)]


GRADCHECK_CASES = ["code_type: CENTER_SIZE", "code_type: CORNER mining_type: NONE conf_loss_type: LOGISTIC",
                   "code_type: CORNER_SIZE mining_type: HARD_EXAMPLE sample_size: 8 loc_loss_type: L2",
                   "code_type: CENTER_SIZE use_prior_for_matching: false bp_inside: true"]


@pytest.mark.parametrize("fields", GRADCHECK_CASES)
def test_gradcheck_float64(fields):
    loc, conf, prior, label = random_batch(3, n=2, k=12, c=3)
    layer = make(f"num_classes: 3 {fields}", [tuple(loc.shape), tuple(conf.shape), tuple(prior.shape),
                                              tuple(label.shape)])
    inputs = (loc.double().requires_grad_(), conf.double().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b, prior, label), inputs, eps=1e-6, atol=1e-6,
                                    fast_mode=True)


REFERENCE_CASES = [
    dict(code_type="CENTER_SIZE"),
    dict(code_type="CORNER", mining_type="NONE", normalization="FULL"),
    dict(code_type="CORNER_SIZE", mining_type="HARD_EXAMPLE", sample_size=9, loc_loss_type="L2"),
    dict(code_type="CENTER_SIZE", conf_loss_type="LOGISTIC", use_prior_for_matching=False, match_type="BIPARTITE"),
    dict(code_type="CENTER_SIZE", ignore_cross_boundary_bbox=True, use_difficult_gt=False,
         normalization="BATCH_SIZE", loc_weight=2.0, neg_pos_ratio=1.5, neg_overlap=0.3),
    dict(code_type="CENTER_SIZE", background_label_id=2, overlap_threshold=0.3, normalization="NONE"),
    dict(code_type="CENTER_SIZE", encode_variance_in_target=True),
]


def _fields(options):
    return " ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()
                    if k != "normalization")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("options", REFERENCE_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_batched_equals_per_image_reference(options, seed):
    batch = random_batch(seed, background=options.get("background_label_id", 0))
    loss_param = f"loss_param {{ normalization: {options.get('normalization', 'VALID')} }}"
    terms, dloc, dconf = run(f"num_classes: 5 {_fields(options)}", *batch, loss_param)
    loc, conf = (t.double().requires_grad_() for t in batch[:2])
    expected = reference_loss(loc, conf, batch[2], batch[3], num_classes=5, **options)
    expected.backward()
    # with encode_variance_in_target the reference divides the float32 target by the variance
    # before casting to float64, Caffe (and we) after: a rounding apart
    assert terms.loss.item() == pytest.approx(expected.item(), rel=1e-7 if "encode_variance_in_target" in options
                                              else 1e-12)
    np.testing.assert_allclose(dconf.numpy(), conf.grad.numpy(), atol=1e-12)
    if not options.get("encode_variance_in_target"):        # Caffe's gradient quirk, pinned above
        np.testing.assert_allclose(dloc.numpy(), loc.grad.numpy(), atol=1e-12)


def caffe_multibox(oracle, cases):
    """Loss and the gradients w.r.t. loc and conf of each ``(layer text, bottoms)`` in Caffe.

    Scale layers (scale 1) in front of loc and conf make Caffe back-propagate to them without
    force_backward, which MultiBoxLoss would refuse for its prior and label bottoms."""
    files, names = {}, ["loc_in", "conf_in", "prior", "label"]
    for c, (text, bottoms) in enumerate(cases):
        net = ['name: "t"']
        for name, b in zip(names, bottoms):
            dims = " ".join(f"dim: {d}" for d in b.shape)
            net.append(f'layer {{ name: "in_{name}" type: "Input" top: "{name}" '
                       f'input_param {{ shape {{ {dims} }} }} }}')
            files[f"{name}{c}.npy"] = b.numpy()
        for x in ("loc", "conf"):
            net.append(f'layer {{ name: "s_{x}" type: "Scale" bottom: "{x}_in" top: "{x}" '
                       f'scale_param {{ filler {{ type: "constant" value: 1 }} }} }}')
        net.append("layer {\n" + text + "\n}")
        files[f"net{c}.prototxt"] = "\n".join(net)
    out = oracle.run(f"""
for c in range({len(cases)}):
    net = caffe.Net("net%d.prototxt" % c, caffe.TRAIN)
    for name in {names!r}:
        net.blobs[name].data[...] = np.load("%s%d.npy" % (name, c))
    net.forward()
    out["loss%d" % c] = net.blobs["loss"].data.copy()
    net.backward()
    out["dloc%d" % c] = net.blobs["loc"].diff.copy()
    out["dconf%d" % c] = net.blobs["conf"].diff.copy()
""", files)
    return [(out[f"loss{c}"], out[f"dloc{c}"], out[f"dconf{c}"]) for c in range(len(cases))]


ORACLE_CASES = [
    "code_type: CENTER_SIZE", "code_type: CORNER", "code_type: CORNER_SIZE mining_type: NONE",
    "code_type: CENTER_SIZE mining_type: HARD_EXAMPLE sample_size: 10",
    "code_type: CENTER_SIZE conf_loss_type: LOGISTIC",
    "code_type: CENTER_SIZE encode_variance_in_target: true",
    "code_type: CENTER_SIZE conf_loss_type: LOGISTIC mining_type: NONE background_label_id: 2",
    "code_type: CENTER_SIZE share_location: false mining_type: NONE",
    "code_type: CENTER_SIZE share_location: false use_prior_for_matching: false mining_type: NONE",
    "code_type: CENTER_SIZE use_prior_for_matching: false",
    "code_type: CENTER_SIZE ignore_cross_boundary_bbox: true bp_inside: true",
    "code_type: CORNER bp_inside: true use_prior_for_matching: false",
    "code_type: CORNER_SIZE encode_variance_in_target: true bp_inside: true use_prior_for_matching: false",
    "code_type: CENTER_SIZE match_type: BIPARTITE use_difficult_gt: false loc_loss_type: L2",
    "code_type: CENTER_SIZE nms_param { nms_threshold: 0.3 top_k: 40 }",
    "code_type: CENTER_SIZE nms_param { nms_threshold: 0.3 }",
    "code_type: CENTER_SIZE mining_type: HARD_EXAMPLE sample_size: 20 nms_param { nms_threshold: 0.5 top_k: 50 } "
    "use_prior_for_nms: true",
    "code_type: CENTER_SIZE mining_type: HARD_EXAMPLE sample_size: 7 loc_loss_type: L2 conf_loss_type: LOGISTIC",
    "code_type: CENTER_SIZE loc_weight: 2.5 neg_pos_ratio: 1.7 neg_overlap: 0.3 overlap_threshold: 0.3",
    "code_type: CENTER_SIZE background_label_id: 3 do_neg_mining: true",
    "code_type: CENTER_SIZE|loss_param { normalization: FULL }",
    "code_type: CENTER_SIZE|loss_param { normalization: BATCH_SIZE }",
    "code_type: CENTER_SIZE|loss_param { normalization: NONE }",
    "code_type: CENTER_SIZE|loss_param { normalize: false }",
    "code_type: CENTER_SIZE|propagate_down: true propagate_down: false propagate_down: false propagate_down: false",
    "code_type: CENTER_SIZE|propagate_down: false propagate_down: true propagate_down: false propagate_down: false",
]


def test_matches_caffe(oracle):
    cases, ours = [], []
    for i, spec in enumerate(ORACLE_CASES):
        fields, _, extra = spec.partition("|")
        background = int((re.findall(r"background_label_id: (\d+)", fields) or [0])[0])
        batch = random_batch(100 + i, background=background,
                             loc_classes=5 if "share_location: false" in fields else 1)
        cases.append((layer_text(f"num_classes: 5 {fields}", extra=extra), batch))
        ours.append(run(f"num_classes: 5 {fields}", *batch, extra=extra))
    theirs = caffe_multibox(oracle, cases)
    for (spec, (terms, dloc, dconf)), (loss, cdloc, cdconf) in zip_same(zip(ORACLE_CASES, ours), theirs, "cases"):
        assert terms.loss.item() == pytest.approx(float(loss), rel=2e-6), spec
        np.testing.assert_allclose(dloc.numpy(), cdloc, atol=2e-7, err_msg=spec)
        np.testing.assert_allclose(dconf.numpy(), cdconf, atol=2e-7, err_msg=spec)


def test_agnostic_matches_caffe(oracle):
    batch = random_batch(7, c=2)
    text = layer_text("num_classes: 2 map_object_to_agnostic: true code_type: CENTER_SIZE")
    (loss, cdloc, cdconf), = caffe_multibox(oracle, [(text, batch)])
    terms, dloc, dconf = run("num_classes: 2 map_object_to_agnostic: true code_type: CENTER_SIZE", *batch)
    assert terms.loss.item() == pytest.approx(float(loss), rel=2e-6)
    np.testing.assert_allclose(dconf.numpy(), cdconf, atol=2e-7)


# ---------------------------------------------------------------------------------------------
# host syncs: counted on tensors that stand for device memory

class _OnDevice(torch.Tensor):
    """A CPU tensor standing for device memory: results of torch functions on it are _OnDevice
    too, and every read of its values by the host (what waits for a GPU) is counted."""
    reads = 0
    HOST_READS = {"item", "tolist", "nonzero", "numpy", "cpu", "__bool__", "__int__", "__float__",
                  "__index__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in cls.HOST_READS:
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("fields, expected", [
    # the matches; mining: the largest negative count, and box.top_candidates' two checks
    # (a non-finite score among the candidates, a tie at the cut)
    ("code_type: CENTER_SIZE", 4),
    ("code_type: CORNER mining_type: NONE", 1),
    ("code_type: CENTER_SIZE use_prior_for_matching: false", 4),
])
@pytest.mark.parametrize("normalization", ["VALID", "FULL", "BATCH_SIZE", "NONE"])
def test_host_syncs_counted_and_a_host_label_saves_one(fields, expected, normalization):
    loc, conf, prior, label = random_batch(4, n=3, k=40, c=4)
    layer = make(f"num_classes: 4 {fields}", [tuple(loc.shape), tuple(conf.shape), tuple(prior.shape),
                                              tuple(label.shape)], f"loss_param {{ normalization: {normalization} }}")
    reference = layer.terms(loc, conf, prior, label)

    def reads(label_on_device):
        _OnDevice.reads = 0
        device = [t.as_subclass(_OnDevice) for t in (loc, conf, prior)]
        terms = layer.terms(*device, label.as_subclass(_OnDevice) if label_on_device else label)
        assert isinstance(terms.loss, _OnDevice)
        assert torch.equal(terms.loss.as_subclass(torch.Tensor), reference.loss)
        return _OnDevice.reads

    assert reads(label_on_device=False) == expected
    assert reads(label_on_device=True) == expected + 1      # the padded object count and checks


def test_the_net_hands_the_loss_its_host_label(monkeypatch):
    """On a net whose device is not the CPU (here 'meta'), the label a data layer made on the
    host reaches MultiBoxLoss as that host tensor; the other blobs are on the net's device."""
    from deeper_ssd.net import Net
    from support.tiny_ssd import tiny_net
    seen = {}

    def forward(self, loc, conf, prior, label):
        seen.update(loc=loc.device, label=label)
        return loc.sum() * 0
    monkeypatch.setattr(MultiBoxLoss, "forward", forward)
    from google.protobuf import text_format
    param = text_format.Parse(tiny_net("TRAIN", "/nonexistent", "/nonexistent", 2, True), caffe_pb2.NetParameter())
    net = Net(param, "TRAIN", device="meta")
    data = torch.zeros(net.blob_shapes["data"]).view(-1, *net.blob_shapes["data"][1:])
    label = label_blob([[0, 1, 0, 0.1, 0.1, 0.5, 0.5, 0]])
    net(data=data, label=label)
    assert seen["loc"].type == "meta" and seen["label"] is label
