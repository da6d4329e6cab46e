"""ComputeAP (Caffe's golden values, the float32 11-point detail) and the solver-side
accumulation of DetectionEvaluate rows over test iterations."""
import numpy as np
import pytest

from deeper_ssd.eval import DetectionAccumulator, compute_ap

# src/caffe/test/test_bbox_util.cpp: (score, tp) of 11 detections, num_pos 5
CAFFE = [(1.0, 0), (1.0, 1), (0.9, 1), (0.9, 0), (0.8, 1), (0.7, 0), (0.7, 1), (0.6, 0), (0.5, 0),
         (0.4, 0), (0.4, 1)]


def ap(pairs, num_pos, version):
    return compute_ap(pairs, num_pos, [(s, 1 - t) for s, t in pairs], version)


@pytest.mark.parametrize("version,every,first7", [("Integral", 0.558528, 0.467619),
                                                  ("MaxIntegral", 0.591861, 0.500952),
                                                  ("11point", 0.598662, 0.516017)])
def test_caffe_golden_values(version, every, first7):
    assert ap(CAFFE, 5, version)[0] == pytest.approx(every, abs=1e-6)
    assert ap(CAFFE[:7], 5, version)[0] == pytest.approx(first7, abs=1e-6)


def test_precision_recall_and_stable_tie_order():
    _, prec, rec = ap(CAFFE, 5, "Integral")
    assert prec.dtype == np.float32 and rec.dtype == np.float32
    np.testing.assert_allclose(prec, [0, 1 / 2, 2 / 3, 2 / 4, 3 / 5, 3 / 6, 4 / 7, 4 / 8, 4 / 9, 4 / 10, 5 / 11],
                               rtol=1e-6)
    np.testing.assert_allclose(rec, [0, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 0.8, 0.8, 1.0], rtol=1e-6)


def test_eleven_point_uses_float32_recall():
    """7 straight hits of 10 positives: float32(0.7) < 0.7, so Caffe gets 7/11, not 8/11."""
    assert ap([(1.0, 1)] * 7, 10, "11point")[0] == pytest.approx(7 / 11, abs=1e-7)
    assert ap([(1.0, 1)] * 9, 10, "11point")[0] == pytest.approx(9 / 11, abs=1e-7)   # 0.9 too
    assert ap([(1.0, 1)] * 8, 10, "11point")[0] == pytest.approx(9 / 11, abs=1e-7)   # 0.8 is fine


def test_degenerate_inputs():
    assert ap([], 5, "11point")[0] == 0
    assert ap([(0.5, 0)], 0, "MaxIntegral")[0] == 0
    with pytest.raises(ValueError, match="ap_version"):
        ap(CAFFE, 5, "VOC2012")
    with pytest.raises(ValueError, match="complementary"):
        compute_ap([(0.5, 1)], 1, [(0.5, 1)])
    with pytest.raises(ValueError, match="positives"):
        ap([(0.5, 1), (0.4, 1)], 1, "Integral")


def test_accumulation_over_iterations():
    acc = DetectionAccumulator()
    # iteration 1: counts for classes 1-3, class 1 detections (one matched a difficult object)
    acc.add(np.array([[[[-1, 1, 2, -1, -1], [-1, 2, 1, -1, -1], [-1, 3, 4, -1, -1],
                        [0, 1, 0.9, 1, 0], [0, 1, 0.8, 0, 0], [1, 1, 0.7, 0, 1]]]]))
    # iteration 2: more positives and detections
    acc.add([[-1, 1, 1, -1, -1], [-1, 2, 0, -1, -1], [-1, 3, 0, -1, -1],
             [0, 1, 0.95, 1, 0], [0, 2, 0.6, 1, 0]])
    assert acc.num_pos == {1: 3, 2: 1, 3: 4}
    assert acc.true_pos[1] == [(pytest.approx(0.9), 1), (pytest.approx(0.7), 0), (pytest.approx(0.95), 1)]
    result = acc.result("11point")
    # class 1: sorted 0.95 tp, 0.9 tp, 0.7 fp of 3 -> recall 2/3 at precision 1
    assert result.ap[1] == pytest.approx(ap([(0.9, 1), (0.7, 0), (0.95, 1)], 3, "11point")[0])
    assert result.ap[1] == pytest.approx(7 / 11, abs=1e-6)
    assert result.ap[2] == pytest.approx(1.0)
    assert result.ap[3] == 0 and result.missing == [3]        # never detected: 0, still counted
    assert result.mean_ap == pytest.approx((7 / 11 + 1 + 0) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="width 5"):
        acc.add(np.zeros((2, 7)))


def test_empty_accumulator():
    assert DetectionAccumulator().result().mean_ap == 0
