"""convert-vgg: torchvision's VGG16 state dict → the fork's fc-reduced VGG16 caffemodel."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deeper_ssd import cli, convert_vgg, io
from deeper_ssd.builder import zoo
from deeper_ssd.net import Net

BASE_LAYERS = [name for name, _ in convert_vgg.VGG16_CONVS] + ["fc6", "fc7"]


def hankel(rows, cols, seed):
    """A ``rows x cols`` float32 view whose entry (r, c) is ``buffer[r + c]`` (random): each
    decimation offset picks other values, and the 400 MB fc6 costs only its first row."""
    buffer = np.random.default_rng(seed).standard_normal(rows + cols).astype(np.float32)
    return np.lib.stride_tricks.as_strided(buffer, (rows, cols), (4, 4), writeable=False), buffer


def torchvision_state(seed=0):
    """Random weights in torchvision's VGG16 layout (He-scaled, so 13 layers keep a range)."""
    rng = np.random.default_rng(seed)
    state, channels_in = {}, 3
    for name, index in convert_vgg.VGG16_CONVS:
        channels_out = {"1": 64, "2": 128, "3": 256}.get(name[4], 512)
        std = np.sqrt(2.0 / (9 * channels_in))
        state[f"features.{index}.weight"] = rng.normal(0, std, (channels_out, channels_in, 3, 3)).astype(np.float32)
        state[f"features.{index}.bias"] = rng.normal(0, 0.1, channels_out).astype(np.float32)
        channels_in = channels_out
    state["classifier.0.weight"], fc6_buffer = hankel(4096, 25088, seed + 1)
    state["classifier.0.bias"] = rng.standard_normal(4096).astype(np.float32)
    state["classifier.3.weight"], fc7_buffer = hankel(4096, 4096, seed + 2)
    state["classifier.3.bias"] = rng.standard_normal(4096).astype(np.float32)
    state["classifier.6.weight"] = rng.standard_normal((1000, 4096)).astype(np.float32)
    state["classifier.6.bias"] = rng.standard_normal(1000).astype(np.float32)
    return state, fc6_buffer, fc7_buffer


def torchvision_conv5_3(state, rgb01):
    """torchvision's ``vgg16().features[:30]`` (through relu5_3) in plain torch on RGB [0, 1]."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (rgb01 - mean) / std
    for name, index in convert_vgg.VGG16_CONVS:
        x = F.relu(F.conv2d(x, torch.from_numpy(state[f"features.{index}.weight"]),
                            torch.from_numpy(state[f"features.{index}.bias"]), padding=1))
        if name.endswith("_3" if name[4] in "345" else "_2") and name != "conv5_3":
            x = F.max_pool2d(x, 2, 2)
    return x


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vgg")
    state, fc6_buffer, fc7_buffer = torchvision_state()
    saved = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    # the fc matrices as the same Hankel views over their small buffers (a file of a few MB)
    saved["classifier.0.weight"] = torch.from_numpy(fc6_buffer).as_strided((4096, 25088), (1, 1))
    saved["classifier.3.weight"] = torch.from_numpy(fc7_buffer).as_strided((4096, 4096), (1, 1))
    torch.save(saved, folder / "vgg16.pth")
    names = convert_vgg.convert_file(folder / "vgg16.pth", folder / "base.caffemodel")
    return dict(folder=folder, state=state, fc6=fc6_buffer, fc7=fc7_buffer, names=names,
                model=folder / "base.caffemodel")


def test_conv5_3_equals_torchvision_away_from_the_border(converted):
    size = 224                                                   # conv5_3: 14 x 14
    rgb = np.random.default_rng(5).integers(0, 256, (size, size, 3)).astype(np.float32)
    ours_net = Net(convert_vgg.base_net(size), "TEST")
    assert ours_net.load_caffemodel(converted["model"]) == BASE_LAYERS
    caffe_input = rgb[:, :, ::-1] - np.array([104, 117, 123], np.float32)        # BGR - mean
    with torch.no_grad():
        ours_net.forward(keep_blobs=True, data=torch.from_numpy(caffe_input.transpose(2, 0, 1).copy())[None])
        ours = ours_net.blobs["conv5_3"][0].numpy()
        theirs = torchvision_conv5_3(converted["state"], torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None] / 255)[0].numpy()
    assert ours.shape == theirs.shape == (512, 14, 14)
    scale = np.abs(theirs).max()
    assert scale > 0
    inner = (slice(None), slice(6, -6), slice(6, -6))            # the border effect reaches 6 cells in
    inner_diff = np.abs(ours[inner] - theirs[inner]).max()
    assert inner_diff <= 1e-5 * scale                          # float32 rounding over 13 layers
    # at the border the padding differs (pixel 255 x mean in torchvision, the Caffe mean here):
    # small, since the two means are close, but well above rounding
    border_diff = np.abs(ours[:, 0] - theirs[:, 0]).max()
    print(f"conv5_3 max |diff| / max: interior {inner_diff / scale:.2g}, first row {border_diff / scale:.2g}")
    assert border_diff > 10 * inner_diff


def test_fc6_fc7_are_decimated_as_deeplab(converted):
    model = {layer.name: [io.blob_to_array(b) for b in layer.blobs]
             for layer in io.read_caffemodel(converted["model"]).layer if len(layer.blobs)}
    assert list(model) == BASE_LAYERS == converted["names"]
    (fc6, fc6_bias), (fc7, fc7_bias) = model["fc6"], model["fc7"]
    assert fc6.shape == (1024, 512, 3, 3) and fc7.shape == (1024, 1024, 1, 1)
    o, c, y, x = np.meshgrid(np.arange(1024), np.arange(512), np.arange(3), np.arange(3), indexing="ij")
    # fc6 row 4o, input c*49 + (3y)*7 + 3x; the Hankel view holds buffer[row + column]
    assert np.array_equal(fc6, converted["fc6"][4 * o + c * 49 + 21 * y + 3 * x])
    assert np.array_equal(fc6_bias, converted["state"]["classifier.0.bias"][::4])
    o, i = np.meshgrid(np.arange(1024), np.arange(1024), indexing="ij")
    assert np.array_equal(fc7[:, :, 0, 0], converted["fc7"][4 * o + 4 * i])
    assert np.array_equal(fc7_bias, converted["state"]["classifier.3.bias"][::4])
    conv2 = converted["state"]["features.2.weight"]
    assert np.array_equal(model["conv1_2"][0], conv2)           # other convolutions copied as they are
    net = {layer.name: layer for layer in io.read_caffemodel(converted["model"]).layer}
    assert net["fc6"].convolution_param.dilation == [6] and net["fc6"].convolution_param.pad == [6]


def test_zoo_net_takes_every_base_layer_and_the_trainer_lists_them(converted, tmp_path):
    from deeper_ssd.solver import Solver
    model = zoo.get("ssd300")
    zoo.write_model(model, str(tmp_path))
    solver_param = io.read_solver(tmp_path / "ssd300" / "solver.prototxt")
    solver_param.train_net = str(tmp_path / "ssd300" / "train.prototxt")
    del solver_param.test_net[:]
    del solver_param.test_iter[:]
    solver_param.ClearField("test_interval")
    solver_param.snapshot_prefix = str(tmp_path / "snap")
    lines = []
    solver = Solver(solver_param, device="cpu", log=lines.append)
    solver.load_weights([str(converted["model"])])
    solver.close()
    assert [line.split()[-1] for line in lines if line.startswith("Copying source layer")] == BASE_LAYERS
    assert lines[-1].endswith(f"{len(BASE_LAYERS)} layer(s) copied")


def test_cli_and_refusals(converted, tmp_path, capsys):
    assert cli.main(["convert-vgg", str(converted["folder"] / "vgg16.pth"), str(tmp_path / "b.caffemodel")]) == 0
    assert "15 layers (conv1_1, conv1_2" in capsys.readouterr().out
    assert (tmp_path / "b.caffemodel").read_bytes() == converted["model"].read_bytes()
    state = {k: torch.zeros(1) for k in ("features.0.weight",)}
    torch.save(state, tmp_path / "bad.pth")
    assert cli.main(["convert-vgg", str(tmp_path / "bad.pth"), str(tmp_path / "c.caffemodel")]) == 2
    assert "'features.0.weight' has shape (1,), VGG16 needs (64, 3, 3, 3)" in capsys.readouterr().err
    # torchvision's own vgg16-397923af.pth predates the zip format: the legacy format loads too
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "legacy.pth",
               _use_new_zipfile_serialization=False)
    assert cli.main(["convert-vgg", str(tmp_path / "legacy.pth"), str(tmp_path / "c.caffemodel")]) == 2
    assert "no 'features.0.bias' in the state dict" in capsys.readouterr().err
    (tmp_path / "text.pth").write_text("not a pickle")
    assert cli.main(["convert-vgg", str(tmp_path / "text.pth"), str(tmp_path / "c.caffemodel")]) == 2
    assert "not a PyTorch state dict" in capsys.readouterr().err
    assert cli.main(["convert-vgg", str(tmp_path / "none.pth"), str(tmp_path / "c.caffemodel")]) == 2
    assert not (tmp_path / "c.caffemodel").exists()
    assert cli.main(["convert-vgg", str(tmp_path / "bad.pth"), str(tmp_path / "c.caffemodel"), "--mean", "1,2"]) == 2


def test_mean_offset_is_folded_into_conv1_1():
    state, _, _ = torchvision_state(3)
    blobs = convert_vgg.convert_state_dict(state)
    weight, bias = state["features.0.weight"].astype(np.float64), state["features.0.bias"].astype(np.float64)
    std = 255 * np.array([0.229, 0.224, 0.225])
    # one input pixel value per channel everywhere: the converted conv on the Caffe input equals
    # torchvision's conv on its normalised input, tap sums included (an interior position)
    rgb = np.array([30.0, 200.0, 90.0])
    theirs = np.einsum("ochw,c->o", weight, (rgb - 255 * np.array([0.485, 0.456, 0.406])) / std) + bias
    bgr_input = rgb[::-1] - np.array([104.0, 117.0, 123.0])
    ours = np.einsum("ochw,c->o", blobs["conv1_1"][0].astype(np.float64), bgr_input) + blobs["conv1_1"][1]
    assert np.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_from_caffes_vgg16_layers_convs_copied_fc_decimated():
    """Caffe's VGG16 (blobs as a V1 file holds them: legacy 1 x 1 x rows x cols fc weights)."""
    state, fc6_buffer, fc7_buffer = torchvision_state(4)
    layers = {name: [state[f"features.{index}.weight"], state[f"features.{index}.bias"].reshape(1, 1, 1, -1)]
              for name, index in convert_vgg.VGG16_CONVS}
    layers["fc6"] = [np.lib.stride_tricks.as_strided(fc6_buffer, (1, 1, 4096, 25088), (0, 0, 4, 4)),
                     state["classifier.0.bias"].reshape(1, 1, 1, -1)]
    layers["fc7"] = [np.lib.stride_tricks.as_strided(fc7_buffer, (1, 1, 4096, 4096), (0, 0, 4, 4)),
                     state["classifier.3.bias"].reshape(1, 1, 1, -1)]
    out = convert_vgg.convert_caffe_vgg16(layers)
    assert list(out) == BASE_LAYERS
    for name, index in convert_vgg.VGG16_CONVS:                  # already BGR, 0-255, mean-subtracted
        assert np.array_equal(out[name][0], state[f"features.{index}.weight"])
        assert np.array_equal(out[name][1], state[f"features.{index}.bias"])
    o, c, y, x = np.meshgrid(np.arange(1024), np.arange(512), np.arange(3), np.arange(3), indexing="ij")
    assert np.array_equal(out["fc6"][0], fc6_buffer[4 * o + c * 49 + 21 * y + 3 * x])
    assert np.array_equal(out["fc7"][1], state["classifier.3.bias"][::4])
    del layers["fc7"]
    with pytest.raises(convert_vgg.VGGConversionError, match="no layer 'fc7'"):
        convert_vgg.convert_caffe_vgg16(layers)


def test_v1_caffemodel_is_read_and_checked(tmp_path, capsys):
    from deeper_ssd.proto import caffe_pb2
    net = caffe_pb2.NetParameter(name="VGG_ILSVRC_16_layers")
    for name, shape in (("conv1_1", (64, 3, 3, 3)), ("conv1_2", (64, 3, 3, 3))):
        layer = net.layers.add(name=name, type=caffe_pb2.V1LayerParameter.CONVOLUTION)
        for dims in (shape, (1, 1, 1, shape[0])):
            blob = layer.blobs.add(num=dims[0], channels=dims[1], height=dims[2], width=dims[3])
            blob.data.extend(np.zeros(int(np.prod(dims)), np.float32))
    io.write_caffemodel(net, tmp_path / "VGG_ILSVRC_16_layers.caffemodel")
    assert cli.main(["convert-vgg", str(tmp_path / "VGG_ILSVRC_16_layers.caffemodel"), str(tmp_path / "o.caffemodel")]) == 2
    assert "layer 'conv1_2' blob 0 has shape (64, 3, 3, 3), VGG16 needs (64, 64, 3, 3)" in capsys.readouterr().err
    assert not (tmp_path / "o.caffemodel").exists()


def test_caffe_reads_the_converted_model_and_computes_the_same_fc7(oracle, converted):
    size = 96                                                    # fc7: 6 x 6
    net_param = convert_vgg.base_net(size)
    x = np.random.default_rng(8).uniform(-120, 130, (1, 3, size, size)).astype(np.float32)
    caffe = oracle.run("net = caffe.Net('net.prototxt', 'base.caffemodel', caffe.TEST)\n"
                       "net.blobs['data'].data[...] = np.load('x.npy')\nnet.forward()\n"
                       "out['conv5_3'] = net.blobs['conv5_3'].data.copy()\nout['fc7'] = net.blobs['fc7'].data.copy()\n",
                       {"net.prototxt": io.message_to_text(net_param), "base.caffemodel": converted["model"], "x.npy": x})
    ours_net = Net(net_param, "TEST")
    ours_net.load_caffemodel(converted["model"])
    with torch.no_grad():
        ours_net.forward(keep_blobs=True, data=torch.from_numpy(x))
    for name in ("conv5_3", "fc7"):
        ours = ours_net.blobs[name].numpy()
        assert ours.shape == caffe[name].shape and (caffe[name] > 0).mean() > 0.05
        assert np.abs(ours - caffe[name]).max() <= 1e-4 * np.abs(caffe[name]).max(), name
