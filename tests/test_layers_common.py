"""Element-wise, shape and normalisation layers: hand-computed Caffe quirks and, when the oracle
is present, forward + backward parity with real Caffe for every option combination below."""
import numpy as np
import pytest

from deeper_ssd.layers import LayerError
from deeper_ssd.proto import caffe_pb2
from support import zip_same
from support.layers import build, run_caffe_cases, run_ours


def test_normalize_puts_eps_inside_the_sqrt():
    text = ('name: "n" type: "Normalize" bottom: "x" top: "y" norm_param { across_spatial: false '
            'channel_shared: false eps: 0.5 }')
    x = np.array([3.0, 4.0]).reshape(1, 2, 1, 1)
    y = run_ours(text, [x], blobs=[np.array([1.0, 2.0])])["tops"][0]
    norm = np.sqrt(9 + 16 + 0.5)                       # not sqrt(25) + 0.5
    np.testing.assert_allclose(y.ravel(), [3 / norm, 2 * 4 / norm])
    across = run_ours('name: "n" type: "Normalize" bottom: "x" top: "y" norm_param { eps: 0.5 }',
                      [np.ones((2, 2, 2, 2))], blobs=[np.array(3.0)])["tops"][0]
    np.testing.assert_allclose(across, 3 / np.sqrt(8 + 0.5))


def test_normalize_blob_shapes_and_default_scale():
    shared = build('name: "n" type: "Normalize" bottom: "x" top: "y"', [(1, 5, 3, 3)])
    per_channel = build('name: "n" type: "Normalize" bottom: "x" top: "y" norm_param { channel_shared: false }',
                        [(1, 5, 3, 3)])
    assert tuple(shared.blobs[0].shape) == () and tuple(per_channel.blobs[0].shape) == (5,)
    assert per_channel.blob_fillers[0].value == 1.0


def test_reshape_copy_infer_and_axes():
    rs = lambda dims, extra="": f'name: "r" type: "Reshape" bottom: "x" top: "y" reshape_param {{ shape {{ {" ".join(f"dim: {d}" for d in dims)} }} {extra} }}'
    assert build(rs([0, -1, 21]), [(2, 183372)]).top_shapes == [(2, 8732, 21)]
    assert build(rs([2, 3], "axis: 1 num_axes: 1"), [(4, 6, 5)]).top_shapes == [(4, 2, 3, 5)]
    assert build(rs([-1], "axis: -1"), [(4, 6)]).top_shapes == [(4, 6, 1)]
    with pytest.raises(LayerError, match="more than one -1"):
        build(rs([-1, -1]), [(4, 6)])
    with pytest.raises(LayerError, match="does not hold"):
        build(rs([5, 5]), [(4, 6)])


def test_permute_flatten_softmax_shapes():
    assert build('name: "p" type: "Permute" bottom: "x" top: "y" permute_param { order: 0 order: 2 order: 3 order: 1 }',
                 [(1, 16, 38, 38)]).top_shapes == [(1, 38, 38, 16)]
    assert build('name: "p" type: "Permute" bottom: "x" top: "y" permute_param { order: 0 order: 2 }',
                 [(1, 2, 3, 4)]).top_shapes == [(1, 3, 2, 4)]        # unlisted axes follow
    with pytest.raises(LayerError, match="repeats an axis"):
        build('name: "p" type: "Permute" bottom: "x" top: "y" permute_param { order: 1 order: 1 }', [(1, 2)])
    assert build('name: "f" type: "Flatten" bottom: "x" top: "y"', [(1, 38, 38, 16)]).top_shapes == [(1, 23104)]
    assert build('name: "f" type: "Flatten" bottom: "x" top: "y" flatten_param { axis: 1 end_axis: 2 }',
                 [(2, 3, 4, 5)]).top_shapes == [(2, 12, 5)]


def test_concat_and_eltwise_refuse_mismatched_bottoms_naming_them():
    cat = 'name: "mbox_loc" type: "Concat" bottom: "a" bottom: "b" top: "y"'
    assert build(cat, [(1, 4, 5, 5), (1, 6, 5, 5)]).top_shapes == [(1, 10, 5, 5)]
    with pytest.raises(LayerError) as info:
        build(cat, [(1, 4, 5, 5), (1, 6, 4, 5)])
    message = str(info.value)
    assert "layer 'mbox_loc' (Concat)" in message and "'a' 1x4x5x5" in message and "'b' 1x6x4x5" in message
    elt = 'name: "fuse" type: "Eltwise" bottom: "a" bottom: "b" top: "y"'
    with pytest.raises(LayerError, match=r"layer 'fuse' \(Eltwise\): bottoms must have equal shapes: 'a' 1x4x5x5, 'b' 1x4x6x6"):
        build(elt, [(1, 4, 5, 5), (1, 4, 6, 6)])
    with pytest.raises(LayerError, match="coeff has 1 values for 2 bottoms"):
        build('name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "y" eltwise_param { coeff: 2 }',
              [(1, 2), (1, 2)])


def test_batchnorm_running_statistics_follow_caffe():
    text = 'name: "bn" type: "BatchNorm" bottom: "x" top: "y" batch_norm_param { moving_average_fraction: 0.5 }'
    x = np.arange(8, dtype=np.float64).reshape(2, 2, 2, 1)    # m = N*H*W = 4 per channel
    result = run_ours(text, [x], blobs=[np.zeros(2), np.zeros(2), np.zeros(1)], phase=caffe_pb2.TRAIN)
    mean_sum, var_sum, weight = result["blobs_after"]
    channel0 = x[:, 0].ravel()
    np.testing.assert_allclose(weight, [1.0])                                     # 0.5 * 0 + 1
    np.testing.assert_allclose(mean_sum[0], channel0.mean())
    np.testing.assert_allclose(var_sum[0], channel0.var() * 4 / 3)                 # unbiased in the blob
    np.testing.assert_allclose(result["tops"][0][:, 0].ravel(),
                               (channel0 - channel0.mean()) / np.sqrt(channel0.var() + 1e-5))
    test_out = run_ours(text, [x], blobs=[np.array([2.0, 4.0]), np.array([8.0, 8.0]), np.array([2.0])])
    np.testing.assert_allclose(test_out["tops"][0][:, 1], (x[:, 1] - 2.0) / np.sqrt(4.0 + 1e-5))


def test_dropout_is_identity_at_test():
    x = np.random.default_rng(0).standard_normal((2, 3))
    y = run_ours('name: "d" type: "Dropout" bottom: "x" top: "y"', [x])["tops"][0]
    np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------- real Caffe parity

def _cases(rng):
    r = lambda *shape: rng.standard_normal(shape)
    return [
        ('name: "l" type: "ReLU" bottom: "x" top: "y" relu_param { negative_slope: 0.1 }', [r(2, 3, 4, 4)], []),
        ('name: "l" type: "ReLU" bottom: "x" top: "y"', [r(2, 3, 4, 4)], []),
        ('name: "l" type: "Sigmoid" bottom: "x" top: "y"', [r(2, 5)], []),
        ('name: "l" type: "TanH" bottom: "x" top: "y"', [r(2, 5)], []),
        ('name: "l" type: "Concat" bottom: "a" bottom: "b" bottom: "c" top: "y" concat_param { axis: 2 }',
         [r(1, 2, 3), r(1, 2, 5), r(1, 2, 1)], []),
        ('name: "l" type: "Concat" bottom: "a" bottom: "b" top: "y" concat_param { concat_dim: 1 }',
         [r(2, 3, 2), r(2, 1, 2)], []),
        ('name: "l" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "y" eltwise_param { coeff: 1 coeff: -2 coeff: 0.5 }',
         [r(2, 3), r(2, 3), r(2, 3)], []),
        ('name: "l" type: "Eltwise" bottom: "a" bottom: "b" top: "y" eltwise_param { operation: PROD }', [r(2, 3), r(2, 3)], []),
        ('name: "l" type: "Eltwise" bottom: "a" bottom: "b" top: "y" eltwise_param { operation: MAX }', [r(2, 3), r(2, 3)], []),
        ('name: "l" type: "Permute" bottom: "x" top: "y" permute_param { order: 0 order: 2 order: 3 order: 1 }', [r(2, 3, 4, 5)], []),
        ('name: "l" type: "Flatten" bottom: "x" top: "y" flatten_param { axis: 1 end_axis: 2 }', [r(2, 3, 4, 5)], []),
        ('name: "l" type: "Reshape" bottom: "x" top: "y" reshape_param { shape { dim: 0 dim: -1 dim: 3 } }', [r(2, 6, 2)], []),
        ('name: "l" type: "Softmax" bottom: "x" top: "y" softmax_param { axis: 2 }', [r(2, 4, 3)], []),
        ('name: "l" type: "Softmax" bottom: "x" top: "y"', [r(2, 4, 3, 2)], []),
        ('name: "l" type: "Normalize" bottom: "x" top: "y" norm_param { across_spatial: false channel_shared: false }',
         [r(2, 4, 3, 3)], [r(4)]),
        ('name: "l" type: "Normalize" bottom: "x" top: "y" norm_param { across_spatial: true channel_shared: true }',
         [r(2, 4, 3, 3)], [np.array(1.7)]),
        ('name: "l" type: "Normalize" bottom: "x" top: "y" norm_param { across_spatial: false channel_shared: true eps: 0.01 }',
         [r(2, 4, 3, 3)], [np.array(-0.6)]),
        ('name: "l" type: "Normalize" bottom: "x" top: "y" norm_param { across_spatial: true channel_shared: false }',
         [r(2, 4, 3, 3)], [r(4)]),
        ('name: "l" type: "Scale" bottom: "x" top: "y" scale_param { bias_term: true }', [r(2, 3, 4, 4)], [r(3), r(3)]),
        ('name: "l" type: "Scale" bottom: "x" bottom: "s" top: "y" scale_param { axis: 0 }', [r(2, 3, 4), r(2, 3)], []),
        ('name: "l" type: "Scale" bottom: "x" top: "y" scale_param { axis: 1 num_axes: 2 }', [r(2, 3, 4)], [r(3, 4)]),
        ('name: "l" type: "Bias" bottom: "x" top: "y"', [r(2, 3, 4, 4)], [r(3)]),
        ('name: "l" type: "Bias" bottom: "x" bottom: "b" top: "y" bias_param { axis: 1 }', [r(2, 3, 4), r(3, 4)], []),
        ('name: "l" type: "Split" bottom: "x" top: "y" top: "z"', [r(2, 3)], []),
        ('name: "l" type: "Dropout" bottom: "x" top: "y" dropout_param { dropout_ratio: 0.3 }', [r(2, 3)], []),
    ]


def test_common_layers_match_caffe(oracle):
    rng = np.random.default_rng(7)
    cases = []
    for text, bottoms, blobs in _cases(rng):
        tops = run_ours(text, bottoms, blobs)["tops"]
        cases.append(dict(text=text, bottoms=bottoms, blobs=blobs, top_grads=[rng.standard_normal(t.shape) for t in tops]))
    for case, theirs in zip(cases, run_caffe_cases(oracle, cases)):
        ours = run_ours(case["text"], case["bottoms"], case["blobs"], case["top_grads"])
        for key in ("tops", "bottom_grads", "blob_grads"):
            for a, b in zip_same(ours[key], theirs[key], f"{key}: {case['text']}"):
                np.testing.assert_allclose(a, b.reshape(a.shape), rtol=2e-4, atol=2e-5, err_msg=f"{key}: {case['text']}")


def test_batchnorm_matches_caffe_in_both_phases(oracle):
    rng = np.random.default_rng(8)
    text = 'name: "l" type: "BatchNorm" bottom: "x" top: "y"'
    x = rng.standard_normal((4, 3, 5, 5))
    stats = [rng.random(3), rng.random(3) + 1, np.array([3.0])]
    grads = [rng.standard_normal(x.shape)]
    cases = [dict(text=text, bottoms=[x], blobs=stats, top_grads=grads, phase=phase) for phase in ("TRAIN", "TEST")]
    for case, theirs, phase in zip(cases, run_caffe_cases(oracle, cases), (caffe_pb2.TRAIN, caffe_pb2.TEST)):
        ours = run_ours(text, [x], stats, grads, phase=phase)
        for key in ("tops", "blobs_after", "bottom_grads"):
            for a, b in zip_same(ours[key], theirs[key], f"{key} {phase}"):
                np.testing.assert_allclose(a, b.reshape(a.shape), rtol=1e-4, atol=1e-4, err_msg=f"{key} {phase}")
