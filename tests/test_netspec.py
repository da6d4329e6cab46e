"""NetSpec builder: Caffe net_spec semantics (routing, naming, order, in-place, ntop, enums)."""
import pytest

from deeper_ssd import io
from deeper_ssd.proto import caffe_pb2
from deeper_ssd.builder.netspec import L, NetSpec, P, TRAIN


def _small_net():
    n = NetSpec()
    n.data, n.label = L.AnnotatedData(ntop=2, include=dict(phase=TRAIN),
                                      data_param=dict(source="db", batch_size=8, backend=P.Data.LMDB),
                                      transform_param=dict(mean_value=[104, 117, 123]))
    n.conv1 = L.Convolution(n.data, num_output=64, kernel_size=3, pad=1,
                            param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)],
                            weight_filler=dict(type="xavier"), bias_filler=dict(type="constant", value=0))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.up = L.Deconvolution(n.pool1, num_output=64, kernel_size=2, stride=2)
    n.norm = L.Normalize(n.conv1, across_spatial=False, scale_filler=dict(type="constant", value=20))
    n.loss = L.MultiBoxLoss(n.norm, n.label, loss_weight=1, propagate_down=[True, False],
                            code_type=P.PriorBox.CENTER_SIZE, mining_type=P.MultiBoxLoss.MAX_NEGATIVE,
                            loss_param=dict(normalization=P.Loss.VALID))
    return n


def test_keywords_route_to_layer_or_type_param():
    net = _small_net().to_proto("small")
    layers = {layer.name: layer for layer in net.layer}
    conv = layers["conv1"]
    assert list(conv.convolution_param.kernel_size) == [3]     # scalar into a repeated field
    assert conv.convolution_param.num_output == 64
    assert [p.lr_mult for p in conv.param] == [1, 2]
    assert conv.convolution_param.weight_filler.type == "xavier"
    assert layers["up"].convolution_param.stride == [2]        # Deconvolution -> convolution_param
    assert layers["norm"].norm_param.across_spatial is False   # Normalize -> norm_param
    assert layers["pool1"].pooling_param.pool == caffe_pb2.PoolingParameter.MAX
    data = layers["data"]
    assert data.include[0].phase == TRAIN and data.data_param.backend == caffe_pb2.DataParameter.LMDB
    assert list(data.transform_param.mean_value) == [104, 117, 123]
    loss = layers["loss"]
    assert loss.multibox_loss_param.code_type == caffe_pb2.PriorBoxParameter.CENTER_SIZE
    assert list(loss.loss_weight) == [1] and list(loss.propagate_down) == [True, False]
    assert loss.loss_param.normalization == caffe_pb2.LossParameter.VALID


def test_names_order_and_in_place_follow_caffe():
    net = _small_net().to_proto()
    assert [layer.name for layer in net.layer] == ["data", "conv1", "relu1", "pool1", "up", "norm", "loss"]
    relu = net.layer[2]
    assert list(relu.bottom) == ["conv1"] and list(relu.top) == ["conv1"]
    assert list(net.layer[3].bottom) == ["conv1"]              # reading the in-place result
    assert list(net.layer[0].top) == ["data", "label"]


def test_unassigned_tops_get_type_counter_names():
    n = NetSpec()
    data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.out = L.ReLU(L.Convolution(data, num_output=2, kernel_size=1), in_place=True)
    names = [(layer.name, list(layer.top)) for layer in n.to_proto().layer]
    assert names == [("Input1", ["Input1"]), ("Convolution1", ["Convolution1"]), ("out", ["Convolution1"])]


def test_builder_text_parse_gives_an_equal_message(tmp_path):
    net = _small_net().to_proto("small")
    path = tmp_path / "small.prototxt"
    io.write_net(net, path)
    assert io.read_net(path) == net


def test_bad_keywords_and_enums_fail_at_the_call():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    with pytest.raises(TypeError, match="unknown keyword 'num_outputs'.*ConvolutionParameter"):
        L.Convolution(n.data, num_outputs=3)
    with pytest.raises(ValueError, match="'MAXX' is not one of MAX, AVE, STOCHASTIC"):
        L.Pooling(n.data, pool="MAXX", kernel_size=2)
    with pytest.raises(TypeError, match="no parameter message"):
        L.Split(n.data, axis=1)
    with pytest.raises(AttributeError, match="no enum constant 'MEDIAN'"):
        P.Pooling.MEDIAN
    with pytest.raises(TypeError, match="not a Top"):
        L.ReLU("data")


def test_enum_names_as_strings_and_silence_without_tops():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.pool = L.Pooling(n.data, pool="AVE", kernel_size=2)
    n.silence = L.Silence(n.pool, ntop=0)
    net = n.to_proto()
    assert net.layer[1].pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert net.layer[2].type == "Silence" and not len(net.layer[2].top)
    assert net.layer[2].name == "silence"


def test_feature_net_before_read_and_frozen():
    from deeper_ssd.builder.ssd import FeatureNet
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    fn = FeatureNet(n, batchnorm=True, frozen=True)
    fn.conv("conv1", "data", 4, 3, pad=1, relu="relu1")

    def gate(top):
        n.gate = L.Sigmoid(top)
        return n.gate
    fn.before_read("conv1", gate)
    fn.pool("pool1", "conv1", 2, 2)
    fn.conv("conv2", "conv1", 4, 1)
    layers = {layer.name: layer for layer in n.to_proto().layer}
    assert [layer.name for layer in n.to_proto().layer].index("gate") == 5   # after relu1, before pool1
    assert list(layers["pool1"].bottom) == list(layers["conv2"].bottom) == ["gate"]
    assert [(p.lr_mult, p.decay_mult) for p in layers["conv1_scale"].param] == [(0, 0), (0, 0)]
    assert [(p.lr_mult, p.decay_mult) for p in layers["conv1"].param] == [(0, 0)]
    assert layers["conv1_bn"].batch_norm_param.use_global_stats
    with pytest.raises(ValueError, match="rewritten in place by relu1b after a head"):
        fn.relu("relu1b", "conv1")
