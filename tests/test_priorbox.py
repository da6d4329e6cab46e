"""PriorBox: Caffe's order, integer truncation, steps, offsets, clip and variances
(docs/semantics.md, "PriorBox" and "Prior counts"); real Caffe and OpenCV parity when available."""

import numpy as np
import pytest
import torch

from deeper_ssd import io, shapes
from deeper_ssd.layers import LayerError
from deeper_ssd.proto import caffe_pb2
from support.layers import build


def prior_layer(params: str) -> str:
    return (f'name: "pb" type: "PriorBox" bottom: "f" bottom: "data" top: "pb" '
            f'prior_box_param {{ {params} }}')


def priors(params, feature_hw, image_hw, dtype=torch.float32):
    layer = build(prior_layer(params), [(1, 8, *feature_hw), (1, 3, *image_hw)])
    out = layer(torch.zeros(1, 8, *feature_hw, dtype=dtype), torch.zeros(1, 3, *image_hw, dtype=dtype))
    assert tuple(out.shape) == layer.top_shapes[0]
    return out


SSD300_CONV4 = ("min_size: 30 max_size: 60 aspect_ratio: 2 flip: true clip: false "
                "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 8 offset: 0.5")


def test_ssd300_first_priors_and_variances():
    out = priors(SSD300_CONV4, (38, 38), (300, 300))
    assert out.shape == (1, 2, 38 * 38 * 4 * 4)
    boxes = out[0, 0].view(-1, 4).numpy()
    expected = np.array([[-0.0366667, -0.0366667, 0.0633333, 0.0633333],
                         [-0.0573773, -0.0573773, 0.0840440, 0.0840440],
                         [-0.0573773, -0.0220220, 0.0840440, 0.0486887],
                         [-0.0220220, -0.0573773, 0.0486887, 0.0840440],
                         [-0.0100000, -0.0366667, 0.0900000, 0.0633333],
                         [-0.0307107, -0.0573773, 0.1107107, 0.0840440]])
    np.testing.assert_allclose(boxes[:6], expected, atol=5e-7)
    var = out[0, 1].view(-1, 4).numpy()
    np.testing.assert_array_equal(var, np.tile(np.float32([0.1, 0.1, 0.2, 0.2]), (len(var), 1)))
    # rows outer, columns inner: prior 4*38 is the first box of cell (1, 0)
    np.testing.assert_allclose(boxes[4 * 38], [-0.0366667, -0.01, 0.0633333, 0.09], atol=5e-7)


def test_ssd512_sizes_are_truncated_to_int():
    out = priors("min_size: 35.84 max_size: 76.8 aspect_ratio: 2 step: 8", (64, 64), (512, 512))
    boxes = out[0, 0].view(-1, 4).numpy()
    np.testing.assert_allclose(boxes[0], [-0.0263672] * 2 + [0.0419922] * 2, atol=5e-7)
    np.testing.assert_allclose(boxes[1], [-0.0425539] * 2 + [0.0581789] * 2, atol=5e-7)
    # the float size 35.84 would put xmax at 0.04281: the truncated 35 is what Caffe uses
    assert abs(boxes[0, 2] - (4 + 35.84 / 2) / 512) > 8e-4


def test_caffe_unit_test_values_and_default_variance():
    """src/caffe/test/test_prior_box_layer.cpp: 10x10 map, 100x100 image, min 4, max 9."""
    out = priors("min_size: 4 max_size: 9", (10, 10), (100, 100))
    boxes = out[0, 0].view(-1, 4).numpy()
    assert len(boxes) == 10 * 10 * 2
    np.testing.assert_allclose(boxes[0], [0.03, 0.03, 0.07, 0.07], atol=1e-7)
    np.testing.assert_allclose(boxes[1], [0.02, 0.02, 0.08, 0.08], atol=1e-7)
    np.testing.assert_array_equal(out[0, 1].numpy(), np.float32(0.1))


def test_ratio_list_order_dedup_and_flip():
    layer = build(prior_layer("min_size: 10 aspect_ratio: 2 aspect_ratio: 3 aspect_ratio: 2.0000001 "
                              "aspect_ratio: 1"), [(1, 1, 1, 1), (1, 3, 100, 100)])
    np.testing.assert_allclose(layer.aspect_ratios, [1, 2, 0.5, 3, 1 / 3], rtol=1e-7)
    assert layer.num_priors == 5
    noflip = build(prior_layer("min_size: 10 aspect_ratio: 2 aspect_ratio: 3 flip: false"),
                   [(1, 1, 1, 1), (1, 3, 100, 100)])
    assert noflip.aspect_ratios == [1, 2, 3]
    out = priors("min_size: 10 aspect_ratio: 2 aspect_ratio: 3", (1, 1), (100, 100))
    boxes = out[0, 0].view(-1, 4).numpy() * 100
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    np.testing.assert_allclose(widths, [10, 10 * 2 ** 0.5, 10 / 2 ** 0.5, 10 * 3 ** 0.5, 10 / 3 ** 0.5],
                               rtol=1e-5)
    np.testing.assert_allclose(widths * heights, 100, rtol=1e-5)


def test_several_min_sizes_order():
    """For each min size: min box, sqrt(min*max) box, ratio boxes; then the next min size."""
    out = priors("min_size: 10 min_size: 20 max_size: 40 max_size: 80 aspect_ratio: 2", (1, 1), (100, 100))
    boxes = out[0, 0].view(-1, 4).numpy() * 100
    widths = boxes[:, 2] - boxes[:, 0]
    np.testing.assert_allclose(widths, [10, 20, 10 * 2 ** 0.5, 10 / 2 ** 0.5,
                                        20, 40, 20 * 2 ** 0.5, 20 / 2 ** 0.5], rtol=1e-5)


def test_steps_offset_image_size_and_clip():
    # no step: img/layer in float (100/3 = 33.333), offset 0.25
    out = priors("min_size: 10 offset: 0.25", (3, 3), (100, 100))
    c = out[0, 0].view(-1, 4).numpy()
    centre_x = (c[:, 0] + c[:, 2]) / 2 * 100
    np.testing.assert_allclose(centre_x[:3], np.float32([0.25, 1.25, 2.25]) * np.float32(100 / 3), rtol=1e-6)
    # step_h / step_w and img_h / img_w override the data blob (which here is 1x1)
    out = priors("min_size: 10 step_h: 10 step_w: 20 img_h: 50 img_w: 200", (2, 2), (1, 1))
    c = out[0, 0].view(-1, 4).numpy()
    np.testing.assert_allclose(c[1], [(30 - 5) / 200, (5 - 5) / 50, (30 + 5) / 200, (5 + 5) / 50], atol=1e-7)
    np.testing.assert_allclose(c[2], [(10 - 5) / 200, (15 - 5) / 50, (10 + 5) / 200, (15 + 5) / 50], atol=1e-7)
    out = priors("min_size: 60 img_size: 100 step: 50 clip: true", (2, 2), (7, 7))
    c = out[0, 0].view(-1, 4).numpy()
    np.testing.assert_allclose(c[0], [0, 0, 0.55, 0.55], atol=1e-7)
    np.testing.assert_allclose(c[3], [0.45, 0.45, 1, 1], atol=1e-7)


def test_single_variance_and_float64():
    out = priors("min_size: 10 variance: 0.3", (2, 2), (10, 10), dtype=torch.float64)
    assert out.dtype == torch.float64
    np.testing.assert_array_equal(out[0, 1].numpy(), np.float64(np.float32(0.3)))  # proto float


@pytest.mark.parametrize("params,message", [
    ("aspect_ratio: 2", "min_size"),
    ("min_size: 0", "positive"),
    ("min_size: 10 max_size: 5", "greater"),
    ("min_size: 10 min_size: 20 max_size: 30", "max_size"),
    ("min_size: 10 variance: 0.1 variance: 0.2", "variance"),
    ("min_size: 10 img_size: 300 img_h: 300 img_w: 300", "not both"),
    ("min_size: 10 img_h: 300", "img_w"),
    ("min_size: 10 step: 8 step_h: 8 step_w: 8", "not both"),
])
def test_bad_parameters_are_refused(params, message):
    with pytest.raises(LayerError, match=message):
        build(prior_layer(params), [(1, 1, 2, 2), (1, 3, 10, 10)])


def _prior_layers(reference_dir, net_dir):
    """The PriorBox layers of a reference deploy net with the shapes of their bottoms."""
    net = io.read_net(reference_dir / net_dir / "deploy.prototxt")
    plan = shapes.plan_net(net, caffe_pb2.TEST, device="meta")
    layers = [(step, [plan.blob_shapes[b] for b in step.bottoms]) for step in plan.layers
              if step.layer.caffe_type == "PriorBox"]
    return plan, layers


def _all_priors(plan, layers):
    outs = [step.layer.priors(tuple(bshapes[0][2:]), tuple(bshapes[1][2:])) for step, bshapes in layers]
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("net_dir,count", [("ssd300_official", 8732), ("ssd512_reconstructed", 24564)])
def test_reference_prior_counts(reference_dir, net_dir, count):
    plan, layers = _prior_layers(reference_dir, net_dir)
    assert plan.blob_shapes["mbox_priorbox"] == (1, 2, 4 * count)
    np.testing.assert_allclose(_all_priors(plan, layers)[0, 0, :4].numpy(),
                               {8732: [-0.0366667] * 2 + [0.0633333] * 2,
                                24564: [-0.0263672] * 2 + [0.0419922] * 2}[count], atol=5e-7)


def _isolated_priorbox_net(layers) -> tuple:
    """A prototxt with an Input per PriorBox bottom and the reference PriorBox layers."""
    inputs, body, seen = [], [], set()
    for step, bshapes in layers:
        for name, shape in zip(step.bottoms, bshapes):
            if name not in seen:
                seen.add(name)
                inputs.append(f'layer {{ name: "in_{name}" type: "Input" top: "{name}" input_param '
                              f'{{ shape {{ {" ".join(f"dim: {d}" for d in shape)} }} }} }}')
        body.append("layer {\n" + io.message_to_text(step.layer.lp) + "}")
    tops = [step.tops[0] for step, _ in layers]
    concat = (f'layer {{ name: "mbox_priorbox" type: "Concat" {" ".join(f"bottom: {t!r}" for t in tops)} '
              f'top: "mbox_priorbox" concat_param {{ axis: 2 }} }}').replace("'", '"')
    return "\n".join(inputs + body + [concat]), seen


@pytest.mark.parametrize("net_dir", ["ssd300_official", "ssd512_reconstructed"])
def test_priors_match_caffe(oracle, reference_dir, net_dir):
    plan, layers = _prior_layers(reference_dir, net_dir)
    text, _ = _isolated_priorbox_net(layers)
    out = oracle.run("""
net = caffe.Net("net.prototxt", caffe.TEST)
net.forward()
out["priors"] = net.blobs["mbox_priorbox"].data.copy()
""", {"net.prototxt": text})
    ours = _all_priors(plan, layers).numpy()
    assert ours.shape == out["priors"].shape
    np.testing.assert_array_equal(ours, out["priors"])   # bit-exact


# SSD300's prior layers (ssd_pascal.py), for the peer test that needs no reference folder
SSD300_SOURCES = [(38, "min_size: 30 max_size: 60 aspect_ratio: 2 step: 8"),
                  (19, "min_size: 60 max_size: 111 aspect_ratio: 2 aspect_ratio: 3 step: 16"),
                  (10, "min_size: 111 max_size: 162 aspect_ratio: 2 aspect_ratio: 3 step: 32"),
                  (5, "min_size: 162 max_size: 213 aspect_ratio: 2 aspect_ratio: 3 step: 64"),
                  (3, "min_size: 213 max_size: 264 aspect_ratio: 2 step: 100"),
                  (1, "min_size: 264 max_size: 315 aspect_ratio: 2 step: 300")]


def test_priors_match_opencv_on_integer_sizes():
    """OpenCV's importer is right for integer prior sizes (it ignores the truncation). Its
    PriorBox clips unless told otherwise (Caffe's default is clip: false), so the layers say it,
    as SSD's prototxts do."""
    cv2 = pytest.importorskip("cv2")
    layers = ['layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 '
              'dim: 300 dim: 300 } } }']
    for i, (size, params) in enumerate(SSD300_SOURCES):
        layers.append(f'layer {{ name: "f{i}" type: "Input" top: "f{i}" input_param {{ shape {{ dim: 1 '
                      f'dim: 1 dim: {size} dim: {size} }} }} }}')
        layers.append(f'layer {{ name: "p{i}" type: "PriorBox" bottom: "f{i}" bottom: "data" top: "p{i}" '
                      f'prior_box_param {{ {params} clip: false variance: 0.1 variance: 0.1 '
                      f'variance: 0.2 variance: 0.2 }} }}')
    layers.append('layer { name: "mbox_priorbox" type: "Concat" '
                  + " ".join(f'bottom: "p{i}"' for i in range(6)) + ' top: "mbox_priorbox" concat_param { axis: 2 } }')
    text = "\n".join(layers)
    plan = shapes.plan_net(io.parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TEST, device="meta")
    steps = [(step, [plan.blob_shapes[b] for b in step.bottoms]) for step in plan.layers
             if step.layer.caffe_type == "PriorBox"]
    net = cv2.dnn.readNetFromCaffe(bytearray(text.encode()))
    for name in ["data"] + [f"f{i}" for i in range(6)]:
        net.setInput(np.zeros(plan.blob_shapes[name], np.float32), name)
    theirs = net.forward("mbox_priorbox")
    ours = _all_priors(plan, steps).numpy()
    assert ours.shape == (1, 2, 4 * 8732)
    np.testing.assert_allclose(ours, theirs.reshape(ours.shape), atol=2e-6)


# ---- OpenCV's extensions: explicit width/height and several offsets per cell ----

def test_explicit_sides_and_offsets_order_and_values():
    """Per cell: box, then offset (OpenCV's order); sides used as given; offset_w on x, offset_h on y."""
    out = priors("width: 10 height: 20 width: 30.5 height: 5 offset_h: 0.2 offset_w: 0.5 "
                 "offset_h: 0.7 offset_w: 0.25 step: 16", (4, 6), (64, 96))
    assert out.shape == (1, 2, 4 * 6 * 2 * 2 * 4)
    boxes = out[0, 0].view(-1, 4).numpy() * [96, 64, 96, 64]
    cell00 = [[8 - 5, 3.2 - 10, 8 + 5, 3.2 + 10],             # 10x20 at offset (0.2, 0.5)
              [4 - 5, 11.2 - 10, 4 + 5, 11.2 + 10],           # 10x20 at offset (0.7, 0.25)
              [8 - 15.25, 3.2 - 2.5, 8 + 15.25, 3.2 + 2.5],   # 30.5x5, not truncated to 30
              [4 - 15.25, 11.2 - 2.5, 4 + 15.25, 11.2 + 2.5]]
    np.testing.assert_allclose(boxes[:4], cell00, atol=1e-4)
    np.testing.assert_allclose(boxes[4], [24 - 5, 3.2 - 10, 24 + 5, 3.2 + 10], atol=1e-4)  # cell (0, 1)


def test_several_offsets_with_min_max_sizes_and_prior_count():
    """min/max sizes and ratios keep Caffe's rules; each of their boxes repeats per offset."""
    two = priors("min_size: 10 max_size: 20 aspect_ratio: 2 flip: false offset_h: 0 offset_w: 0.5 "
                 "offset_h: 0.5 offset_w: 0.5 offset_h: 1 offset_w: 0.5 step: 8", (2, 3), (16, 24))
    assert two.shape == (1, 2, 2 * 3 * 3 * 3 * 4)                 # 3 boxes x 3 offsets per cell
    boxes = two[0, 0].view(-1, 4).numpy() * [24, 16, 24, 16]
    np.testing.assert_allclose(boxes[:3, 1], [-5, -1, 3], atol=1e-4)       # min box at y 0, 4, 8
    side = np.sqrt(200.0)
    np.testing.assert_allclose(boxes[3], [4 - side / 2, -side / 2, 4 + side / 2, side / 2], atol=1e-4)


@pytest.mark.parametrize("params,message", [
    ("width: 10", "height"),
    ("width: 10 height: 10 min_size: 10", "no min_size"),
    ("width: 10 height: 10 aspect_ratio: 2", "no min_size"),
    ("width: 10 height: 0", "positive"),
    ("min_size: 10 offset_h: 0.5", "offset_w"),
    ("min_size: 10 offset: 0.5 offset_h: 0.5 offset_w: 0.5", "not both"),
])
def test_bad_opencv_extension_parameters_are_refused(params, message):
    with pytest.raises(LayerError, match=message):
        build(prior_layer(params), [(1, 1, 2, 2), (1, 3, 10, 10)])


def _opencv_priors(cv2, params, feature_hw, image_hw):
    text = (f'input: "data" input_shape {{ dim: 1 dim: 3 dim: {image_hw[0]} dim: {image_hw[1]} }}\n'
            f'input: "f" input_shape {{ dim: 1 dim: 1 dim: {feature_hw[0]} dim: {feature_hw[1]} }}\n'
            f'layer {{ {prior_layer(params)} }}\n')
    net = cv2.dnn.readNetFromCaffe(bytearray(text.encode()))
    net.setInput(np.zeros((1, 3, *image_hw), np.float32), "data")
    net.setInput(np.zeros((1, 1, *feature_hw), np.float32), "f")
    return net.forward("pb")


TEXT_DETECTION_PRIORS = [
    # TextBoxes-style long boxes, each repeated at two vertical offsets
    "min_size: 30 max_size: 60 aspect_ratio: 2 aspect_ratio: 3 aspect_ratio: 5 aspect_ratio: 7 "
    "aspect_ratio: 10 flip: false offset_h: 0.5 offset_w: 0.5 offset_h: 1 offset_w: 0.5",
    "width: 21.5 height: 9.25 width: 48 height: 12 offset_h: 0.25 offset_w: 0.5 offset_h: 0.75 "
    "offset_w: 0.5 step: 7",
    "width: 16 height: 16 offset_h: 0.3 offset_w: 0.6 step_h: 6 step_w: 9 clip: true",
    "min_size: 20 min_size: 40 max_size: 30 max_size: 50 aspect_ratio: 2 offset_h: 0 offset_w: 0 "
    "offset_h: 0.5 offset_w: 1",
]


@pytest.mark.parametrize("params", TEXT_DETECTION_PRIORS)
def test_opencv_extensions_match_opencv(params):
    cv2 = pytest.importorskip("cv2")
    params += "" if "clip" in params else " clip: false"      # OpenCV clips unless told
    params += " variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2"
    ours = priors(params, (5, 9), (48, 80)).numpy()
    np.testing.assert_allclose(ours, _opencv_priors(cv2, params, (5, 9), (48, 80)), atol=2e-6)


def test_three_offsets_match_opencv_where_opencv_writes():
    """OpenCV 4.14 sizes its top for 2 (n - 1) offsets but writes n per box; we emit n (the count
    heads need) and equal what OpenCV writes (docs/decisions.md)."""
    cv2 = pytest.importorskip("cv2")
    params = ("width: 10 height: 20 offset_h: 0 offset_w: 0.5 offset_h: 0.5 offset_w: 0.5 offset_h: 1 "
              "offset_w: 0.5 clip: false variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2")
    ours = priors(params, (4, 6), (64, 96)).numpy()
    theirs = _opencv_priors(cv2, params, (4, 6), (64, 96))
    assert ours.shape == (1, 2, 4 * 6 * 3 * 4)
    np.testing.assert_allclose(ours, theirs[:, :, :ours.shape[2]], atol=2e-6)


def _text_detection_deploy() -> str:
    """A small TextBoxes-style deploy: two feature maps, long boxes at two vertical offsets on the
    first, explicit box sides on the second, 1x5 head kernels, softmax and DetectionOutput."""
    def conv(name, bottom, n, kernel="kernel_size: 3 pad: 1", stride=1):
        return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                f'convolution_param {{ num_output: {n} {kernel} stride: {stride} '
                f'weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" value: 0.1 }} }} }}\n'
                f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')
    sources = [("f1", "min_size: 24 max_size: 48 aspect_ratio: 2 aspect_ratio: 5 flip: false "
                      "offset_h: 0.5 offset_w: 0.5 offset_h: 1 offset_w: 0.5", 4 * 2),
               ("f2", "width: 40.5 height: 12 width: 64 height: 20.25 offset_h: 0.25 offset_w: 0.5 "
                      "offset_h: 0.75 offset_w: 0.5", 2 * 2)]
    text = ('name: "textboxes_like" input: "data" input_shape { dim: 1 dim: 3 dim: 64 dim: 128 }\n'
            + conv("c1", "data", 8, stride=4) + conv("f1", "c1", 8) + conv("f2", "f1", 8, stride=2))
    heads = {"loc": [], "conf": [], "priorbox": []}
    for name, params, per_cell in sources:
        for kind, n in (("loc", 4), ("conf", 2)):
            head = f"{name}_mbox_{kind}"
            text += (f'layer {{ name: "{head}" type: "Convolution" bottom: "{name}" top: "{head}" '
                     f'convolution_param {{ num_output: {per_cell * n} kernel_h: 1 kernel_w: 5 pad_h: 0 '
                     f'pad_w: 2 weight_filler {{ type: "xavier" }} }} }}\n'
                     f'layer {{ name: "{head}_perm" type: "Permute" bottom: "{head}" top: "{head}_perm" '
                     f'permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}\n'
                     f'layer {{ name: "{head}_flat" type: "Flatten" bottom: "{head}_perm" '
                     f'top: "{head}_flat" flatten_param {{ axis: 1 }} }}\n')
            heads[kind].append(f"{head}_flat")
        text += (f'layer {{ name: "{name}_mbox_priorbox" type: "PriorBox" bottom: "{name}" bottom: "data" '
                 f'top: "{name}_mbox_priorbox" prior_box_param {{ {params} clip: false variance: 0.1 '
                 f'variance: 0.1 variance: 0.2 variance: 0.2 }} }}\n')
        heads["priorbox"].append(f"{name}_mbox_priorbox")
    for kind, axis in (("loc", 1), ("conf", 1), ("priorbox", 2)):
        bottoms = " ".join(f'bottom: "{b}"' for b in heads[kind])
        text += (f'layer {{ name: "mbox_{kind}" type: "Concat" {bottoms} top: "mbox_{kind}" '
                 f'concat_param {{ axis: {axis} }} }}\n')
    return text + (
        'layer { name: "conf_reshape" type: "Reshape" bottom: "mbox_conf" top: "conf_reshape" '
        'reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }\n'
        'layer { name: "conf_softmax" type: "Softmax" bottom: "conf_reshape" top: "conf_softmax" '
        'softmax_param { axis: 2 } }\n'
        'layer { name: "conf_flat" type: "Flatten" bottom: "conf_softmax" top: "conf_flat" '
        'flatten_param { axis: 1 } }\n'
        'layer { name: "detection_out" type: "DetectionOutput" bottom: "mbox_loc" bottom: "conf_flat" '
        'bottom: "mbox_priorbox" top: "detection_out" detection_output_param { num_classes: 2 '
        'share_location: true background_label_id: 0 nms_param { nms_threshold: 0.45 top_k: 100 } '
        'code_type: CENTER_SIZE keep_top_k: 50 confidence_threshold: 0.2 } }\n')


def test_text_detection_deploy_matches_opencv_layer_by_layer(tmp_path):
    pytest.importorskip("cv2")
    from support.opencv import compare_with_opencv

    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(_text_detection_deploy())
    net = io.read_net(deploy)
    plan = shapes.plan_net(net, caffe_pb2.TEST, device="meta")
    assert plan.blob_shapes["mbox_priorbox"] == (1, 2, 4 * (16 * 32 * 8 + 8 * 16 * 4))
    assert compare_with_opencv(deploy) == len(net.layer)    # every layer, priors and detections included


def test_priors_are_computed_once_per_shape_dtype_and_device(monkeypatch):
    """Forward caches by (feature size, image size, dtype, device): a repeat is the same tensor
    with no computation, another feature or image size or dtype is computed afresh, and every
    result equals a fresh computation."""
    layer = build(prior_layer(SSD300_CONV4), [(1, 8, 4, 4), (1, 3, 32, 32)])
    calls = []
    compute = layer.priors
    monkeypatch.setattr(layer, "priors", lambda *a: calls.append(a) or compute(*a))

    def forward(feature_hw, image_hw, dtype=torch.float32):
        return layer(torch.zeros(2, 8, *feature_hw, dtype=dtype), torch.zeros(2, 3, *image_hw, dtype=dtype))

    first = forward((4, 4), (32, 32))
    assert forward((4, 4), (32, 32)) is first and len(calls) == 1
    other_feature, other_image = forward((5, 4), (32, 32)), forward((4, 4), (40, 32))
    doubles = forward((4, 4), (32, 32), torch.float64)
    assert len(calls) == 4 and other_feature.shape[2] == 5 * 4 * 4 * 4 and doubles.dtype == torch.float64
    for out, args in zip((first, other_feature, other_image, doubles), calls):
        assert torch.equal(out, compute(*args))
    assert not torch.equal(other_image, priors(SSD300_CONV4, (4, 4), (32, 32))[..., :other_image.shape[2]])
    for size in range(6, 6 + layer.CACHE_SIZE):             # the cache stays bounded
        forward((size, size), (32, 32))
    assert len(layer._prior_cache) <= layer.CACHE_SIZE
