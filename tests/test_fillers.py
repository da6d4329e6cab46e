"""Caffe's fillers: exact deterministic values, distribution parameters and fan rules."""
import math

import numpy as np
import pytest
import torch

from deeper_ssd.layers.fillers import fill
from deeper_ssd.proto import caffe_pb2


def _filled(shape, seed=0, **kwargs):
    return fill(torch.empty(shape), caffe_pb2.FillerParameter(**kwargs), torch.Generator().manual_seed(seed)).numpy()


def test_constant_and_default():
    assert np.all(_filled((3, 2), type="constant", value=2.5) == 2.5)
    assert np.all(fill(torch.ones(4), None).numpy() == 0)       # absent filler = constant 0


@pytest.mark.parametrize("norm,fan", [("FAN_IN", 8 * 3 * 3), ("FAN_OUT", 16 * 3 * 3), ("AVERAGE", (72 + 144) / 2)])
def test_xavier_is_uniform_sqrt3_over_n(norm, fan):
    values = _filled((16, 8, 3, 3), type="xavier", variance_norm=caffe_pb2.FillerParameter.VarianceNorm.Value(norm))
    bound = math.sqrt(3.0 / fan)
    assert np.abs(values).max() <= bound
    assert np.abs(values).max() > 0.97 * bound              # fills the interval, not Glorot's narrower one
    assert values.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_msra_gaussian_uniform_and_sparse():
    msra = _filled((64, 32, 3, 3), type="msra")
    assert msra.std() == pytest.approx(math.sqrt(2.0 / (32 * 9)), rel=0.03)
    gauss = _filled((200, 50), type="gaussian", mean=1.0, std=0.5)
    assert gauss.mean() == pytest.approx(1.0, abs=0.01) and gauss.std() == pytest.approx(0.5, rel=0.03)
    sparse = _filled((100, 400), type="gaussian", std=1.0, sparse=10)   # keep p = 10 / 100
    assert (sparse != 0).mean() == pytest.approx(0.1, abs=0.01)
    uniform = _filled((1000,), type="uniform", min=-2, max=3)
    assert uniform.min() >= -2 and uniform.max() <= 3 and uniform.mean() == pytest.approx(0.5, abs=0.15)


def test_positive_unitball_rows_sum_to_one():
    values = _filled((5, 3, 2, 2), type="positive_unitball")
    assert np.all(values >= 0)
    np.testing.assert_allclose(values.reshape(5, -1).sum(1), 1.0, rtol=1e-6)


def test_bilinear_kernel_values():
    values = _filled((2, 1, 4, 4), type="bilinear")
    ramp = np.array([0.25, 0.75, 0.75, 0.25])                # f = 2, c = 0.75
    np.testing.assert_allclose(values[0, 0], np.outer(ramp, ramp))
    np.testing.assert_allclose(values[1, 0], values[0, 0])
    odd = _filled((1, 1, 3, 3), type="bilinear")[0, 0]       # Caffe's formula: f = 2, c = 0.75
    np.testing.assert_allclose(odd, np.outer([0.25, 0.75, 0.75], [0.25, 0.75, 0.75]))
    with pytest.raises(ValueError, match="square kernels"):
        _filled((1, 1, 3, 2), type="bilinear")


def test_seeded_fills_repeat_and_unknown_type_fails():
    a, b = _filled((10,), seed=3, type="gaussian"), _filled((10,), seed=3, type="gaussian")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unknown filler type 'glorot'"):
        _filled((2,), type="glorot")


def test_deterministic_fillers_match_caffe(oracle):
    net = """
name: "f"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 4 dim: 5 dim: 5 } } }
layer { name: "up" type: "Deconvolution" bottom: "x" top: "y"
  convolution_param { num_output: 4 group: 4 kernel_size: 6 stride: 3 bias_term: false
                      weight_filler { type: "bilinear" } } }
layer { name: "up5" type: "Deconvolution" bottom: "x" top: "z"
  convolution_param { num_output: 4 group: 4 kernel_size: 5 stride: 2 weight_filler { type: "bilinear" }
                      bias_filler { type: "constant" value: 0.25 } } }
"""
    out = oracle.run("""
net = caffe.Net("net.prototxt", caffe.TEST)
out["up"] = net.params["up"][0].data
out["up5"] = net.params["up5"][0].data
out["up5_bias"] = net.params["up5"][1].data
""", {"net.prototxt": net})
    np.testing.assert_allclose(_filled(out["up"].shape, type="bilinear"), out["up"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_filled(out["up5"].shape, type="bilinear"), out["up5"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["up5_bias"], 0.25)
