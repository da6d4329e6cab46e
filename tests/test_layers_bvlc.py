"""BVLC layers beyond the SSD zoo (neuron, dense, blob_ops, normalization modules): Caffe's quirks
pinned by hand, a float64 finite-difference gradient check per differentiable type, and forward +
backward parity with real Caffe (the oracle) for every case below."""
import numpy as np
import pytest
import torch

from deeper_ssd import shapes
from deeper_ssd.io import parse_text
from deeper_ssd.layers import LayerError, UnknownLayerType
from deeper_ssd.proto import caffe_pb2
from support import zip_same
from support.layers import build, run_caffe_cases, run_ours


def layer(type_, params="", bottoms=("x",), tops=("y",)):
    return (f'name: "l" type: "{type_}" ' + " ".join(f'bottom: "{b}"' for b in bottoms) + " "
            + " ".join(f'top: "{t}"' for t in tops) + " " + params)


# ------------------------------------------------------------------------- Caffe quirks, by hand

def test_argmax_ties_take_the_highest_index_first():
    x = np.array([[1.0, 3.0, 3.0, 0.0, 3.0]])
    top = run_ours(layer("ArgMax", "argmax_param { top_k: 3 out_max_val: true }"), [x])["tops"][0]
    assert top.shape == (1, 2, 3)
    np.testing.assert_array_equal(top[0, 0], [4, 2, 1])           # indices, ties descending
    np.testing.assert_array_equal(top[0, 1], [3, 3, 3])
    along = run_ours(layer("ArgMax", "argmax_param { axis: 1 }"), [np.array([[[2.0], [5.0], [5.0]]])])
    np.testing.assert_array_equal(along["tops"][0], [[[2.0]]])


def test_argmax_and_reduction_shapes():
    assert build(layer("ArgMax"), [(2, 3, 4, 5)]).top_shapes == [(2, 1, 1, 1)]
    assert build(layer("ArgMax", "argmax_param { out_max_val: true top_k: 4 }"), [(2, 7)]).top_shapes == [(2, 2, 4)]
    assert build(layer("ArgMax", "argmax_param { axis: -2 top_k: 2 }"), [(2, 3, 4, 5)]).top_shapes == [(2, 3, 2, 5)]
    with pytest.raises(LayerError, match="top_k 5 exceeds axis 1"):
        build(layer("ArgMax", "argmax_param { axis: 1 top_k: 5 }"), [(2, 3)])


def test_slice_points_equal_parts_and_errors():
    three = layer("Slice", "slice_param { axis: 1 slice_point: 1 slice_point: 4 }", tops=("a", "b", "c"))
    assert build(three, [(2, 6, 3)]).top_shapes == [(2, 1, 3), (2, 3, 3), (2, 2, 3)]
    equal = layer("Slice", "slice_param { slice_dim: 2 }", tops=("a", "b"))
    assert build(equal, [(2, 6, 4)]).top_shapes == [(2, 6, 2), (2, 6, 2)]
    with pytest.raises(LayerError, match=r"layer 'l' \(Slice\): 2 tops do not evenly divide axis 1 \(5\)"):
        build(layer("Slice", tops=("a", "b")), [(2, 5)])
    with pytest.raises(LayerError, match="must increase strictly"):
        build(layer("Slice", "slice_param { slice_point: 4 slice_point: 2 }", tops=("a", "b", "c")), [(2, 6)])
    with pytest.raises(LayerError, match="either axis or slice_dim"):
        build(layer("Slice", "slice_param { axis: 1 slice_dim: 1 }", tops=("a", "b")), [(2, 6)])


def test_tile_repeats_the_whole_trailing_block():
    x = np.arange(6.0).reshape(1, 2, 3)
    y = run_ours(layer("Tile", "tile_param { axis: 1 tiles: 2 }"), [x])["tops"][0]
    np.testing.assert_array_equal(y[0], [[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5]])
    with pytest.raises(LayerError, match="tiles must be specified"):
        build(layer("Tile"), [(1, 2)])


def test_power_exp_log_formulas():
    x = np.array([[0.5, 1.0, 2.0]])
    y = run_ours(layer("Power", "power_param { power: 3 scale: 2 shift: 1 }"), [x])["tops"][0]
    np.testing.assert_allclose(y, (1 + 2 * x) ** 3)
    constant = run_ours(layer("Power", "power_param { power: 2 scale: 0 shift: 3 }"), [x])["tops"][0]
    np.testing.assert_array_equal(constant, np.full_like(x, 9.0))
    y = run_ours(layer("Exp", "exp_param { base: 2 scale: 3 shift: 1 }"), [x])["tops"][0]
    np.testing.assert_allclose(y, 2.0 ** (1 + 3 * x))
    y = run_ours(layer("Log", "log_param { base: 10 scale: 2 shift: 1 }"), [x])["tops"][0]
    np.testing.assert_allclose(y, np.log10(1 + 2 * x))
    with pytest.raises(LayerError, match="base -2.0 must be strictly positive"):
        build(layer("Exp", "exp_param { base: -2 }"), [(1, 3)])


def test_prelu_blob_shapes_and_default_filler():
    per_channel = build(layer("PReLU"), [(2, 5, 3, 3)])
    shared = build(layer("PReLU", 'prelu_param { channel_shared: true filler { type: "constant" value: 0.1 } }'),
                   [(2, 5)])
    assert tuple(per_channel.blobs[0].shape) == (5,) and tuple(shared.blobs[0].shape) == ()
    assert (per_channel.blob_fillers[0].type, per_channel.blob_fillers[0].value) == ("constant", 0.25)
    assert shared.blob_fillers[0].value == pytest.approx(0.1)
    with pytest.raises(LayerError, match="at least 2 axes"):
        build(layer("PReLU"), [(4,)])


def test_neuron_values_at_their_kinks():
    x = np.array([[-2.0, 0.0, 1.5]])
    g = [np.ones((1, 3))]
    relu_like = run_ours(layer("PReLU", "prelu_param { channel_shared: true }"), [x.reshape(1, 3, 1)],
                         blobs=[np.array(0.25)], top_grads=[np.ones((1, 3, 1))])
    np.testing.assert_allclose(relu_like["tops"][0].ravel(), [-0.5, 0.0, 1.5])
    np.testing.assert_allclose(relu_like["bottom_grads"][0].ravel(), [0.25, 0.25, 1.0])   # x <= 0 -> slope
    elu = run_ours(layer("ELU", "elu_param { alpha: 0.5 }"), [x], top_grads=g)
    np.testing.assert_allclose(elu["tops"][0], [[0.5 * (np.exp(-2) - 1), 0.0, 1.5]])
    np.testing.assert_allclose(elu["bottom_grads"][0], [[0.5 * np.exp(-2), 0.5, 1.0]])   # alpha + y
    absval = run_ours(layer("AbsVal"), [x], top_grads=g)
    np.testing.assert_array_equal(absval["bottom_grads"][0], [[-1.0, 0.0, 1.0]])
    bnll = run_ours(layer("BNLL"), [np.array([[-3.0, 0.0, 60.0]])], top_grads=g)
    np.testing.assert_allclose(bnll["tops"][0], [[np.log1p(np.exp(-3.0)), np.log(2.0), 60.0]])
    np.testing.assert_allclose(bnll["bottom_grads"][0], [[1 / (1 + np.exp(3.0)), 0.5, 1.0]])
    threshold = run_ours(layer("Threshold", "threshold_param { threshold: 0 }"), [x])["tops"][0]
    np.testing.assert_array_equal(threshold, [[0.0, 0.0, 1.0]])              # strictly greater


def test_lrn_within_channel_ignores_k_and_divides_by_the_full_window():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 0, 0] = 2.0
    text = layer("LRN", "lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.9 beta: 0.5 k: 7 }")
    y = run_ours(text, [x])["tops"][0]
    assert y[0, 0, 0, 0] == pytest.approx(2.0 / np.sqrt(1 + 0.9 * 4.0 / 9))   # corner: still / 9
    across = layer("LRN", "lrn_param { local_size: 3 alpha: 0.9 beta: 0.5 k: 2 }")
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    y = run_ours(across, [x])["tops"][0].ravel()
    np.testing.assert_allclose(y, x.ravel() / np.sqrt(2 + 0.3 * np.array([5.0, 14.0, 13.0])))
    with pytest.raises(LayerError, match="local_size 4 must be odd"):
        build(layer("LRN", "lrn_param { local_size: 4 }"), [(1, 3, 2, 2)])


def test_inner_product_axis_transpose_and_blob_shapes():
    ip = build(layer("InnerProduct", "inner_product_param { num_output: 4 axis: 2 transpose: true }"), [(2, 3, 5, 6)])
    assert ip.top_shapes == [(2, 3, 4)] and [tuple(b.shape) for b in ip.blobs] == [(30, 4), (4,)]
    plain = build(layer("InnerProduct", "inner_product_param { num_output: 4 bias_term: false }"), [(2, 3, 5)])
    assert plain.top_shapes == [(2, 4)] and [tuple(b.shape) for b in plain.blobs] == [(4, 15)]
    x, w = np.arange(6.0).reshape(2, 3), np.arange(6.0).reshape(3, 2)
    y = run_ours(layer("InnerProduct", "inner_product_param { num_output: 2 transpose: true bias_term: false }"),
                 [x], blobs=[w])["tops"][0]
    np.testing.assert_allclose(y, x @ w)


def test_softmax_loss_second_top_normalizers_and_accuracy_ties():
    x = np.log(np.array([[[1.0], [2.0], [1.0]], [[1.0], [1.0], [2.0]]]))          # 2 x 3 x 1, p = 1/4, 1/2, 1/4
    t = np.array([[1.0], [2.0]])
    text = layer("SoftmaxWithLoss", "loss_weight: 1 loss_weight: 0", bottoms=("x", "t"), tops=("loss", "p"))
    loss, prob = run_ours(text, [x, t])["tops"]
    assert loss == pytest.approx(-np.log(0.5)) and prob[0, :, 0] == pytest.approx([0.25, 0.5, 0.25])
    ignored = run_ours(layer("SoftmaxWithLoss", "loss_param { ignore_label: 2 normalization: FULL }",
                             bottoms=("x", "t")), [x, t], top_grads=[np.array(1.0)])
    assert ignored["tops"][0] == pytest.approx(-np.log(0.5) / 2)                # FULL divides by 2 positions
    np.testing.assert_allclose(ignored["bottom_grads"][0][1], 0.0)               # ignored position: no gradient
    with pytest.raises(LayerError, match="give one loss_weight per top"):
        build(layer("SoftmaxWithLoss", bottoms=("x", "t"), tops=("loss", "p")), [(2, 3), (2,)])
    scores = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]])
    acc, per_class = run_ours(layer("Accuracy", bottoms=("x", "t"), tops=("a", "c")),
                              [scores, np.array([1.0, 1.0])])["tops"]
    assert acc == 0.5 and list(per_class) == [0.0, 0.5, 0.0]   # ties: class 2 outranks 1; class 1 outranks 0


def test_absval_in_place_and_unknown_types_are_refused_by_name():
    with pytest.raises(LayerError, match=r"layer 'l' \(AbsVal\): does not allow in-place"):
        build(layer("AbsVal", tops=("x",)), [(1, 2)])
    net = parse_text('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }\n'
                     'layer { name: "odd" type: "HingeLossish" bottom: "x" top: "y" }', caffe_pb2.NetParameter())
    with pytest.raises(UnknownLayerType, match="layer 'odd': unknown layer type 'HingeLossish'"):
        shapes.plan_net(net, caffe_pb2.TEST, device="meta")


# ------------------------------------------------------------------------- cases: gradcheck + Caffe

def _cases(rng):
    """(text, bottoms, blobs, backward) with bottoms away from each type's kinks; backward is
    "exact" (autograd's derivative, gradcheck applies), "caffe" (Caffe's own backward, not the
    derivative) or None (Caffe has none)."""
    r = lambda *shape: rng.standard_normal(shape)
    away = lambda *shape: np.sign(r(*shape)) * (0.2 + rng.random(shape))        # |x| >= 0.2
    positive = lambda *shape: 0.5 + rng.random(shape)
    labels = lambda classes, shape: rng.integers(0, classes, shape).astype(float)
    return [
        (layer("InnerProduct", "inner_product_param { num_output: 3 }"), [r(2, 2, 2, 2)], [r(3, 8), r(3)], "exact"),
        (layer("InnerProduct", "inner_product_param { num_output: 3 axis: 2 transpose: true bias_term: false }"),
         [r(2, 3, 2, 2)], [r(4, 3)], "exact"),
        (layer("InnerProduct", "inner_product_param { num_output: 2 axis: -1 }"), [r(2, 3, 4)], [r(2, 4), r(2)], "exact"),
        (layer("Slice", "slice_param { axis: 1 slice_point: 1 slice_point: 3 }", tops=("a", "b", "c")),
         [r(2, 5, 2)], [], "exact"),
        (layer("Slice", "slice_param { slice_dim: 0 }", tops=("a", "b")), [r(4, 3)], [], "exact"),
        (layer("Slice", "slice_param { axis: -1 }", tops=("a",)), [r(2, 3)], [], "exact"),
        (layer("Power", "power_param { power: 2.5 scale: 0.7 shift: 0.3 }"), [positive(2, 3, 2)], [], "exact"),
        (layer("Power", "power_param { power: 2 scale: -1.5 shift: 0.5 }"), [r(2, 3)], [], "exact"),
        (layer("Power", "power_param { power: -0.5 scale: 2 }"), [positive(2, 3)], [], "exact"),
        (layer("Power", "power_param { scale: 3 shift: -1 }"), [r(2, 3)], [], "exact"),
        (layer("Exp"), [r(2, 3)], [], "exact"),
        (layer("Exp", "exp_param { base: 2 scale: 0.5 shift: -1 }"), [r(2, 3)], [], "exact"),
        (layer("Log"), [positive(2, 3)], [], "exact"),
        (layer("Log", "log_param { base: 10 scale: 2 shift: 0.5 }"), [positive(2, 3)], [], "exact"),
        (layer("AbsVal"), [away(2, 3, 2)], [], "exact"),
        (layer("BNLL"), [3 * r(2, 3, 2)], [], "exact"),
        (layer("ELU"), [away(2, 3)], [], "exact"),
        (layer("ELU", "elu_param { alpha: 0.3 }"), [away(2, 3)], [], "exact"),
        (layer("PReLU"), [away(2, 3, 2, 2)], [r(3)], "exact"),
        (layer("PReLU", "prelu_param { channel_shared: true }"), [away(2, 3, 4)], [np.array(0.4)], "exact"),
        (layer("Tile", "tile_param { axis: 1 tiles: 3 }"), [r(2, 2, 3)], [], "exact"),
        (layer("Tile", "tile_param { axis: -1 tiles: 2 }"), [r(2, 3)], [], "exact"),
        (layer("LRN", "lrn_param { local_size: 3 alpha: 0.8 beta: 0.75 k: 1.5 }"), [r(2, 5, 3, 3)], [], "exact"),
        (layer("LRN"), [r(1, 7, 2, 3)], [], "exact"),
        (layer("LRN", "lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.5 beta: 0.6 }"),
         [r(2, 2, 4, 5)], [], "exact"),
        (layer("LRN", "lrn_param { norm_region: WITHIN_CHANNEL local_size: 5 alpha: 2 beta: 0.75 }"),
         [r(1, 2, 3, 3)], [], "exact"),
        (layer("Reduction"), [r(2, 3, 2)], [], "exact"),
        (layer("Reduction", "reduction_param { operation: ASUM axis: 1 coeff: -2 }"), [away(2, 3, 2)], [], "exact"),
        (layer("Reduction", "reduction_param { operation: SUMSQ axis: -1 coeff: 0.5 }"), [r(2, 3, 4)], [], "exact"),
        (layer("Reduction", "reduction_param { operation: MEAN axis: 2 coeff: 3 }"), [r(2, 3, 4, 2)], [], "exact"),
        (layer("MVN"), [r(2, 3, 4, 4)], [], "exact"),
        (layer("MVN", "mvn_param { across_channels: true eps: 0.5 }"), [r(2, 3, 3, 3)], [], "caffe"),
        (layer("MVN", "mvn_param { normalize_variance: false }"), [r(2, 3, 2, 3)], [], "exact"),
        (layer("MVN", "mvn_param { normalize_variance: false across_channels: true }"), [r(2, 2, 3)], [], "exact"),
        (layer("Embed", "embed_param { num_output: 3 input_dim: 5 } propagate_down: false loss_weight: 1"),
         [rng.integers(0, 5, (2, 4)).astype(float)], [r(5, 3), r(3)], "exact"),
        (layer("Embed", "embed_param { num_output: 2 input_dim: 4 bias_term: false } propagate_down: false loss_weight: 1"),
         [np.array([[3.0, 0.0, 3.0]])], [r(4, 2)], "exact"),
        (layer("SoftmaxWithLoss", bottoms=("x", "t")), [r(2, 4, 3), labels(4, (2, 3))], [], "exact"),
        (layer("SoftmaxWithLoss", "loss_param { ignore_label: 2 }", bottoms=("x", "t")),
         [r(3, 4, 2, 2), labels(4, (3, 1, 2, 2))], [], "exact"),
        (layer("SoftmaxWithLoss", "softmax_param { axis: 2 } loss_param { normalization: FULL ignore_label: 0 }",
               bottoms=("x", "t")), [r(2, 3, 5), labels(5, (2, 3))], [], "exact"),
        (layer("SoftmaxWithLoss", "loss_param { normalization: BATCH_SIZE }", bottoms=("x", "t")),
         [r(2, 3, 4), labels(3, (2, 4))], [], "exact"),
        (layer("SoftmaxWithLoss", "loss_param { normalize: false ignore_label: 1 }", bottoms=("x", "t")),
         [r(2, 3, 4), labels(3, (2, 4))], [], "exact"),
        (layer("SoftmaxWithLoss", "loss_param { normalization: NONE }", bottoms=("x", "t")),
         [r(4, 3), labels(3, (4,))], [], "exact"),
        (layer("SigmoidCrossEntropyLoss", bottoms=("x", "t")), [3 * r(2, 3, 2), rng.random((2, 3, 2))], [], "exact"),
        (layer("EuclideanLoss", bottoms=("a", "b")), [r(2, 3, 2), r(2, 6)], [], "exact"),
        (layer("Parameter", "parameter_param { shape { dim: 2 dim: 3 } }", bottoms=()), [], [r(2, 3)], "exact"),
        (layer("Threshold", "threshold_param { threshold: 0.3 }"), [r(2, 3)], [], None),
        (layer("Accuracy", bottoms=("x", "t")), [r(6, 4), labels(4, (6,))], [], None),
        (layer("Accuracy", "accuracy_param { top_k: 2 ignore_label: 1 }", bottoms=("x", "t"), tops=("a", "c")),
         [r(4, 3, 2, 2), labels(3, (4, 2, 2))], [], None),
        (layer("Accuracy", "accuracy_param { axis: 2 }", bottoms=("x", "t"), tops=("a", "c")),
         [np.round(r(3, 2, 4)), labels(4, (3, 2))], [], None),                 # integer scores: ties
        (layer("DummyData", 'dummy_data_param { num: 2 channels: 3 height: 1 height: 4 width: 5 '
               'data_filler { type: "constant" value: 2.5 } }', bottoms=(), tops=("a", "b")), [], [], None),
        (layer("ArgMax", "argmax_param { top_k: 2 out_max_val: true }"), [r(2, 3, 2, 2)], [], None),
        (layer("ArgMax", "argmax_param { axis: 1 top_k: 2 }"), [r(2, 4, 3)], [], None),
        (layer("ArgMax", "argmax_param { axis: 2 out_max_val: true }"), [r(2, 2, 4)], [], None),
        (layer("ArgMax"), [np.array([[1.0, 2.0, 2.0, 0.0]])], [], None),
    ]


_FIXED_BOTTOMS = {"Embed": (0,), "SoftmaxWithLoss": (1,), "SigmoidCrossEntropyLoss": (1,)}


def _layer_function(text, bottoms, blobs):
    """Our layer in float64 as a function of (bottoms..., blobs...), for gradcheck."""
    lay = build(text, [b.shape for b in bottoms]).to(torch.float64)
    names = [f"blobs.{i}" for i in range(len(blobs))]

    def run(*tensors):
        tops = torch.func.functional_call(lay, dict(zip(names, tensors[len(bottoms):])), tensors[:len(bottoms)])
        return tops if isinstance(tops, tuple) else (tops,)

    fixed = _FIXED_BOTTOMS.get(lay.caffe_type, ())                 # labels and indices: no gradient
    inputs = tuple(torch.tensor(a, dtype=torch.float64, requires_grad=i not in fixed) for i, a in enumerate(bottoms)) + \
        tuple(torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in blobs)
    return run, inputs


_EXACT = [i for i, c in enumerate(_cases(np.random.default_rng(0))) if c[3] == "exact"]


@pytest.mark.parametrize("case", _EXACT)
def test_gradcheck_float64(case):
    text, bottoms, blobs, _ = _cases(np.random.default_rng(case))[case]
    run, inputs = _layer_function(text, bottoms, blobs)
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7, rtol=1e-5), text


def test_mvn_backward_is_caffes_with_eps_after_the_sqrt():
    rng = np.random.default_rng(3)
    x, g = rng.standard_normal((1, 1, 2, 3)), rng.standard_normal((1, 1, 2, 3))
    result = run_ours(layer("MVN", "mvn_param { eps: 0.5 }"), [x], top_grads=[g])
    centred = x - x.mean()
    denominator = np.sqrt((centred ** 2).mean()) + 0.5
    y = centred / denominator
    np.testing.assert_allclose(result["tops"][0], y)
    np.testing.assert_allclose(result["bottom_grads"][0], (g - g.mean() - y * (y * g).mean()) / denominator)


def test_bvlc_layers_match_caffe(oracle):
    rng = np.random.default_rng(15)
    cases = []
    for text, bottoms, blobs, backward in _cases(rng):
        tops = run_ours(text, bottoms, blobs)["tops"]
        # Embed refuses force_backward; its loss_weight makes Caffe back-propagate to its blobs
        cases.append(dict(text=text, bottoms=bottoms, blobs=blobs, force_backward="propagate_down" not in text,
                          top_grads=[rng.standard_normal(t.shape) for t in tops] if backward else None))
    for case, theirs in zip(cases, run_caffe_cases(oracle, cases)):
        ours = run_ours(case["text"], case["bottoms"], case["blobs"], case["top_grads"])
        keys = ("tops", "bottom_grads", "blob_grads") if case["top_grads"] is not None else ("tops",)
        for key in keys:
            for a, b in zip_same(ours[key], theirs[key], f"{key}: {case['text']}"):
                np.testing.assert_allclose(a, b.reshape(a.shape), rtol=2e-4, atol=2e-5,
                                           err_msg=f"{key}: {case['text']}")


def test_sizes_table_uses_the_new_shape_rules():
    net = parse_text('''
        layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 6 dim: 4 dim: 4 } } }
        layer { name: "lrn" type: "LRN" bottom: "x" top: "n" }
        layer { name: "mvn" type: "MVN" bottom: "n" top: "m" }
        layer { name: "cut" type: "Slice" bottom: "m" top: "a" top: "b" slice_param { slice_point: 2 } }
        layer { name: "tile" type: "Tile" bottom: "a" top: "t" tile_param { axis: 2 tiles: 3 } }
        layer { name: "fc" type: "InnerProduct" bottom: "t" top: "f" inner_product_param { num_output: 10 } }
        layer { name: "act" type: "PReLU" bottom: "f" top: "f" }
        layer { name: "best" type: "ArgMax" bottom: "f" top: "k" argmax_param { top_k: 3 } }
        layer { name: "sum" type: "Reduction" bottom: "b" top: "s" reduction_param { axis: 1 } }
    ''', caffe_pb2.NetParameter())
    rows = {row.name: row for row in shapes.infer_shapes(net)}
    assert rows["cut"].shapes == [(2, 2, 4, 4), (2, 4, 4, 4)]
    assert rows["tile"].shapes == [(2, 2, 12, 4)]
    assert rows["fc"].shapes == [(2, 10)] and rows["fc"].params == 96 * 10 + 10
    assert rows["fc"].macs == 2 * 96 * 10
    assert rows["act"].params == 10 and rows["best"].shapes == [(2, 1, 3)]
    assert rows["sum"].shapes == [(2,)]
