"""DetectionOutput's blocked NMS (deeper_ssd.box.greedy_nms, top_candidates and the layer's early
end for keep_top_k) against the first, one-candidate-at-a-time implementation
(tests/support/nms_reference.py) on many random cases: the same rows, bit for bit."""
import numpy as np
import pytest
import torch

from deeper_ssd import box
from deeper_ssd.layers.detection_output import DetectionOutput
from support.layers import layer_param
from support.nms_reference import detect as reference_detect, stepwise_nms, top_by_keys


def random_case(seed, n, k, c, loc_classes, ties):
    """Bottoms with clustered priors (much overlap) and scores drawn from a few values when ``ties``."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(k, 2, generator=gen) * 0.6 + 0.2
    size = torch.rand(k, 2, generator=gen) * 0.3 + 0.02
    priors = torch.cat([centre - size / 2, centre + size / 2], 1)
    variances = torch.tensor([0.1, 0.1, 0.2, 0.2]).expand(k, 4)
    prior = torch.stack([priors.reshape(-1), variances.reshape(-1)]).view(1, 2, -1)
    loc = torch.randn(n, 4 * k * loc_classes, generator=gen)
    logits = torch.randn(n, k, c, generator=gen) * 2
    if ties:
        logits = (logits * 2).round() / 2
    conf = torch.softmax(logits, -1)
    return loc, conf.reshape(n, -1), prior


CASES = [
    "code_type: CENTER_SIZE nms_param { nms_threshold: 0.45 top_k: 40 } keep_top_k: 20 confidence_threshold: 0.01",
    "code_type: CENTER_SIZE nms_param { nms_threshold: 0.45 top_k: 40 } keep_top_k: 300 confidence_threshold: 0.01",
    "code_type: CORNER nms_param { nms_threshold: 0.3 } confidence_threshold: 0.2",
    "code_type: CORNER_SIZE share_location: false nms_param { nms_threshold: 0.6 eta: 0.8 top_k: 30 } "
    "keep_top_k: 15 background_label_id: -1 confidence_threshold: 0.05",
    "code_type: CENTER_SIZE nms_param { nms_threshold: 0.7 eta: 0.9 } keep_top_k: 5",
    "code_type: CENTER_SIZE nms_param { nms_threshold: 0.0 top_k: 25 } keep_top_k: 12 background_label_id: 2",
    "code_type: CENTER_SIZE nms_param { nms_threshold: 1.0 top_k: 25 } keep_top_k: 0",
    "code_type: CENTER_SIZE nms_param { nms_threshold: 0.45 } keep_top_k: 7 confidence_threshold: 0.9999",
]


@pytest.mark.parametrize("fetch", [4, 64])
@pytest.mark.parametrize("index", range(len(CASES)))
def test_layer_equals_the_stepwise_reference(index, fetch, monkeypatch):
    monkeypatch.setattr(DetectionOutput, "FIRST_FETCH", fetch)
    fields = CASES[index]
    loc_classes = 5 if "share_location: false" in fields else 1
    for seed in range(6):
        n, k = 1 + seed % 3, 60 + 17 * seed
        bottoms = random_case(100 * index + seed, n, k, 5, loc_classes, ties=seed % 2 == 1)
        text = (f'name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" '
                f'top: "out" detection_output_param {{ num_classes: 5 {fields} }}')
        layer = DetectionOutput(layer_param(text), [tuple(b.shape) for b in bottoms])
        ours, theirs = layer(*bottoms), reference_detect(layer, *bottoms)
        assert ours.shape == theirs.shape, (fields, seed)
        assert torch.equal(ours, theirs), (fields, seed)


@pytest.mark.parametrize("thr,eta,block", [(0.45, 1.0, 64), (0.3, 1.0, 5), (0.7, 0.9, 7), (0.9, 0.5, 3),
                                           (0.0, 1.0, 16), (0.6, 0.95, 64)])
def test_greedy_nms_equals_the_stepwise_walk(thr, eta, block):
    gen = torch.Generator().manual_seed(int(thr * 100 + block))
    centre = torch.rand(7, 150, 2, generator=gen) * 0.5 + 0.25
    size = torch.rand(7, 150, 2, generator=gen) * 0.4 + 0.01
    boxes = torch.cat([centre - size / 2, centre + size / 2], -1)
    boxes[0, 10:20] = boxes[0, :10]                                        # exact duplicates
    boxes[1, :5, 2:] = boxes[1, :5, :2]                                    # empty boxes
    valid = torch.rand(7, 150, generator=gen) < 0.85
    valid[2] = False
    assert torch.equal(box.greedy_nms(boxes, valid, thr, eta, block=block), stepwise_nms(boxes, valid, thr, eta))


def test_greedy_nms_done_ends_the_walk_between_blocks():
    boxes = torch.tensor([[0.0, 0.0, 0.1, 0.1]]).repeat(1, 10, 1) + torch.arange(10.0).view(1, 10, 1) * 0.1
    calls = []
    keep = box.greedy_nms(boxes, torch.ones(1, 10, dtype=torch.bool), 0.5, block=3,
                          done=lambda keep, decided: calls.append(decided) or decided >= 6)
    assert calls == [3, 6] and keep[0].tolist() == [True] * 6 + [False] * 4


@pytest.mark.parametrize("count", [0, 1, 5, 9, 12])
def test_top_candidates_equals_full_keys_with_ties_and_nan(count):
    gen = np.random.default_rng(count)
    scores = torch.tensor(gen.integers(0, 4, (6, 12)) / 4, dtype=torch.float32)
    scores[0, 3] = -0.0
    scores[1, 2] = float("nan")
    scores[2] = float("-inf")
    for candidates in (scores > 0.2, 0.2, -1.0, gen.random((6, 12)) < 0.5):
        mask = scores > candidates if isinstance(candidates, float) else torch.as_tensor(candidates)
        ours = box.top_candidates(scores, torch.as_tensor(candidates) if not isinstance(candidates, float)
                                  else candidates, count)
        theirs = top_by_keys(scores, mask, count)
        assert torch.equal(ours[1], theirs[1]) and torch.equal(ours[0][ours[1]], theirs[0][theirs[1]])


def test_early_end_and_refetch_match_caffe(oracle, monkeypatch):
    """The same against real Caffe, with the first fetch cut to 4 candidates per class so that
    the early end and the second fetch both happen. Equal scores only where keep_top_k does
    not cut among them (Caffe orders those with an unstable sort)."""
    from support.layers import run_caffe_cases
    monkeypatch.setattr(DetectionOutput, "FIRST_FETCH", 4)
    chosen = [(CASES[0], False), (CASES[2], True), (CASES[3], False), (CASES[4], False), (CASES[5], False)]
    cases = []
    for index, (fields, ties) in enumerate(chosen):
        loc_classes = 5 if "share_location: false" in fields else 1
        bottoms = random_case(7 + index, 2, 300, 5, loc_classes, ties=ties)
        cases.append(dict(text=(f'name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" '
                                f'bottom: "prior" top: "out" detection_output_param {{ num_classes: 5 {fields} }}'),
                          bottoms=[b.numpy() for b in bottoms], force_backward=False))
    for case, theirs in zip(cases, run_caffe_cases(oracle, cases)):
        layer = DetectionOutput(layer_param(case["text"]), [b.shape for b in case["bottoms"]])
        ours = layer(*[torch.tensor(b) for b in case["bottoms"]]).numpy()
        assert ours.shape == theirs["tops"][0].shape, case["text"]
        np.testing.assert_allclose(ours, theirs["tops"][0], atol=1e-7, err_msg=case["text"])
