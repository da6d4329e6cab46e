"""Net: construction rules (phases, in-place, sharing, loss weights, propagate_down), weights I/O."""
import numpy as np
import pytest
import torch

from deeper_ssd import io
from deeper_ssd.layers import LayerError
from deeper_ssd.net import Net, WeightsError
from deeper_ssd.proto import caffe_pb2
from deeper_ssd.builder.netspec import L, NetSpec, P, TRAIN


def _tiny(bn=False):
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 8, 8]))
    n.conv1 = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1, weight_filler=dict(type="xavier"),
                            bias_filler=dict(type="constant", value=0.1),
                            param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)])
    if bn:
        n.bn1 = L.BatchNorm(n.conv1, in_place=True)
        n.scale1 = L.Scale(n.conv1, bias_term=True, in_place=True)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.norm = L.Normalize(n.pool1, across_spatial=False, channel_shared=False,
                         scale_filler=dict(type="constant", value=20))
    n.out = L.Convolution(n.norm, num_output=2, kernel_size=1, weight_filler=dict(type="gaussian", std=0.1))
    return n.to_proto("tiny")


def test_forward_outputs_blobs_and_params():
    net = Net(_tiny(), seed=0)
    x = torch.randn(2, 3, 8, 8)
    out = net(data=x, keep_blobs=True)
    assert list(out) == ["out"] and out["out"].shape == (2, 2, 4, 4) and out.loss is None
    assert set(net.blobs) == {"data", "conv1", "pool1", "norm", "out"}
    assert [tuple(p.shape) for p in net.params["conv1"]] == [(4, 3, 3, 3), (4,)]
    assert torch.all(net.params["norm"][0] == 20)
    assert torch.all(net.params["conv1"][1] == 0.1)
    assert [(p.layer, p.index, p.lr_mult, p.decay_mult) for p in net.learnable_params] == [
        ("conv1", 0, 1, 1), ("conv1", 1, 2, 0), ("norm", 0, 1, 1), ("out", 0, 1, 1), ("out", 1, 1, 1)]
    # any batch size, other spatial sizes refused clearly
    assert net(data=torch.randn(5, 3, 8, 8))["out"].shape[0] == 5
    with pytest.raises(ValueError, match="built for 2x3x8x8"):
        net(data=torch.randn(1, 3, 9, 9))
    with pytest.raises(KeyError, match="no input named image"):
        net(image=x)


def test_seeded_construction_is_reproducible():
    a, b, c = Net(_tiny(), seed=5), Net(_tiny(), seed=5), Net(_tiny(), seed=6)
    assert torch.equal(a.params["conv1"][0], b.params["conv1"][0])
    assert not torch.equal(a.params["conv1"][0], c.params["conv1"][0])
    torch.manual_seed(3)
    d = Net(_tiny())
    torch.manual_seed(3)
    e = Net(_tiny())
    assert torch.equal(d.params["out"][0], e.params["out"][0])


def test_loss_weight_and_propagate_down():
    text = """
layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "sum" type: "Eltwise" bottom: "x" bottom: "y" top: "s" propagate_down: true propagate_down: false }
layer { name: "act" type: "Sigmoid" bottom: "s" top: "a" loss_weight: 2.5 }
"""
    net = Net(io.parse_text(text, caffe_pb2.NetParameter()))
    x = torch.randn(2, 3, requires_grad=True)
    y = torch.randn(2, 3, requires_grad=True)
    out = net(x=x, y=y)
    expected = 2.5 * torch.sigmoid(x + y).sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    assert x.grad is not None and y.grad is None


def test_param_sharing_by_name_and_lr_mult_zero():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 4, 4]))
    n.a = L.Convolution(n.data, num_output=2, kernel_size=1, param=[dict(name="w"), dict(name="b", lr_mult=0)])
    n.b = L.Convolution(n.data, num_output=2, kernel_size=1, param=[dict(name="w"), dict(name="b")])
    net = Net(n.to_proto())
    assert net.params["a"][0] is net.params["b"][0] and net.params["a"][1] is net.params["b"][1]
    assert len(net.learnable_params) == 2
    assert not net.params["a"][1].requires_grad
    out = net(data=torch.randn(1, 2, 4, 4))
    assert torch.allclose(out["a"], out["b"])
    n.c = L.Convolution(n.data, num_output=3, kernel_size=1, param=[dict(name="w")])
    with pytest.raises(LayerError, match="shared param 'w'.*shapes differ"):
        Net(n.to_proto())


def test_batchnorm_statistics_are_params_with_lr_mult_zero():
    net = Net(_tiny(bn=True), phase="TRAIN")
    stats = [p for p in net.learnable_params if p.layer == "bn1"]
    assert [p.lr_mult for p in stats] == [0, 0, 0] and not any(p.blob.requires_grad for p in stats)
    before = net.params["bn1"][2].clone()
    net(data=torch.randn(2, 3, 8, 8))
    assert net.params["bn1"][2].item() == pytest.approx(before.item() * 0.999 + 1)


def test_caffemodel_round_trip_and_partial_loading(tmp_path):
    net = Net(_tiny(), seed=1)
    path = tmp_path / "tiny.caffemodel"
    net.save_caffemodel(path)
    other = Net(_tiny(), seed=2)
    assert other.load_caffemodel(path) == ["conv1", "norm", "out"]
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(net(data=x)["out"], other(data=x)["out"])
    saved = io.read_caffemodel(path)
    assert [layer.name for layer in saved.layer] == ["data", "conv1", "relu1", "pool1", "norm", "out"]
    assert all(layer.phase == caffe_pb2.TEST for layer in saved.layer)
    # a file without "out": that layer keeps its own (filler) values
    del saved.layer[-1]
    third = Net(_tiny(), seed=3)
    out_before = third.params["out"][0].clone()
    assert third.load_caffemodel(saved) == ["conv1", "norm"]
    assert torch.equal(third.params["out"][0], out_before)


def test_weight_mismatches_name_layer_blob_and_shapes(tmp_path):
    weights = Net(_tiny()).to_proto()
    conv = weights.layer[1]
    conv.blobs[0].CopyFrom(io.array_to_blob(np.zeros((4, 3, 5, 5), np.float32)))
    with pytest.raises(WeightsError, match=r"layer 'conv1' blob 0: file shape \(4, 3, 5, 5\), net shape \(4, 3, 3, 3\)"):
        Net(_tiny()).load_caffemodel(weights)
    del conv.blobs[1:]
    with pytest.raises(WeightsError, match="layer 'conv1' has 1 blobs, the net's layer has 2"):
        Net(_tiny()).load_caffemodel(weights)


def test_legacy_4d_blob_loads_into_a_1d_bias():
    weights = Net(_tiny(), seed=0).to_proto()
    legacy = caffe_pb2.BlobProto(num=1, channels=1, height=1, width=4)
    legacy.data.extend([1, 2, 3, 4])
    weights.layer[1].blobs[1].CopyFrom(legacy)
    net = Net(_tiny())
    net.load_caffemodel(weights)
    assert net.params["conv1"][1].tolist() == [1, 2, 3, 4]


def test_test_net_shares_train_net_weights():
    train = Net(_tiny(), phase=TRAIN, seed=0)
    test = Net(_tiny(), phase="TEST", seed=1)
    assert set(test.share_weights_from(train)) == {"conv1", "norm", "out"}
    with torch.no_grad():
        train.params["out"][0].add_(1.0)
    assert torch.equal(test.params["out"][0], train.params["out"][0])


def test_net_runs_in_float64_and_gradients_flow():
    net = Net(_tiny(), seed=0).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    net(data=x)["out"].sum().backward()
    assert x.grad is not None and net.params["conv1"][0].grad is not None


def test_in_place_relu_overwrites_only_when_safe():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 4, 4]))
    n.relu0 = L.ReLU(n.data, in_place=True)                  # the caller's tensor: never overwritten
    n.a = L.Convolution(n.relu0, num_output=2, kernel_size=1)
    n.relu_a = L.ReLU(n.a, in_place=True)                     # nothing read 'a' yet: overwrite
    n.b = L.Convolution(n.relu_a, num_output=2, kernel_size=1)
    n.side = L.Convolution(n.b, num_output=2, kernel_size=1)  # reads 'b' before its ReLU
    n.relu_b = L.ReLU(n.b, in_place=True)                     # must not overwrite
    n.out = L.Eltwise(n.relu_b, n.side)
    net = Net(n.to_proto(), "TRAIN", seed=0)
    flags = {layer.name: layer.overwrite_bottom for layer in net.layers if layer.caffe_type == "ReLU"}
    assert flags == {"relu0": False, "relu_a": True, "relu_b": False}
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    before = x.detach().clone()
    out = net(data=x)["out"]
    out.sum().backward()                                      # no autograd version error
    assert torch.equal(x.detach(), before)
    # the same result as a net without any overwriting
    for layer in net.layers:
        layer.overwrite_bottom = False
    x2 = x.detach().clone().requires_grad_(True)
    out2 = net(data=x2)["out"]
    out2.sum().backward()
    assert torch.allclose(out, out2) and torch.allclose(x.grad, x2.grad)


def _batchnorm_scale_net(scale_in_place: bool, bias_term: bool = True):
    """conv -> BatchNorm (in place) -> Scale (in place: fused by the net; or to a new blob:
    run as two layers) -> ReLU -> conv."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[3, 2, 5, 5]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1, weight_filler=dict(type="xavier"))
    n.bn = L.BatchNorm(n.conv, in_place=True, batch_norm_param=dict(moving_average_fraction=0.5))
    scale = dict(bias_term=bias_term, filler=dict(type="uniform", min=0.5, max=1.5))
    if bias_term:
        scale["bias_filler"] = dict(type="uniform", min=-0.5, max=0.5)
    if scale_in_place:
        n.scale = L.Scale(n.conv, in_place=True, **scale)
        n.relu = L.ReLU(n.conv, in_place=True)
    else:
        n.scale = L.Scale(n.conv, **scale)
        n.relu = L.ReLU(n.scale, in_place=True)
    n.out = L.Convolution(n.relu, num_output=2, kernel_size=1, weight_filler=dict(type="xavier"))
    return n.to_proto("bn_scale")


@pytest.mark.parametrize("bias_term", [True, False])
def test_batchnorm_then_in_place_scale_runs_as_one_kernel_with_the_same_results(monkeypatch, bias_term):
    """The pair Caffe nets use for an affine BatchNorm is one native_batch_norm call: outputs,
    gradients of every blob and the running statistics equal the two-layer run, in TRAIN and
    TEST; the Scale layer keeps its blobs (and its name in a .caffemodel)."""
    from deeper_ssd.layers.common import Scale
    fused = Net(_batchnorm_scale_net(True, bias_term), "TRAIN", seed=4).double()
    plain = Net(_batchnorm_scale_net(False, bias_term), "TRAIN", seed=4).double()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    plain_out = plain(data=x)["out"]
    plain_out.pow(2).sum().backward()
    calls = []
    monkeypatch.setattr(Scale, "forward", lambda self, *a: calls.append(self.name))
    fused_out = fused(data=x)["out"]
    fused_out.pow(2).sum().backward()
    assert calls == []                                        # Scale's own pass did not run
    assert torch.allclose(fused_out, plain_out, atol=1e-12)
    for name in ("conv", "bn", "scale", "out"):
        for a, b in zip(fused.params[name], plain.params[name]):
            assert torch.allclose(a, b, atol=1e-12), name     # BatchNorm running sums too
            if a.requires_grad:
                assert torch.allclose(a.grad, b.grad, atol=1e-12), name
    assert len(fused.params["scale"]) == (2 if bias_term else 1)
    test_fused = Net(_batchnorm_scale_net(True, bias_term), "TEST").double()
    test_plain = Net(_batchnorm_scale_net(False, bias_term), "TEST").double()
    test_fused.load_caffemodel(fused.to_proto())
    test_plain.load_caffemodel(fused.to_proto())
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.allclose(test_fused(data=x)["out"], test_plain(data=x)["out"], atol=1e-12)
