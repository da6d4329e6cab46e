"""Convolution, Deconvolution, Pooling and Crop: Caffe's shape rules and values (hand-computed
quirks everywhere; real Caffe parity when the oracle is present)."""
import numpy as np
import pytest

from deeper_ssd.layers import LayerError
from deeper_ssd.layers.vision import pool_output_size
from support import zip_same
from support.layers import build, run_caffe, run_caffe_cases, run_ours


def pool(kernel, stride, pad=0, method="MAX"):
    return (f'name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param {{ pool: {method} '
            f'kernel_size: {kernel} stride: {stride} pad: {pad} }}')


@pytest.mark.parametrize("size,kernel,stride,pad,expected", [
    (300, 2, 2, 0, 150), (150, 2, 2, 0, 75), (75, 2, 2, 0, 38),   # VGG pool3: ceil, not 37
    (38, 2, 2, 0, 19), (19, 3, 1, 1, 19),                         # pool5 3x3/1/1 keeps 19
    (5, 2, 2, 1, 3),      # last window would start in the padding only: 4 -> 3
    (6, 3, 2, 1, 4),      # no clipping needed
    (6, 1, 4, 0, 3),      # pad 0: Caffe keeps the empty last window (torch would give 2)
])
def test_pool_output_size(size, kernel, stride, pad, expected):
    assert pool_output_size(size, kernel, stride, pad) == expected
    layer = build(pool(kernel, stride, pad), [(1, 1, size, size)])
    assert layer.top_shapes == [(1, 1, expected, expected)]


def test_ave_divisor_counts_padding_but_not_ceil_overhang():
    x = np.arange(1, 17, dtype=np.float64).reshape(1, 1, 4, 4)
    y = run_ours(pool(3, 2, 1, "AVE"), [x])["tops"][0]
    assert y.shape == (1, 1, 3, 3)
    # window rows/cols [-1, 2): 4 valid cells, the padding row/column counts -> divisor 9
    assert y[0, 0, 0, 0] == pytest.approx((1 + 2 + 5 + 6) / 9)
    # window [1, 4) x [1, 4): fully inside -> divisor 9
    assert y[0, 0, 1, 1] == pytest.approx(sum([6, 7, 8, 10, 11, 12, 14, 15, 16]) / 9)
    # window [3, 6): cell 4 is padding (counts), cell 5 is ceil overhang (does not) -> 2x2 = 4
    assert y[0, 0, 2, 2] == pytest.approx(16 / 4)
    # 5x5 input, 2x2/2/0: ceil adds a window [4, 6) that overhangs; divisor 1x2 = min(6, 5) - 4 = 1
    x5 = np.ones((1, 1, 5, 5))
    y5 = run_ours(pool(2, 2, 0, "AVE"), [x5])["tops"][0]
    assert y5.shape == (1, 1, 3, 3)
    assert y5[0, 0, 2, 2] == pytest.approx(1.0) and y5[0, 0, 0, 0] == pytest.approx(1.0)


def test_empty_last_window_without_padding():
    x = np.arange(36, dtype=np.float64).reshape(1, 1, 6, 6)
    out = run_ours(pool(1, 4, 0, "MAX"), [x])["tops"][0]
    assert out.shape == (1, 1, 3, 3)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 1, 1] == x[0, 0, 4, 4]
    assert out[0, 0, 2, 0] == -np.finfo(np.float32).max       # Caffe: -FLT_MAX stays


def test_pooling_parameter_errors():
    with pytest.raises(LayerError, match="pad .* must be smaller than the kernel"):
        build(pool(2, 2, 2), [(1, 1, 8, 8)])
    with pytest.raises(LayerError, match="STOCHASTIC is not supported"):
        build('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: STOCHASTIC kernel_size: 2 }',
              [(1, 1, 8, 8)])
    with pytest.raises(LayerError, match="kernel size cannot be given"):
        build('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { global_pooling: true kernel_size: 2 }',
              [(1, 1, 8, 8)])
    glob = build('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: AVE global_pooling: true }',
                 [(2, 3, 5, 7)])
    assert glob.top_shapes == [(2, 3, 1, 1)]


def conv(extra, kind="Convolution"):
    return f'name: "c" type: "{kind}" bottom: "x" top: "y" convolution_param {{ {extra} }}'


@pytest.mark.parametrize("extra,bottom,top,weight", [
    ("num_output: 1024 kernel_size: 3 pad: 6 dilation: 6", (1, 512, 19, 19), (1, 1024, 19, 19), (1024, 512, 3, 3)),
    ("num_output: 8 kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0", (2, 4, 9, 9), (2, 8, 5, 9), (8, 4, 3, 1)),
    ("num_output: 6 kernel_size: 3 stride: 2 group: 2", (1, 4, 16, 16), (1, 6, 7, 7), (6, 2, 3, 3)),
    ("num_output: 4 kernel_size: 3 kernel_size: 1 pad: 1 pad: 0", (1, 2, 10, 10), (1, 4, 10, 10), (4, 2, 3, 1)),
])
def test_convolution_shapes(extra, bottom, top, weight):
    layer = build(conv(extra), [bottom])
    assert layer.top_shapes == [top] and tuple(layer.blobs[0].shape) == weight


@pytest.mark.parametrize("extra,bottom,top,weight", [
    ("num_output: 8 kernel_size: 2 stride: 2", (1, 4, 16, 16), (1, 8, 32, 32), (4, 8, 2, 2)),
    ("num_output: 8 kernel_size: 3 stride: 3", (1, 4, 16, 16), (1, 8, 48, 48), (4, 8, 3, 3)),
    ("num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 2", (1, 4, 8, 8), (1, 4, 16, 16), (4, 2, 4, 4)),
])
def test_deconvolution_shapes_have_no_output_padding(extra, bottom, top, weight):
    layer = build(conv(extra, "Deconvolution"), [bottom])
    assert layer.top_shapes == [top] and tuple(layer.blobs[0].shape) == weight


def test_convolution_parameter_errors():
    with pytest.raises(LayerError, match="either kernel_size or kernel_h/kernel_w"):
        build(conv("num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3"), [(1, 2, 8, 8)])
    with pytest.raises(LayerError, match="group 3 must divide"):
        build(conv("num_output: 6 kernel_size: 1 group: 3"), [(1, 4, 8, 8)])
    with pytest.raises(LayerError, match="too small"):
        build(conv("num_output: 2 kernel_size: 5"), [(1, 2, 3, 3)])


def test_crop_offsets_and_refusal():
    text = 'name: "crop" type: "Crop" bottom: "a" bottom: "b" top: "y" crop_param { axis: 2 offset: 1 offset: 2 }'
    a = np.arange(2 * 3 * 6 * 7, dtype=np.float64).reshape(2, 3, 6, 7)
    b = np.zeros((1, 1, 4, 5))
    y = run_ours(text, [a, b])["tops"][0]
    np.testing.assert_array_equal(y, a[:, :, 1:5, 2:7])
    with pytest.raises(LayerError, match=r"layer 'crop' \(Crop\): cannot crop axis 3: bottom 'a'"):
        build(text, [(1, 3, 6, 6), (1, 1, 4, 5)])


# ------------------------------------------------------------------------- real Caffe parity

POOL_CASES = [(k, s, p, m) for m in ("MAX", "AVE")
              for (k, s, p) in [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 2, 1), (3, 3, 0), (3, 2, 0), (1, 2, 0)]]


def test_pooling_matches_caffe(oracle):
    rng = np.random.default_rng(1)
    cases = []
    for k, s, p, m in POOL_CASES:
        for size in (5, 7, 8):
            x = rng.standard_normal((2, 3, size, size + 1))
            top_shape = build(pool(k, s, p, m), [x.shape]).top_shapes[0]
            # kernel < stride can leave a window empty; Caffe's MAX backward then indexes the
            # bottom with mask -1 (an out-of-bounds write that aborts the oracle), so those
            # cases are compared forward only (docs/decisions.md)
            grads = None if (m == "MAX" and k < s) else [rng.standard_normal(top_shape)]
            cases.append(dict(text=pool(k, s, p, m), bottoms=[x], top_grads=grads, label=(k, s, p, m, size)))
    for case, theirs in zip(cases, run_caffe_cases(oracle, cases)):
        ours = run_ours(case["text"], case["bottoms"], top_grads=case["top_grads"])
        for key in ("tops", "bottom_grads") if case["top_grads"] else ("tops",):
            np.testing.assert_allclose(ours[key][0], theirs[key][0], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{key} {case['label']}")


@pytest.mark.parametrize("kind,extra,bottom", [
    ("Convolution", "num_output: 6 kernel_size: 3 pad: 2 dilation: 2 stride: 2 group: 2", (2, 4, 9, 8)),
    ("Convolution", "num_output: 3 kernel_h: 3 kernel_w: 1 pad_h: 1 stride_w: 2 stride_h: 1", (1, 2, 6, 7)),
    ("Deconvolution", "num_output: 4 kernel_size: 3 stride: 3 pad: 1", (2, 2, 4, 5)),
    ("Deconvolution", "num_output: 4 kernel_size: 4 stride: 2 group: 2 bias_term: false", (1, 2, 3, 3)),
])
def test_convolutions_match_caffe(oracle, kind, extra, bottom):
    rng = np.random.default_rng(2)
    text = conv(extra, kind)
    layer = build(text, [bottom])
    blobs = [rng.standard_normal(tuple(b.shape)) for b in layer.blobs]
    x = rng.standard_normal(bottom)
    g = [rng.standard_normal(layer.top_shapes[0])]
    ours = run_ours(text, [x], blobs, g)
    theirs = run_caffe(oracle, text, [x], blobs, g)
    for key in ("tops", "bottom_grads", "blob_grads"):
        for a, b in zip_same(ours[key], theirs[key], key):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=key)


def test_crop_matches_caffe(oracle):
    text = 'name: "crop" type: "Crop" bottom: "a" bottom: "b" top: "y" crop_param { axis: 1 offset: 1 }'
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 4, 6, 7)), np.zeros((2, 2, 3, 5))
    g = [rng.standard_normal((2, 2, 3, 5))]
    ours, theirs = run_ours(text, [a, b], top_grads=g), run_caffe(oracle, text, [a, b], top_grads=g)
    np.testing.assert_allclose(ours["tops"][0], theirs["tops"][0], rtol=1e-6)
    np.testing.assert_allclose(ours["bottom_grads"][0], theirs["bottom_grads"][0], rtol=1e-6)
