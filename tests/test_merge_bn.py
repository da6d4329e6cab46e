"""merge-bn: BatchNorm/Scale/Bias chains folded into convolutions give the unmerged net's outputs
(here, in OpenCV and in real Caffe), on the zoo's BatchNorm model and on hand-written nets with
depthwise, grouped-deconvolution and bias-free convolutions; unfoldable BatchNorms stay."""
import numpy as np
import pytest
import torch

from deeper_ssd import io
from deeper_ssd.builder import zoo
from deeper_ssd.cli import main
from deeper_ssd.merge_bn import max_relative_difference, merge_bn
from deeper_ssd.net import Net
from deeper_ssd.opencv_check import compare
from deeper_ssd.proto import caffe_pb2

_CONVS = '''
name: "dw"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 9 dim: 9 } } }
layer { name: "dw" type: "Convolution" bottom: "data" top: "dw"
        convolution_param { num_output: 4 group: 4 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "dw_bn" type: "BatchNorm" bottom: "dw" top: "dw" batch_norm_param { eps: 0.001 } }
layer { name: "dw_scale" type: "Scale" bottom: "dw" top: "dw" scale_param { bias_term: true } }
layer { name: "dw_relu" type: "ReLU" bottom: "dw" top: "dw" }
layer { name: "pw" type: "Convolution" bottom: "dw" top: "pw" convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "pw_bn" type: "BatchNorm" bottom: "pw" top: "pw_bn" }
layer { name: "pw_scale" type: "Scale" bottom: "pw_bn" top: "pw_scale" }
layer { name: "pw_bias" type: "Bias" bottom: "pw_scale" top: "pw_out" }
layer { name: "up" type: "Deconvolution" bottom: "pw_out" top: "up"
        convolution_param { num_output: 4 group: 2 kernel_size: 2 stride: 2 } }
layer { name: "up_bn" type: "BatchNorm" bottom: "up" top: "up" batch_norm_param { use_global_stats: true } }
layer { name: "up_scale" type: "Scale" bottom: "up" top: "up" scale_param { bias_term: true } }
'''

# BatchNorms that must stay: batch statistics, a convolution output read twice, no convolution
_KEPT = '''
layer { name: "c1" type: "Convolution" bottom: "up" top: "c1" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "c1_bn" type: "BatchNorm" bottom: "c1" top: "c1_bn" batch_norm_param { use_global_stats: false } }
layer { name: "c2" type: "Convolution" bottom: "up" top: "c2" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "c2_bn" type: "BatchNorm" bottom: "c2" top: "c2_bn" }
layer { name: "c2_relu" type: "ReLU" bottom: "c2" top: "c2_relu" }
layer { name: "cat" type: "Concat" bottom: "c1_bn" bottom: "c2_bn" top: "cat" }
layer { name: "cat_bn" type: "BatchNorm" bottom: "cat" top: "cat" }
'''


def _randomise(deploy: caffe_pb2.NetParameter, seed: int) -> caffe_pb2.NetParameter:
    """Random weights (He-normal convolutions, random Scale/Bias/convolution biases) and BatchNorm
    statistics of one TRAIN forward on an image-like input, so activations stay normalised as in
    a trained net (variance + 0.5; a layer with fixed global statistics gets random ones), stored
    with a moving-average weight other than 1 (so the factor matters)."""
    rng = np.random.default_rng(seed)
    net = Net(deploy, "TRAIN", seed=seed)
    fill = lambda blob, values: blob.copy_(torch.from_numpy(values))
    with torch.no_grad():
        for layer in net.layers:
            blobs = layer.blobs
            if layer.caffe_type in ("Convolution", "Deconvolution"):
                fan_in = blobs[0][0].numel() if layer.caffe_type == "Convolution" else blobs[0].shape[0] // layer.group
                fill(blobs[0], rng.normal(0, np.sqrt(2.0 / fan_in), blobs[0].shape))
            if layer.caffe_type in ("Scale", "Bias") or (layer.caffe_type in ("Convolution", "Deconvolution")
                                                         and len(blobs) > 1):
                fill(blobs[-1], rng.normal(0, 0.3, blobs[-1].shape))
            if layer.caffe_type == "Scale":
                fill(blobs[0], rng.uniform(0.5, 1.5, blobs[0].shape))
        data = net.inputs[0]
        net(**{data: torch.from_numpy(rng.uniform(-120, 130, net.blob_shapes[data]).astype(np.float32))})
        for layer in net.layers:
            if layer.caffe_type == "BatchNorm":
                mean, var, weight = layer.blobs
                if float(weight) == 0:                           # use_global_stats: no update
                    fill(mean, rng.normal(0, 0.5, mean.shape))
                    fill(var, rng.uniform(0.2, 2.0, var.shape))
                    weight.fill_(1.0)
                var.add_(0.5 * weight)                           # no variance near 0 (1x1 maps, one image)
                factor = rng.uniform(0.5, 4.0)                   # each channel's mean and variance unchanged
                for blob in layer.blobs:
                    blob.mul_(factor)
    return net.to_proto()


def _net(text):
    return io.parse_text(text, caffe_pb2.NetParameter())


def _merged(deploy, seed=0):
    weights = _randomise(deploy, seed)
    merged, model, report = merge_bn(deploy, weights)
    return weights, merged, model, report


def test_depthwise_bias_free_and_grouped_deconvolution_fold_exactly():
    deploy = _net(_CONVS)
    weights, merged, model, report = _merged(deploy)
    assert report.folded == {"dw": ["dw_bn", "dw_scale"], "pw": ["pw_bn", "pw_scale", "pw_bias"],
                             "up": ["up_bn", "up_scale"]}
    assert report.kept == []
    assert [lp.type for lp in merged.layer] == ["Input", "Convolution", "ReLU", "Convolution", "Deconvolution"]
    assert [list(lp.top) for lp in merged.layer[1:]] == [["dw"], ["dw"], ["pw_out"], ["up"]]
    assert merged.layer[1].convolution_param.bias_term                           # was bias_term: false
    assert [len(lp.blobs) for lp in model.layer] == [0, 2, 0, 2, 2]
    differences = max_relative_difference(deploy, weights, merged, model)
    assert set(differences) == {"up"} and differences["up"] < 1e-5


def test_unfoldable_batchnorms_stay_and_say_why():
    deploy = _net(_CONVS + _KEPT)
    weights, merged, model, report = _merged(deploy, seed=1)
    kept = dict(report.kept)
    assert set(kept) == {"c1_bn", "c2_bn", "cat_bn"}
    assert "use_global_stats: false" in kept["c1_bn"] and "also read" in kept["c2_bn"]
    assert "cat_bn" in [lp.name for lp in merged.layer]            # after a Concat: nothing to fold into
    differences = max_relative_difference(deploy, weights, merged, model)
    assert set(differences) == {"cat", "c2_relu"} and max(differences.values()) < 1e-5


def test_zoo_batchnorm_model_merges_completely_and_runs_in_opencv(tmp_path):
    deploy = zoo.get("deeper_ssd500_tiny").nets()["deploy"]
    weights, merged, model, report = _merged(deploy, seed=2)
    bn = [lp.name for lp in deploy.layer if lp.type == "BatchNorm"]
    assert len(bn) == 29 and report.kept == [] and sum(map(len, report.folded.values())) == 58
    assert not any(lp.type in ("BatchNorm", "Scale") for lp in merged.layer)
    differences = max_relative_difference(deploy, weights, merged, model)
    assert set(differences) == {"mbox_loc", "mbox_conf_flatten", "mbox_priorbox"}
    assert max(differences.values()) <= 1e-4, differences
    _opencv_agrees(merged, model, tmp_path)


def test_depthwise_merged_files_give_the_unmerged_output_in_opencv(tmp_path):
    import cv2
    deploy = _net(_CONVS)
    weights, merged, model, _ = _merged(deploy, seed=3)
    io.write_net(merged, tmp_path / "merged.prototxt")
    io.write_caffemodel(model, tmp_path / "merged.caffemodel")
    cv_net = cv2.dnn.readNetFromCaffe(str(tmp_path / "merged.prototxt"), str(tmp_path / "merged.caffemodel"))
    x = np.random.default_rng(3).uniform(-120, 130, (2, 4, 9, 9)).astype(np.float32)
    cv_net.setInput(x, "data")
    theirs = cv_net.forward()
    net = Net(deploy, "TEST")
    net.load_caffemodel(weights)
    with torch.no_grad():
        ours = net(data=torch.from_numpy(x))["up"].numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())


def _opencv_agrees(merged, model, tmp_path):
    io.write_net(merged, tmp_path / "merged.prototxt")
    io.write_caffemodel(model, tmp_path / "merged.caffemodel")
    result = compare(tmp_path / "merged.prototxt", tmp_path / "merged.caffemodel")
    assert len(result.layers) >= len(merged.layer) - 2 and not result.failures(1e-4)


@pytest.mark.parametrize("case", ["hand-written", "zoo"])
def test_merged_files_match_the_unmerged_net_in_caffe(oracle, case):
    if case == "zoo":
        deploy, blobs = zoo.get("deeper_ssd500_tiny").nets()["deploy"], ("mbox_loc", "mbox_conf_flatten")
    else:
        deploy, blobs = _net(_CONVS + _KEPT.replace("batch_norm_param { use_global_stats: false }", "")), ("cat", "c2_relu")
    weights, merged, model, report = _merged(deploy, seed=4)
    assert {name for name, _ in report.kept} == (set() if case == "zoo" else {"c2_bn", "cat_bn"})
    net = Net(deploy, "TEST")
    net.load_caffemodel(weights)
    x = np.random.default_rng(4).uniform(-120, 130, net.blob_shapes["data"]).astype(np.float32)
    with torch.no_grad():
        net(keep_blobs=True, data=torch.from_numpy(x))
    theirs = oracle.run(f'''
        for tag in ("plain", "merged"):
            net = caffe.Net(tag + ".prototxt", tag + ".caffemodel", caffe.TEST)
            net.blobs["data"].data[...] = np.load("x.npy")
            net.forward()
            for name in {blobs!r}:
                out[tag + "_" + name] = net.blobs[name].data.copy()
    ''', {"plain.prototxt": io.message_to_text(deploy), "plain.caffemodel": weights.SerializeToString(),
          "merged.prototxt": io.message_to_text(merged), "merged.caffemodel": model.SerializeToString(),
          "x.npy": x})
    for name in blobs:
        ours = net.blobs[name].numpy()
        for tag in ("plain", "merged"):
            np.testing.assert_allclose(theirs[f"{tag}_{name}"], ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max(),
                                       err_msg=f"{tag} {name}")


def test_cli_merge_bn_writes_both_files_and_refuses_missing_weights(tmp_path, capsys):
    deploy = _net(_CONVS)
    weights = _randomise(deploy, 5)
    io.write_net(deploy, tmp_path / "deploy.prototxt")
    io.write_caffemodel(weights, tmp_path / "w.caffemodel")
    args = [str(tmp_path / name) for name in ("deploy.prototxt", "w.caffemodel", "m.prototxt", "m.caffemodel")]
    assert main(["merge-bn"] + args) == 0
    out = capsys.readouterr().out
    assert "folded 7 layers into 3 convolutions" in out and "max relative difference" in out
    assert len(io.read_net(tmp_path / "m.prototxt").layer) == 5
    del weights.layer[1:]
    io.write_caffemodel(weights, tmp_path / "w.caffemodel")
    assert main(["merge-bn"] + args) == 2
    assert "the weights have no blobs for layer(s) dw" in capsys.readouterr().err
