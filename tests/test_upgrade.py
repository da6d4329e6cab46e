"""Caffe's load-time upgrades (deeper_ssd/upgrade.py): V0 and V1 layers, data-layer transformation
fields, net-level inputs, frozen BatchNorm params; on text nets and binary caffemodels; the
``deeper-ssd upgrade`` tool; real Caffe (which upgrades on load) gives the same forward."""
import logging

import numpy as np
import pytest
import torch

from deeper_ssd import io, upgrade
from deeper_ssd.net import Net
from deeper_ssd.proto import caffe_pb2

INPUT = 'input: "data"\ninput_dim: 2 input_dim: 3 input_dim: 12 input_dim: 12\n'

V1_NET = 'name: "v1net"\n' + INPUT + '''
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 1 blobs_lr: 2
  weight_decay: 1 weight_decay: 0 convolution_param { num_output: 4 kernel_size: 3 pad: 1
  weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 } } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "norm1" type: LRN bottom: "pool1" top: "norm1" lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 } }
layers { name: "fc" type: INNER_PRODUCT bottom: "norm1" top: "fc" param: "fc_w" blob_share_mode: PERMISSIVE
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layers { name: "prob" type: SOFTMAX bottom: "fc" top: "prob" }
'''

V0_NET = 'name: "v0net"\n' + INPUT + '''force_backward: true
layers { layer { name: "pad1" type: "padding" pad: 1 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 1 biasterm: true
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 weight_filler { type: "gaussian" std: 0.3 } }
  bottom: "pad1" top: "conv1" }
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 stride: 2 } bottom: "conv1" top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 3 alpha: 0.1 beta: 0.75 } bottom: "pool1" top: "norm1" }
layers { layer { name: "fc" type: "innerproduct" num_output: 5 weight_filler { type: "gaussian" std: 0.1 } }
  bottom: "norm1" top: "fc" }
layers { layer { name: "prob" type: "softmax" } bottom: "fc" top: "prob" }
'''

CURRENT_BODY = '''
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1"
  param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
'''
INPUT_DIM_NET = 'name: "dims"\n' + INPUT + CURRENT_BODY
INPUT_SHAPE_NET = 'name: "shapes"\ninput: "data"\ninput_shape { dim: 2 dim: 3 dim: 12 dim: 12 }\n' + CURRENT_BODY


def _parse(text):
    return io.parse_text(text, caffe_pb2.NetParameter())


# ---- the upgraded NetParameter ----

def test_v1_layers_become_layer_parameters():
    net, done = upgrade.upgrade_net(_parse(V1_NET), "v1", keep_fork_forms=True)
    assert done == ["V1 layers"] and not len(net.layers)
    assert [(layer.name, layer.type) for layer in net.layer] == [
        ("conv1", "Convolution"), ("relu1", "ReLU"), ("pool1", "Pooling"), ("norm1", "LRN"),
        ("fc", "InnerProduct"), ("prob", "Softmax")]
    conv, fc = net.layer[0], net.layer[4]
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    assert conv.convolution_param.num_output == 4 and list(conv.convolution_param.pad) == [1]
    assert conv.convolution_param.bias_filler.value == pytest.approx(0.1)
    assert [(p.name, p.share_mode, p.HasField("lr_mult")) for p in fc.param] == \
        [("fc_w", caffe_pb2.ParamSpec.PERMISSIVE, False)]
    assert list(net.input) == ["data"] and len(net.input_dim) == 4       # kept as written


def test_v1_data_layer_transform_fields_move_to_transform_param():
    net, done = upgrade.upgrade_net(_parse('''
layers { name: "data" type: DATA top: "data" top: "label" include { phase: TRAIN } loss_weight: 0
  data_param { source: "train_lmdb" batch_size: 8 scale: 0.5 mean_file: "m.binaryproto" crop_size: 7
  mirror: true backend: LMDB } }
layers { name: "img" type: IMAGE_DATA top: "img" top: "l2" image_data_param { source: "list.txt" mirror: true } }
'''), "v1")
    assert done == ["data-layer transformation fields", "V1 layers"]
    data, img = net.layer
    assert data.type == "Data" and data.include[0].phase == caffe_pb2.TRAIN and list(data.loss_weight) == [0]
    t = data.transform_param
    assert (t.scale, t.mean_file, t.crop_size, t.mirror) == (0.5, "m.binaryproto", 7, True)
    assert not any(data.data_param.HasField(f) for f in ("scale", "mean_file", "crop_size", "mirror"))
    assert (data.data_param.source, data.data_param.batch_size, data.data_param.backend) == \
        ("train_lmdb", 8, caffe_pb2.DataParameter.LMDB)
    assert img.type == "ImageData" and img.transform_param.mirror and not img.image_data_param.HasField("mirror")


def test_v0_layers_become_layer_parameters_with_padding_folded():
    net, done = upgrade.upgrade_net(_parse(V0_NET), "v0")
    assert done == ["V0 layers", "V1 layers", "net-level inputs"]
    assert [(layer.name, layer.type, list(layer.bottom)) for layer in net.layer] == [
        ("input", "Input", []), ("conv1", "Convolution", ["data"]), ("relu1", "ReLU", ["conv1"]),
        ("pool1", "Pooling", ["conv1"]), ("norm1", "LRN", ["pool1"]), ("fc", "InnerProduct", ["norm1"]),
        ("prob", "Softmax", ["fc"])]
    conv = net.layer[1].convolution_param
    assert (list(conv.pad), list(conv.kernel_size), list(conv.stride), conv.num_output, conv.bias_term) == \
        ([1], [3], [1], 4, True)
    assert conv.weight_filler.std == pytest.approx(0.3)
    assert [(p.lr_mult, p.decay_mult) for p in net.layer[1].param] == [(1, 1), (2, 0)]
    pool = net.layer[3].pooling_param
    assert (pool.pool, pool.kernel_size, pool.stride) == (caffe_pb2.PoolingParameter.AVE, 2, 2)
    lrn = net.layer[4].lrn_param
    assert (lrn.local_size, lrn.alpha, lrn.beta) == (3, pytest.approx(0.1), 0.75)
    assert net.layer[5].inner_product_param.num_output == 5
    assert net.force_backward and list(net.layer[0].input_param.shape[0].dim) == [2, 3, 12, 12]


def test_v0_data_fields_and_misplaced_fields(caplog):
    net, _ = upgrade.upgrade_net(_parse('''
layers { layer { name: "d" type: "data" source: "db" batchsize: 16 cropsize: 5 mirror: true scale: 0.25
  meanfile: "mean.bp" rand_skip: 3 } top: "d" }
layers { layer { name: "r" type: "relu" num_output: 3 } bottom: "d" top: "r" }
'''), "v0")
    data = net.layer[0]
    assert (data.type, data.data_param.source, data.data_param.batch_size, data.data_param.rand_skip) == \
        ("Data", "db", 16, 3)
    assert (data.transform_param.crop_size, data.transform_param.mirror, data.transform_param.mean_file,
            data.transform_param.scale) == (5, True, "mean.bp", 0.25)
    assert not net.layer[1].HasField("convolution_param")
    assert "num_output does not apply to type 'relu'" in caplog.text     # Caffe logs it and goes on


@pytest.mark.parametrize("text", [INPUT_DIM_NET, INPUT_SHAPE_NET])
def test_deprecated_inputs_become_an_input_layer_first(text):
    net, done = upgrade.upgrade_net(_parse(text), "inputs")
    assert done == ["net-level inputs", "BatchNorm param specs"]
    assert not (len(net.input) or len(net.input_dim) or len(net.input_shape))
    first = net.layer[0]
    assert (first.name, first.type, list(first.top)) == ("input", "Input", ["data"])
    assert list(first.input_param.shape[0].dim) == [2, 3, 12, 12]
    assert [layer.name for layer in net.layer[1:]] == ["conv1", "bn1", "scale1", "relu1", "fc"]


def test_input_without_shape_is_dropped_and_batchnorm_params_other_than_three_stay():
    net, done = upgrade.upgrade_net(_parse('input: "data"\nlayer { name: "bn" type: "BatchNorm" '
                                           'bottom: "data" top: "bn" param { lr_mult: 0 } param { lr_mult: 0 } }'),
                                    "old.caffemodel")
    assert done == ["net-level inputs"] and len(net.layer) == 1 and len(net.layer[0].param) == 2
    assert not len(net.input)


def test_current_nets_come_back_equal():
    current, _ = upgrade.upgrade_net(_parse(INPUT_DIM_NET), "x")
    again, done = upgrade.upgrade_net(current, "x")
    assert done == [] and again == current


@pytest.mark.parametrize("text,message", [
    ('layer { name: "a" type: "ReLU" }\nlayers { name: "b" type: RELU }', "both 'layer' and legacy 'layers'"),
    ('input: "data"\nlayers { layer { name: "x" type: "frobnicate" } bottom: "data" top: "x" }',
     "unknown type 'frobnicate'"),
    ('layers { layer { name: "c" type: "conv" } bottom: "nowhere" top: "c" }', "unknown blob input 'nowhere'"),
    ('input: "data"\nlayers { layer { name: "p" type: "padding" pad: 1 } bottom: "data" top: "p" }\n'
     'layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }', "padding layer 'p'"),
])
def test_what_caffe_aborts_on_is_a_clear_error(text, message):
    with pytest.raises(io.CaffeFormatError, match=message):
        upgrade.upgrade_net(_parse(text), "old.prototxt")


# ---- files: read_net / read_caffemodel / Net.load_caffemodel / deeper-ssd upgrade ----

def _current_weights(text, seed=0) -> caffe_pb2.NetParameter:
    """Seeded random blobs for the upgraded net of ``text``, as a current-format caffemodel."""
    net = Net(upgrade.upgrade_net(_parse(text), "w")[0], "TEST", seed=seed)
    with torch.no_grad():            # non-trivial BatchNorm statistics
        for layer in net.layers:
            if layer.caffe_type == "BatchNorm":
                layer.blobs[0].uniform_(-1, 1)
                layer.blobs[1].uniform_(0.5, 2)
                layer.blobs[2].fill_(2.0)
    return net.to_proto()


def _legacy_blob(blob) -> caffe_pb2.BlobProto:
    """The same values with the legacy num/channels/height/width dims old caffemodels use."""
    shape = (1,) * (4 - len(blob.shape.dim)) + tuple(blob.shape.dim)
    return caffe_pb2.BlobProto(num=shape[0], channels=shape[1], height=shape[2], width=shape[3],
                               data=blob.data)


def _v1_caffemodel(weights: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """A V1 caffemodel (``layers`` with enum types and legacy blob dims) of ``weights``."""
    types = {name: number for number, name in upgrade.V1_TYPES.items()}
    old = caffe_pb2.NetParameter(name=weights.name)
    for layer in weights.layer:
        if len(layer.blobs):
            old.layers.add(name=layer.name, type=types[layer.type], bottom=layer.bottom, top=layer.top,
                           blobs=[_legacy_blob(b) for b in layer.blobs])
    return old


def _v0_caffemodel(weights: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    v0_types = {"Convolution": "conv", "InnerProduct": "innerproduct"}
    old = caffe_pb2.NetParameter(name=weights.name, input=["data"])
    for layer in weights.layer:
        if len(layer.blobs):
            shell = old.layers.add(bottom=["data"], top=[layer.name])
            shell.layer.name, shell.layer.type = layer.name, v0_types[layer.type]
            shell.layer.blobs.extend(_legacy_blob(b) for b in layer.blobs)
    return old


def test_readers_keep_the_forms_the_fork_still_writes_and_the_plan_upgrades_them(tmp_path, caplog):
    path = _write(tmp_path / "deploy.prototxt", INPUT_SHAPE_NET)
    with caplog.at_level(logging.WARNING, logger="deeper_ssd.upgrade"):
        net = io.read_net(path)
    assert net == _parse(INPUT_SHAPE_NET) and not caplog.records      # as written, silently
    planned = io.upgrade_net(net)
    assert planned.layer[0].type == "Input" and not len(planned.layer[2].param)


def test_read_net_upgrades_text_and_logs_one_line(tmp_path, caplog):
    path = tmp_path / "v1.prototxt"
    path.write_text(V1_NET)
    with caplog.at_level(logging.WARNING, logger="deeper_ssd.upgrade"):
        net = io.read_net(path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: upgraded V1 layers as Caffe does on load (deeper-ssd upgrade writes the upgraded file)"]
    assert len(net.layer) == 6 and list(net.input) == ["data"]


def test_v1_caffemodel_loads_by_layer_name_for_fine_tuning(tmp_path):
    """What ``train --weights OLD.caffemodel`` does: Net.load_caffemodel on a V1 binary file."""
    weights = _current_weights(V1_NET)
    old = tmp_path / "old.caffemodel"
    io.write_binary(_v1_caffemodel(weights), old)
    read = io.read_caffemodel(old)
    assert not len(read.layers) and [layer.name for layer in read.layer] == ["conv1", "fc"]
    net = Net.from_prototxt(_write(tmp_path / "v1.prototxt", V1_NET), "TEST", seed=7)
    assert net.load_caffemodel(old) == ["conv1", "fc"]
    want = {layer.name: [io.blob_to_array(b) for b in layer.blobs] for layer in weights.layer}
    for name in ("conv1", "fc"):
        for blob, expected in zip(net.layer_by_name[name].blobs, want[name]):
            np.testing.assert_array_equal(blob.detach().numpy(), expected)


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_upgrade_tool_writes_the_upgraded_file_in_the_same_kind(tmp_path, capsys, kind):
    from deeper_ssd import cli

    src, dst = tmp_path / f"old.{kind}", tmp_path / f"new.{kind}"
    if kind == "text":
        src.write_text(V0_NET)
    else:
        io.write_binary(_v1_caffemodel(_current_weights(V1_NET)), src)
    assert cli.main(["upgrade", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    new = io.read_text(dst, caffe_pb2.NetParameter) if kind == "text" else io.read_binary(dst, caffe_pb2.NetParameter)
    assert not len(new.layers) and len(new.layer) and str(dst) in out
    if kind == "text":
        assert new.layer[0].type == "Input" and not len(new.input) and "V0 layers" in out
    else:
        assert [len(layer.blobs) for layer in new.layer] == [2, 2] and "V1 layers" in out
    assert cli.main(["upgrade", str(dst), str(tmp_path / "again")]) == 0
    assert "already" in capsys.readouterr().out


def test_upgrade_tool_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    from deeper_ssd import cli

    bad = _write(tmp_path / "bad.prototxt", 'layers { name: "x" type: NOT_A_TYPE }\n')
    assert cli.main(["upgrade", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bad.prototxt:1:" in err and "NOT_A_TYPE" in err


# ---- real Caffe upgrades the same files on load and computes the same forward ----

_ORACLE_FORWARD = """
net = caffe.Net("net.prototxt", "w.caffemodel", caffe.TEST)
net.blobs["data"].data[...] = np.load("x.npy")
net.forward()
for name in ("conv1", "fc"):
    out[name] = net.blobs[name].data.copy()
out["layers"] = np.array([len(net.layers)])
"""


@pytest.mark.parametrize("net_text,weights_format", [
    (V1_NET, "V1"), (V1_NET, "current"), (V0_NET, "V0"), (V0_NET, "V1"),
    (V0_NET, "current"), (INPUT_DIM_NET, "current"), (INPUT_SHAPE_NET, "current")])
def test_upgraded_nets_and_models_forward_like_caffe(oracle, tmp_path, net_text, weights_format):
    weights = _current_weights(net_text, seed=3)
    model = {"current": lambda w: w, "V1": _v1_caffemodel, "V0": _v0_caffemodel}[weights_format](weights)
    prototxt, caffemodel = _write(tmp_path / "net.prototxt", net_text), tmp_path / "w.caffemodel"
    io.write_binary(model, caffemodel)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 12, 12)).astype(np.float32)
    theirs = oracle.run(_ORACLE_FORWARD, {"net.prototxt": prototxt, "w.caffemodel": caffemodel, "x.npy": x})
    net = Net.from_prototxt(prototxt, "TEST", seed=11)
    assert set(net.load_caffemodel(caffemodel)) >= {"conv1", "fc"}
    with torch.no_grad():
        net(keep_blobs=True, data=torch.from_numpy(x))
    assert len(net.layers) == int(theirs["layers"][0])                # Input layer included
    for name in ("conv1", "fc"):
        np.testing.assert_allclose(net.blobs[name].numpy(), theirs[name], rtol=1e-5, atol=1e-5)
