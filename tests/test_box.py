"""deeper_ssd.box: IoU, coding, matching, ranking, NMS and the original-image mapping, against
hand-computed values and against the literal per-image rules of tests/support/multibox.py."""
import math

import numpy as np
import pytest
import torch

from deeper_ssd import box
from deeper_ssd.proto import caffe_pb2
from support.multibox import HAND_IOU, OBJECT, PRIORS, decode_box, encode_box, iou_matrix, match_image

T = lambda *rows: torch.tensor(rows, dtype=torch.float32)  # noqa: E731


def test_iou_hand_values():
    np.testing.assert_allclose(box.pairwise_iou(PRIORS, OBJECT)[:, 0].numpy(), HAND_IOU, rtol=1e-6)
    np.testing.assert_allclose(box.pairwise_iou(OBJECT, PRIORS)[0].numpy(), HAND_IOU, rtol=1e-6)


def test_iou_edges_normalised_and_pixel():
    a, touching, apart = T([0, 0, 9, 9]), T([9, 0, 19, 9]), T([9.5, 0, 19, 9])
    assert box.pairwise_iou(a, touching).item() == 0                    # zero-width intersection
    # pixel mode: +1 per side, so touching boxes share one column: 1*10 / (100 + 110 - 10)
    assert box.pairwise_iou(a, touching, pixel=True).item() == pytest.approx(10 / 200)
    assert box.pairwise_iou(a, apart, pixel=True).item() == 0           # strictly disjoint
    inverted, empty = T([0.5, 0.5, 0.2, 0.9]), T([0.3, 0.3, 0.3, 0.3])
    assert box.box_area(inverted).item() == 0
    assert box.pairwise_iou(inverted, T([0, 0, 1, 1])).item() == 0
    assert box.pairwise_iou(empty, empty).item() == 0                   # 0/0 -> 0, no NaN
    assert box.box_area(T([0, 0, 9, 4]), pixel=True).item() == 50


def test_iou_uses_given_cached_areas():
    a, b = T([0, 0, 10, 10]), T([0, 0, 5, 10])
    iou = box.pairwise_iou(a, b, pixel=True, area_a=torch.tensor([100.0]), area_b=torch.tensor([50.0]))
    assert iou.item() == pytest.approx(66 / (150 - 66))


def test_iou_broadcasts_and_float64():
    a = torch.rand(3, 5, 4, dtype=torch.float64)
    a[..., 2:] += a[..., :2]
    b = torch.rand(3, 2, 4, dtype=torch.float64)
    b[..., 2:] += b[..., :2]
    out = box.pairwise_iou(a, b)
    assert out.shape == (3, 5, 2) and out.dtype == torch.float64
    np.testing.assert_allclose(out[1].numpy(), iou_matrix(a[1], b[1]).numpy(), rtol=1e-12)


def test_encode_hand_values():
    var = torch.tensor([0.1, 0.1, 0.2, 0.2])
    prior, obj = PRIORS[1], OBJECT[0]
    # centre offsets (0.4 - 0.5) / 0.5 / 0.1 = -2, log size ratio ln(0.4 / 0.5) / 0.2
    np.testing.assert_allclose(box.encode(prior, var, obj, box.CENTER_SIZE, False).numpy(),
                               [-2, -2, math.log(0.8) / 0.2, math.log(0.8) / 0.2], rtol=1e-5)
    np.testing.assert_allclose(box.encode(prior, var, obj, box.CENTER_SIZE, True).numpy(),
                               [-0.2, -0.2, math.log(0.8), math.log(0.8)], rtol=1e-5)
    np.testing.assert_allclose(box.encode(prior, var, obj, box.CORNER, False).numpy(),
                               [-0.5, -0.5, -0.75, -0.75], rtol=1e-5)
    np.testing.assert_allclose(box.encode(prior, var, obj, box.CORNER_SIZE, False).numpy(),
                               [-1, -1, -1.5, -1.5], rtol=1e-5)


@pytest.mark.parametrize("code", [box.CORNER, box.CENTER_SIZE, box.CORNER_SIZE])
@pytest.mark.parametrize("in_target", [False, True])
def test_encode_decode_round_trip_and_reference(code, in_target):
    gen = torch.Generator().manual_seed(code)
    priors = torch.rand(50, 4, generator=gen) * 0.5
    priors[:, 2:] += priors[:, :2] + 0.05
    objects = torch.rand(50, 4, generator=gen) * 0.5
    objects[:, 2:] += objects[:, :2] + 0.05
    var = torch.tensor([0.1, 0.1, 0.2, 0.2]).expand(50, 4)
    name = box.CODE_NAMES[code]
    target = box.encode(priors, var, objects, code, in_target)
    np.testing.assert_allclose(target.numpy(), encode_box(priors, var, objects, name, in_target).numpy(), rtol=1e-5)
    back = box.decode(priors, var, target, code, in_target)
    np.testing.assert_allclose(back.numpy(), objects.numpy(), atol=2e-6)
    loc = torch.randn(50, 4, generator=gen)
    np.testing.assert_allclose(box.decode(priors, var, loc, code, in_target).numpy(),
                               decode_box(priors, var, loc, name, in_target).numpy(), rtol=1e-5, atol=1e-6)


def test_decode_does_not_clip():
    out = box.decode(T([0.9, 0.9, 1.0, 1.0]), T([0.1, 0.1, 0.2, 0.2]), T([5, 5, 0, 0]), box.CENTER_SIZE, False)
    assert out[0, 2] > 1


def test_cross_boundary():
    assert box.is_cross_boundary(T([-0.01, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1.01])).tolist() == [True, False, True]


def _match(iou_gk, thr=0.5, per_prediction=True, valid=None, ignored=None):
    idx, ov = box.match(iou_gk.unsqueeze(0), None if valid is None else valid.unsqueeze(0),
                        None if ignored is None else ignored.unsqueeze(0), thr, per_prediction)
    return idx[0].tolist(), ov[0].tolist()


def test_match_hand_case():
    iou = box.pairwise_iou(OBJECT, PRIORS)                                   # [1, 3]
    idx, ov = _match(iou)
    assert idx == [-1, 0, -1]                                                # B by bipartite
    assert ov == pytest.approx(HAND_IOU, rel=1e-6)                           # unmatched keep best IoU
    assert _match(iou, thr=0.25)[0] == [0, 0, -1]                            # A by threshold
    assert _match(iou, thr=0.25, per_prediction=False)[0] == [-1, 0, -1]     # BIPARTITE only


def test_match_bipartite_takes_the_global_maximum_first():
    iou = T([0.6, 0.5, 0.0],      # object 0: best prior 0
            [0.7, 0.0, 0.1])      # object 1 also wants prior 0, more
    idx, ov = _match(iou, thr=0.9)
    assert idx == [1, 0, -1]
    assert ov == pytest.approx([0.7, 0.5, 0.1])


def test_match_ties_and_threshold_equality():
    iou = T([0.3, 0.3, 0.0],      # equal IoU on two priors: the lower index wins
            [0.3, 0.0, 0.0])      # equal IoU of two objects on prior 0: the lower object wins
    assert _match(iou, thr=0.9)[0] == [0, -1, -1]
    half = box.pairwise_iou(T([0, 0, 1, 0.5]), T([0, 0, 1, 1], [0, 0, 1, 1]))    # exactly 0.5
    assert half[0, 0].item() == 0.5
    assert _match(half, thr=0.5)[0] == [0, 0]                                # >= threshold
    tiny = T([1e-6, 2e-6])                                                   # only IoU > 1e-6 exists
    assert _match(tiny, thr=0.0)[0] == [-1, 0]


def test_match_ignored_and_invalid():
    iou = T([0.9, 0.8, 0.0], [0.0, 0.0, 0.7])
    idx, ov = _match(iou, ignored=torch.tensor([True, False, False]))
    assert idx == [-2, 0, 1] and ov[0] == 0
    idx, _ = _match(iou, valid=torch.tensor([True, False]))
    assert idx == [0, 0, -1]


def _random_boxes(gen, n, low=0.02, high=0.5):
    xy = torch.rand(n, 2, generator=gen) * 0.8
    wh = low + torch.rand(n, 2, generator=gen) * (high - low)
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("seed", range(6))
def test_match_equals_literal_rules_on_tied_grids(seed):
    """Grid priors repeat the same shapes, so many IoUs tie exactly (e.g. a small object inside
    several equal priors); the batched matcher must break every tie like the literal rules."""
    gen = torch.Generator().manual_seed(seed)
    centres = (torch.arange(6) + 0.5) / 6
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    shapes = torch.tensor([[0.2, 0.2], [0.35, 0.35], [0.3, 0.15], [0.15, 0.3]])
    c = torch.stack([cx.flatten(), cy.flatten()], 1).repeat_interleave(len(shapes), 0)
    s = shapes.repeat(36, 1) / 2
    priors = torch.cat([c - s, c + s], 1)
    batch, valid, ignored = [], [], []
    for image in range(4):
        g = int(torch.randint(1, 9, (1,), generator=gen))
        objects = torch.cat([_random_boxes(gen, g), _random_boxes(gen, 2, 0.01, 0.03)])  # tiny ones tie
        batch.append(torch.cat([objects, torch.zeros(12 - len(objects), 4)]))
        valid.append(torch.arange(12) < len(objects))
        ignored.append(box.is_cross_boundary(priors) if image % 2 else torch.zeros(len(priors), dtype=torch.bool))
    objects, valid, ignored = torch.stack(batch), torch.stack(valid), torch.stack(ignored)
    iou = box.pairwise_iou(objects, priors)
    for thr in (0.5, 0.2):
        idx, ov = box.match(iou, valid, ignored, thr, True)
        for image in range(4):
            g = int(valid[image].sum())
            ref_idx, ref_ov = match_image(iou_matrix(priors, objects[image, :g]), thr, True, ignored[image])
            assert idx[image].tolist() == ref_idx.tolist()
            np.testing.assert_array_equal(ov[image].numpy(), ref_ov.numpy())


def test_match_more_objects_than_priors():
    iou = torch.rand(1, 5, 3)
    idx, _ = box.match(iou, None, None, 0.5, False)
    assert sorted(idx[0].tolist()) == sorted(set(idx[0].tolist()))             # one object per prior
    assert min(idx[0].tolist()) >= 0


def test_top_candidates_and_select_top_ties():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -1.0, -0.0, 0.0, -2.0]])
    order, valid = box.top_candidates(scores, torch.ones_like(scores, dtype=torch.bool), 9)
    assert order[0].tolist() == [1, 2, 4, 3, 0, 6, 7, 5, 8] and valid.all()      # stable, -0 == +0
    order, valid = box.top_candidates(scores, scores > 1.5, 5)
    assert order[0, :4].tolist() == [1, 2, 4, 3] and valid[0].tolist() == [True] * 4 + [False]
    scores = scores[:, :5]
    chosen = box.select_top(scores.view(1, -1), torch.tensor([[True, True, False, True, True]]),
                            torch.tensor([2]))
    assert chosen[0].tolist() == [False, True, False, False, True]
    assert not box.select_top(scores.view(1, -1), torch.ones(1, 5, dtype=torch.bool), torch.tensor([0])).any()


def _literal_nms(boxes, valid, thr, eta):
    """ApplyNMSFast's loop (docs/semantics.md, "DetectionOutput and NMS") on candidates already sorted by score."""
    keep, adaptive = [], thr
    for i in range(len(boxes)):
        if not valid[i]:
            continue
        if all(iou_matrix(boxes[i:i + 1], boxes[q:q + 1]).item() <= adaptive for q in keep):
            keep.append(i)
            if eta < 1 and adaptive > 0.5:
                adaptive *= eta
    return keep


@pytest.mark.parametrize("thr,eta", [(0.45, 1.0), (0.3, 1.0), (0.7, 0.9), (0.9, 0.5)])
def test_greedy_nms_equals_literal_loop(thr, eta):
    gen = torch.Generator().manual_seed(int(thr * 100))
    boxes = torch.stack([_random_boxes(gen, 60, 0.1, 0.4) for _ in range(5)])
    valid = torch.rand(5, 60, generator=gen) < 0.8
    keep = box.greedy_nms(boxes, valid, thr, eta)
    for b in range(5):
        assert keep[b].nonzero().flatten().tolist() == _literal_nms(boxes[b], valid[b], thr, eta)


def test_greedy_nms_keeps_iou_equal_to_threshold_and_adapts():
    boxes = T([0, 0, 1, 1], [0, 0, 1, 0.5], [0, 0, 1, 0.45]).unsqueeze(0)     # IoU with first: 0.5, 0.45
    valid = torch.ones(1, 3, dtype=torch.bool)
    assert box.greedy_nms(boxes, valid, 0.5)[0].tolist() == [True, True, False]   # 0.5 <= 0.5 kept
    # eta: after the first kept box the threshold 0.6 becomes 0.48 < 0.5 -> the 0.5 box is dropped
    assert box.greedy_nms(boxes, valid, 0.6, eta=0.8)[0].tolist() == [True, False, True]


def _resize(**fields):
    param = caffe_pb2.ResizeParameter()
    for key, value in fields.items():
        setattr(param, key, value)
    return param


def test_to_image_pixels_warp_and_default():
    boxes = T([-0.1, 0.2, 0.5, 1.2])
    for resize in (None, _resize(resize_mode=caffe_pb2.ResizeParameter.WARP)):
        out, area = box.to_image_pixels(boxes, 200, 100, resize)
        np.testing.assert_allclose(out[0].numpy(), [0, 40, 50, 200])
        assert area.item() == pytest.approx(51 * 161)                       # VOC (w+1)(h+1)


def test_to_image_pixels_fit_large_size_and_pad():
    # 200 wide x 100 high into 300x300: the image fills rows 75..225, padding 75 above and below
    resize = _resize(resize_mode=caffe_pb2.ResizeParameter.FIT_LARGE_SIZE_AND_PAD, height=300, width=300)
    out, _ = box.to_image_pixels(T([0.5, 0.25, 1.0, 0.5]), 100, 200, resize)
    np.testing.assert_allclose(out[0].numpy(), [100, 0, 200, 50], atol=1e-4)
    outside, _ = box.to_image_pixels(T([0.1, 0.0, 0.2, 0.2]), 100, 200, resize)   # in the padding only
    np.testing.assert_allclose(outside[0].numpy(), [20, 0, 40, 20], atol=1e-4)       # left as is


def test_to_image_pixels_fit_small_size_with_scales():
    resize = _resize(resize_mode=caffe_pb2.ResizeParameter.FIT_SMALL_SIZE, height_scale=50, width_scale=80)
    out, area = box.to_image_pixels(T([0.5, 0.5, 2.0, 1.0]), 40, 100, resize)
    np.testing.assert_allclose(out[0].numpy(), [40, 25, 100, 40])                  # clipped to 100 x 40
    assert area.item() == pytest.approx(60 * 15)                                # no +1 after this clip
