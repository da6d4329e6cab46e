"""SR-TOD (docs/srtod.md): the four layer types against hand-computed values and float64 gradcheck,
the threshold's zero / straight-through gradients, static shapes, the builder on Deeper SSD500
and SSD300, the committed prototxt, the diffmap and opencv-check commands."""
import filecmp
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from deeper_ssd import cli, io, shapes
from deeper_ssd.layers import LayerError
from deeper_ssd.net import Net
from deeper_ssd.opencv_check import OpenCVUnsupported, unsupported_layers
from deeper_ssd.proto import caffe_pb2
from deeper_ssd.builder import heads, zoo
from deeper_ssd.builder.netspec import L, NetSpec
from support import REPO
from support.layers import build, run_ours
from support.opencv import compare_with_opencv

sigmoid = lambda v: 1 / (1 + math.exp(-v))


def _dgfe(extra="", p_shape=(1, 2, 2, 2), d_shape=(1, 1, 4, 4)):
    text = f'name: "e" type: "DGFE" bottom: "p" bottom: "d" top: "y" dgfe_param {{ {extra} }}'
    return build(text, [p_shape, d_shape]).to(torch.float64)


# ---------------------------------------------------------------------------------------------
# DenormalizeImage, DifferenceMap, MSELoss

def test_denormalize_image_undoes_mean_and_scale_and_turns_bgr_into_rgb():
    text = ('name: "i" type: "DenormalizeImage" bottom: "data" top: "img" denormalize_image_param '
            '{ mean_value: 104 mean_value: 117 mean_value: 123 scale: 0.5 }')
    data = np.array([-52.0, 69.0, 66.0]).reshape(1, 3, 1, 1)      # (pixel - mean) * 0.5
    image = run_ours(text, [data])["tops"][0]
    np.testing.assert_allclose(image.ravel(), [255 / 255, 255 / 255, 0 / 255])   # R=255 G=255 B=0
    keep = text.replace("scale: 0.5", "scale: 0.5 bgr_to_rgb: false output_scale: 1")
    np.testing.assert_allclose(run_ours(keep, [data])["tops"][0].ravel(), [0, 255, 255])
    one_mean = ('name: "i" type: "DenormalizeImage" bottom: "d" top: "i" '
                'denormalize_image_param { mean_value: 10 }')
    np.testing.assert_allclose(run_ours(one_mean, [np.zeros((1, 3, 1, 1))])["tops"][0].ravel(),
                               [10 / 255] * 3)
    with pytest.raises(LayerError, match="mean_value has 2 values for 3 channels"):
        build('name: "i" type: "DenormalizeImage" bottom: "d" top: "i" denormalize_image_param '
              '{ mean_value: 1 mean_value: 2 }', [(1, 3, 4, 4)])


def test_difference_map_is_the_channel_mean_of_the_absolute_difference():
    text = 'name: "m" type: "DifferenceMap" bottom: "r" bottom: "i" top: "d"'
    recon = np.array([0.5, 0.2, 1.0, 0.0, 0.3, 0.3]).reshape(1, 3, 1, 2)
    image = np.array([0.1, 0.2, 0.4, 0.5, 0.3, 0.0]).reshape(1, 3, 1, 2)
    out = run_ours(text, [recon, image], top_grads=[np.ones((1, 1, 1, 2))])
    np.testing.assert_allclose(out["tops"][0].ravel(), [(0.4 + 0.6 + 0.0) / 3, (0.0 + 0.5 + 0.3) / 3])
    # d/d recon = sign(recon - image) / C (0 where equal), d/d image the opposite
    np.testing.assert_allclose(out["bottom_grads"][0].ravel(), np.array([1, 0, 1, -1, 0, 1]) / 3)
    assert build(text, [(2, 3, 5, 7)] * 2).top_shapes == [(2, 1, 5, 7)]
    with pytest.raises(LayerError, match="crop the reconstruction"):
        build(text, [(1, 3, 304, 304), (1, 3, 300, 300)])


def test_difference_map_high_freq_removes_low_frequencies_only():
    text = ('name: "m" type: "DifferenceMap" bottom: "r" bottom: "i" top: "d" '
            'difference_map_param { mode: HIGH_FREQ cutoff: 0.25 }')
    image = np.zeros((1, 3, 8, 8))
    flat = run_ours(text, [image + 0.3, image])["tops"][0]          # a constant difference: DC only
    np.testing.assert_allclose(flat, 0, atol=1e-12)
    checker = 0.2 * (-1.0) ** np.add.outer(np.arange(8), np.arange(8))   # radius 0.707 > cutoff
    sharp = run_ours(text, [image + checker, image])["tops"][0]
    np.testing.assert_allclose(sharp, 0.2, rtol=1e-12)
    with pytest.raises(LayerError, match="cutoff"):
        build(text.replace("cutoff: 0.25", ""), [(1, 3, 8, 8)] * 2)


@pytest.mark.parametrize("mode", ["", "difference_map_param { mode: HIGH_FREQ cutoff: 0.2 }"])
def test_difference_map_gradcheck(mode):
    layer = build(f'name: "m" type: "DifferenceMap" bottom: "r" bottom: "i" top: "d" {mode}',
                  [(2, 3, 5, 6)] * 2).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    recon = torch.rand(2, 3, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    image = torch.rand(2, 3, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (recon, image))


def test_mse_loss_is_the_mean_over_all_elements_not_euclidean_loss():
    text = 'name: "l" type: "MSELoss" bottom: "r" bottom: "i" top: "loss"'
    pred, target = np.arange(8.0).reshape(2, 1, 2, 2), np.ones((2, 1, 2, 2))
    squares = ((pred - target) ** 2).sum()                           # 1+0+1+4+9+16+25+36 = 92
    out = run_ours(text, [pred, target], top_grads=[np.array(1.0)])
    assert out["tops"][0] == pytest.approx(squares / 8)              # EuclideanLoss: 92 / (2*2)
    np.testing.assert_allclose(out["bottom_grads"][0], 2 * (pred - target) / 8)
    batch = run_ours(text + " mse_loss_param { normalization: BATCH }", [pred, target])
    assert batch["tops"][0] == pytest.approx(squares / 2)
    layer = build(text, [(2, 3, 4, 4)] * 2)
    assert layer.top_shapes == [()] and layer.is_loss
    with pytest.raises(LayerError, match="one shape"):
        build(text, [(2, 3, 4, 4), (2, 3, 4, 5)])
    layer = layer.to(torch.float64)
    args = [torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(layer, args)


# ---------------------------------------------------------------------------------------------
# DGFE

_P = np.array([[[1, 2], [3, 4]], [[0, -1], [-2, 5]]], dtype=float)[None]          # 1 x 2 x 2 x 2
_MLP = [np.array([[1.0, 1.0]]), np.array([-1.0]), np.array([[1.0], [-2.0]]), np.array([0.5, 0.0])]
_D = np.array([[0.5, 0.0, 0.25, 0.9],
               [0.0, 0.0, 0.0, 0.0],
               [0.1, 0.9, 0.3, 0.0],
               [0.0, 0.0, 0.0, 0.0]])[None, None]


def test_dgfe_by_hand_nearest_and_max_resize():
    # avg (2.5, 0.5) -> relu(3 - 1) = 2 -> (2.5, -4); max (4, 5) -> relu(9 - 1) = 8 -> (8.5, -16)
    s = np.array([sigmoid(11.0), sigmoid(-20.0)])[None, :, None, None]
    blobs = _MLP + [np.array([0.25])]
    text = 'name: "e" type: "DGFE" bottom: "p" bottom: "d" top: "y" dgfe_param { reduction_ratio: 2 }'
    # nearest samples D[0,0]=.5, D[0,2]=.25 (= t: sign 0 -> 1/2), D[2,0]=.1, D[2,2]=.3
    nearest = run_ours(text, [_P, _D], blobs=blobs)["tops"][0]
    np.testing.assert_allclose(nearest, _P * s * (np.array([[1, 0.5], [0, 1]]) + 1), rtol=1e-12)
    # the block maxima of the mask are all 1
    maxed = run_ours(text.replace("reduction_ratio: 2", "reduction_ratio: 2 resize: MAX"), [_P, _D],
                     blobs=blobs)["tops"][0]
    np.testing.assert_allclose(maxed, _P * s * 2, rtol=1e-12)
    no_offset = run_ours(text.replace("reduction_ratio: 2", "reduction_ratio: 2 mask_offset: 0"),
                         [_P, _D], blobs=blobs)["tops"][0]
    np.testing.assert_allclose(no_offset, _P * s * np.array([[1, 0.5], [0, 1]]), rtol=1e-12)


@pytest.mark.parametrize("image,grid", [(500, 63), (300, 38)])
def test_dgfe_nearest_resize_takes_pytorch_legacy_floor_indices(image, grid):
    rng = np.random.default_rng(0)
    d = rng.uniform(0, 1, (1, 1, image, image))
    layer = _dgfe("reduction_ratio: 1 mask_offset: 0 initial_threshold: 0.5", (1, 1, grid, grid),
                  (1, 1, image, image))
    for blob, value in zip(layer.blobs, (0.0, 0.0, 0.0, 100.0, 0.5)):  # s = sigmoid(200) = 1
        blob.data.fill_(value)
    out = layer(torch.ones(1, 1, grid, grid, dtype=torch.float64), torch.from_numpy(d))
    rows = np.arange(grid) * image // grid                       # floor(i * H / h)
    expected = (np.sign(d[0, 0][np.ix_(rows, rows)] - 0.5) + 1) / 2
    np.testing.assert_array_equal(out[0, 0].detach().numpy(), expected)


def test_dgfe_blobs_fillers_and_shape_rules():
    layer = build('name: "e" type: "DGFE" bottom: "p" bottom: "d" top: "y"',
                  [(2, 512, 63, 63), (2, 1, 500, 500)])
    assert [tuple(b.shape) for b in layer.blobs] == [(32, 512), (32,), (512, 32), (512,), (1,)]
    assert layer.top_shapes == [(2, 512, 63, 63)]
    fillers = layer.blob_fillers
    assert fillers[0].type == "uniform" and fillers[0].max == pytest.approx(1 / math.sqrt(512))
    assert fillers[2].max == pytest.approx(1 / math.sqrt(32)) and fillers[3].max == fillers[2].max
    assert fillers[4].type == "constant" and fillers[4].value == pytest.approx(0.0156862)
    no_bias = build('name: "e" type: "DGFE" bottom: "p" bottom: "d" top: "y" dgfe_param '
                    '{ bias_term: false weight_filler { type: "xavier" } initial_threshold: 0.1568627 }',
                    [(1, 64, 8, 8), (1, 1, 32, 32)])
    assert [tuple(b.shape) for b in no_bias.blobs] == [(4, 64), (64, 4), (1,)]
    assert no_bias.blob_fillers[0].type == "xavier"
    assert no_bias.blob_fillers[2].value == pytest.approx(40 / 255)
    with pytest.raises(LayerError, match="difference map N x 1 x H x W"):
        build('name: "e" type: "DGFE" bottom: "p" bottom: "d" top: "y"', [(1, 64, 8, 8), (1, 3, 32, 32)])
    with pytest.raises(LayerError, match="no hidden unit"):
        build('name: "e" type: "DGFE" bottom: "p" bottom: "d" top: "y"', [(1, 8, 8, 8), (1, 1, 32, 32)])


@pytest.mark.parametrize("resize", ["NEAREST", "MAX"])
def test_dgfe_gradcheck_feature_and_mlp(resize):
    layer = _dgfe(f"reduction_ratio: 2 resize: {resize}", (2, 4, 3, 3), (2, 1, 7, 7))
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    d = torch.rand(2, 1, 7, 7, dtype=torch.float64, generator=gen)
    params = [torch.randn(tuple(b.shape), dtype=torch.float64, generator=gen, requires_grad=True)
              for b in list(layer.blobs)[:4]]
    t = torch.tensor([0.5], dtype=torch.float64)

    def run(p, w1, b1, w2, b2):
        state = {f"blobs.{i}": v for i, v in enumerate((w1, b1, w2, b2, t))}
        return functional_call(layer, state, (p, d))
    assert torch.autograd.gradcheck(run, (p, *params))


def _threshold_gradient(extra):
    layer = _dgfe(f"reduction_ratio: 2 {extra}")
    for blob, value in zip(layer.blobs, _MLP + [np.array([0.25])]):
        blob.data.copy_(torch.as_tensor(value))
    d = np.zeros((1, 1, 4, 4))
    d[0, 0, 0, 0], d[0, 0, 0, 2], d[0, 0, 2, 0], d[0, 0, 2, 2] = 0.3, 0.25, 0.1, 0.3   # sampled
    d[0, 0, 1, 1] = 0.26                                                               # not sampled
    p = torch.tensor(_P, requires_grad=True)
    d = torch.tensor(d, requires_grad=True)
    out = layer(p, d)
    out.sum().backward()
    return layer, out, p, d


def test_threshold_gets_the_zero_gradient_of_sign_by_default():
    layer, out, p, d = _threshold_gradient("")
    t = layer.blobs[-1]
    assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))
    assert d.grad is None and p.grad is not None and layer.blobs[0].grad.abs().sum() > 0


def test_threshold_straight_through_gradient_by_hand():
    zero_layer, zero_out, *_ = _threshold_gradient("")
    layer, out, p, d = _threshold_gradient("threshold_gradient: STRAIGHT_THROUGH ste_width: 0.1")
    torch.testing.assert_close(out, zero_out)                    # same forward
    s = np.array([sigmoid(11.0), sigmoid(-20.0)])
    dl_dr = (_P[0] * s[:, None, None]).sum(0)                    # d sum(P s (R + 1)) / dR per cell
    # sampled pixels inside |D - t| < 0.1: (0,0) -> cell (0,0), (0,2) -> (0,1), (2,2) -> (1,1)
    width = float(np.float32(0.1))                               # a proto float
    expected = -(dl_dr[0, 0] + dl_dr[0, 1] + dl_dr[1, 1]) / (2 * width)
    assert layer.blobs[-1].grad.item() == pytest.approx(expected, rel=1e-12)
    assert d.grad is None


def test_threshold_param_specs_are_honoured_by_the_net():
    text = """
    layer { name: "p" type: "Input" top: "p" input_param { shape { dim: 1 dim: 16 dim: 4 dim: 4 } } }
    layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 dim: 1 dim: 16 dim: 16 } } }
    layer { name: "e" type: "DGFE" bottom: "p" bottom: "d" top: "y"
            param { lr_mult: 1 } param { lr_mult: 2 } param { lr_mult: 1 } param { lr_mult: 2 }
            param { lr_mult: %s decay_mult: %s } }"""
    net = Net(io.parse_text(text % (1, 1), caffe_pb2.NetParameter()), seed=0)
    entry = [p for p in net.learnable_params if p.layer == "e"][-1]
    assert (entry.index, entry.lr_mult, entry.decay_mult) == (4, 1, 1) and entry.blob.requires_grad
    assert entry.blob.item() == pytest.approx(0.0156862)
    fixed = Net(io.parse_text(text % (0, 0), caffe_pb2.NetParameter()), seed=0)
    assert not fixed.layer_by_name["e"].blobs[-1].requires_grad        # the paper's "Fixed T"


# ---------------------------------------------------------------------------------------------
# the builder

def _rows(model):
    return {r.name: r for r in shapes.infer_shapes(model.nets()["deploy"], caffe_pb2.TEST)}


def test_deeper_ssd500_with_srtod_shapes():
    plain = zoo.get("deeper_ssd500")
    model = heads.with_srtod(plain)
    assert model.name == "deeper_ssd500_srtod"
    rows = _rows(model)
    assert rows["srtod_up1_deconv"].shapes == [(1, 256, 126, 126)]
    assert rows["srtod_up3_conv2"].shapes == [(1, 64, 504, 504)]
    assert rows["srtod_out"].shapes == [(1, 3, 504, 504)]
    assert rows["srtod_recon"].type == "Crop" and rows["srtod_recon"].shapes == [(1, 3, 500, 500)]
    assert rows["srtod_diffmap"].shapes == [(1, 1, 500, 500)]
    assert rows["conv4_3_norm_dgfe"].shapes == [(1, 512, 63, 63)]
    assert rows["conv4_3_norm_dgfe"].bottoms == ["conv4_3_norm", "srtod_diffmap"]
    for head in ("mbox_loc", "mbox_conf", "mbox_priorbox"):
        assert rows[f"conv4_3_norm_{head}"].bottoms[0] == "conv4_3_norm_dgfe"
    assert rows["conv4_3_norm_dgfe"].params == 512 * 32 + 32 + 32 * 512 + 512 + 1
    plain_rows = {r.name: r for r in shapes.infer_shapes(plain.nets()["deploy"], caffe_pb2.TEST)}
    assert rows["detection_out"].shapes == plain_rows["detection_out"].shapes
    assert rows["mbox_priorbox"].shapes == plain_rows["mbox_priorbox"].shapes


def test_ssd300_with_srtod_shapes_match_the_reference_count():
    rows = _rows(heads.with_srtod(zoo.get("ssd300")))
    assert rows["srtod_up3_deconv"].shapes == [(1, 64, 304, 304)]
    assert rows["srtod_recon"].shapes == [(1, 3, 300, 300)]
    assert rows["conv4_3_norm_dgfe"].shapes == [(1, 512, 38, 38)]
    head = sum(r.params for name, r in rows.items() if name.startswith("srtod_"))
    assert head == 4_302_979                                         # reference A.6: ~4.30 M


def test_head_on_another_source_and_stride_four_needs_no_crop():
    model = heads.with_srtod(zoo.get("deeper_ssd500_up1_concat"), heads.SRTOD(source="up1"))
    assert model.name == "deeper_ssd500_up1_concat_srtod_up1"
    rows = _rows(model)
    assert rows["up1_dgfe"].shapes == [(1, 1024, 63, 63)] and rows["up1_mbox_loc"].bottoms == ["up1_dgfe"]
    assert rows["srtod_up1_deconv"].shapes == [(1, 512, 126, 126)]
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 500, 500]))
    n.conv3_3 = L.Input(shape=dict(dim=[1, 256, 125, 125]))
    enhanced = heads.srtod_head(n, heads.SRTOD(), "conv3_3", n.conv3_3, (256, 125, 125), n.data, (500, 500),
                                (104, 117, 123), 1.0, train=False)
    assert enhanced is n.conv3_3_dgfe
    layers = n.to_proto().layer
    names = [layer.name for layer in layers]
    assert "srtod_up3_deconv" not in names and "srtod_sigmoid" not in names
    assert [layer.type for layer in layers if layer.name == "srtod_recon"] == ["Sigmoid"]
    with pytest.raises(ValueError, match="not a prediction source of deeper_ssd500; choose one of conv4_3"):
        heads.with_srtod(zoo.get("deeper_ssd500"), heads.SRTOD(source="up1"))


def test_train_net_has_the_loss_and_test_nets_run_the_head():
    nets = heads.with_srtod(zoo.get("deeper_ssd500_tiny")).nets()
    train = {layer.name: layer for layer in nets["train"].layer}
    loss = train["srtod_loss"]
    assert loss.type == "MSELoss" and list(loss.bottom) == ["srtod_recon", "srtod_image"]
    assert list(loss.propagate_down) == [True, False] and list(loss.loss_weight) == [1.0]
    assert list(train["conv4_3_norm_dgfe"].propagate_down) == [True, False]
    image = train["srtod_image"].denormalize_image_param
    assert list(image.mean_value) == [104, 117, 123] and image.scale == 1
    assert "srtod_loss" not in {layer.name for layer in nets["test"].layer}
    plan = shapes.plan_net(nets["test"], caffe_pb2.TEST, device="meta")
    assert {"srtod_diffmap", "conv4_3_norm_dgfe"} <= {step.layer.name for step in plan.layers}
    train_plan = shapes.plan_net(nets["train"], caffe_pb2.TRAIN, device="meta")
    assert train_plan.blob_shapes["srtod_loss"] == ()


def test_head_gradients_follow_the_official_code():
    """The reconstruction loss reaches the backbone (the head's input is not detached); the
    detection side never reaches the reconstruction head (DGFE sends nothing to the map)."""
    model = heads.with_srtod(zoo.get("ssd300", width=1 / 8))
    net = Net(model.nets()["deploy"], "TEST", seed=0)
    x = torch.empty(1, 3, 300, 300).uniform_(-100, 100, generator=torch.Generator().manual_seed(0))
    grads = lambda name: [b.grad for b in net.layer_by_name[name].blobs]
    net(keep_blobs=True, data=x)
    torch.nn.functional.mse_loss(net.blobs["srtod_recon"], net.blobs["srtod_image"]).backward()
    assert grads("conv1_1")[0].abs().sum() > 0 and grads("srtod_out")[0].abs().sum() > 0
    assert all(g is None for g in grads("conv4_3_norm_dgfe")[:4])
    net.zero_grad(set_to_none=True)
    net(keep_blobs=True, data=x)
    net.blobs["conv4_3_norm_mbox_conf"].sum().backward()
    assert all(g is None for g in grads("srtod_out") + grads("srtod_up1_deconv"))
    assert grads("conv4_3_norm_dgfe")[0].abs().sum() > 0 and grads("conv1_1")[0].abs().sum() > 0
    assert torch.equal(grads("conv4_3_norm_dgfe")[4], torch.zeros(1))


def test_committed_srtod_prototxt_equals_a_fresh_generation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", "--all", "--head", "srtod", "--out", "prototxt"]) == 0
    for name in heads.committed_variants():
        for phase in ("train", "test", "deploy", "solver"):
            a = REPO / "prototxt" / name / f"{phase}.prototxt"
            b = tmp_path / "prototxt" / name / f"{phase}.prototxt"
            assert filecmp.cmp(a, b, shallow=False), \
                f"{a} is stale: run `deeper-ssd generate --all --head srtod`"
    solver = io.read_solver(REPO / "prototxt" / "deeper_ssd500_srtod" / "solver.prototxt")
    assert solver.train_net == "prototxt/deeper_ssd500_srtod/train.prototxt"


def test_generate_refuses_head_settings_without_a_head(capsys):
    assert cli.main(["generate", "ssd300", "--srtod-source", "fc7"]) == 2
    assert "need --head" in capsys.readouterr().err
    assert cli.main(["generate", "ssd300", "--head", "srtod", "--head-set", "gain=2"]) == 2
    assert "SRTOD settings are source" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# diffmap and OpenCV

@pytest.fixture(scope="module")
def tiny_srtod(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_srtod")
    deploy = REPO / "prototxt" / "deeper_ssd500_tiny_srtod" / "deploy.prototxt"
    Net.from_prototxt(deploy, seed=0).save_caffemodel(folder / "w.caffemodel")
    return deploy, folder / "w.caffemodel"


def test_diffmap_writes_the_four_panels_side_by_side(tiny_srtod, tmp_path, capsys):
    import cv2
    deploy, weights = tiny_srtod
    image = REPO / "tests" / "fixtures" / "voc_dining.jpg"
    assert cli.main(["diffmap", "--model", str(deploy), "--weights", str(weights), str(image),
                     "--out", str(tmp_path)]) == 0
    assert "threshold 0.1569" in capsys.readouterr().out
    side = cv2.imread(str(tmp_path / "voc_dining_srtod.png"))
    assert side.shape == (500 + 22, 4 * 500 + 3 * 6, 3)
    mask = cv2.imread(str(tmp_path / "voc_dining_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (500, 500) and set(np.unique(mask)) <= {0, 128, 255}
    plain = REPO / "prototxt" / "deeper_ssd500_tiny" / "deploy.prototxt"
    assert cli.main(["diffmap", "--model", str(plain), "--weights", str(weights), str(image)]) == 2
    assert "has 0 DGFE layers" in capsys.readouterr().err


def test_opencv_is_refused_srtod_nets_and_runs_the_plain_deploy(tmp_path, capsys):
    paths = {}
    for name, model in (("plain", zoo.get("ssd300", width=1 / 8)),
                        ("srtod", heads.with_srtod(zoo.get("ssd300", width=1 / 8)))):
        paths[name] = tmp_path / name / "deploy.prototxt"
        io.write_net(model.nets()["deploy"], paths[name])
    assert [kind for _, kind in unsupported_layers(io.read_net(paths["srtod"]))] == \
        ["DenormalizeImage", "DifferenceMap", "DGFE"]
    assert cli.main(["opencv-check", str(paths["srtod"])]) == 2
    err = capsys.readouterr().err
    assert "OpenCV's Caffe importer cannot run" in err and "'conv4_3_norm_dgfe' (DGFE)" in err
    with pytest.raises(OpenCVUnsupported):
        compare_with_opencv(paths["srtod"])
    assert cli.main(["opencv-check", str(paths["plain"])]) == 0
    # the full layer-by-layer parity (its detections need the 21-class net's decisive scores)
    voc = heads.with_srtod(zoo.get("ssd300_voc0712"))
    plain = REPO / "prototxt" / "ssd300_voc0712" / "deploy.prototxt"
    assert io.read_net(plain) == zoo.get("ssd300_voc0712").nets()["deploy"] and voc.nets()
    assert compare_with_opencv(plain) > 0


def test_threshold_decay_follows_the_solver_unless_set():
    def threshold_param(model):
        dgfe = next(l for l in model.nets()["train"].layer if l.type == "DGFE")
        return dgfe.param[4].decay_mult
    assert threshold_param(heads.with_srtod(zoo.get("deeper_ssd500"))) == 1          # SGD
    assert threshold_param(heads.with_srtod(zoo.get("deeper_ssd500_tiny"))) == 0     # Adam
    explicit = heads.SRTOD(threshold_decay_mult=0.5)
    assert threshold_param(heads.with_srtod(zoo.get("deeper_ssd500_tiny"), explicit)) == 0.5
