"""The fast inference path (deeper_ssd.fast) against the exact executor: every zoo deploy net
(random weights, the smallest input its layers accept), both backends, the blobs DetectionOutput
reads within 1e-4 relative and the same detections; fallback, cache and layout checks.

The whole zoo takes minutes on a small CPU: by default a subset covering each layer family
(plain SSD, BatchNorm, SR-TOD heads, up/down fusion, concat/eltwise) runs; set
DEEPER_SSD_FULL_ZOO=1 for all of them."""
import os
from pathlib import Path

import pytest
import torch

from deeper_ssd import fast, io, shapes
from deeper_ssd.net import Net
from deeper_ssd.proto import caffe_pb2

REPO = Path(__file__).resolve().parent.parent
ZOO = sorted(p.parent.name for p in (REPO / "prototxt").glob("*/deploy.prototxt"))
SUBSET = ["ssd300_voc0712", "deeper_ssd500_tiny", "deeper_ssd500_tiny_srtod", "deeper_ssd500_up1_concat",
          "deeper_ssd500_down1_eltwise_srtod"]
MODELS = ZOO if os.environ.get("DEEPER_SSD_FULL_ZOO") else [m for m in SUBSET if m in ZOO]


def has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def smallest_net(model: str, batch: int = 1) -> Net:
    """The zoo's deploy net with random weights at the smallest square input its layers accept."""
    param = io.read_net(REPO / "prototxt" / model / "deploy.prototxt")
    for layer in param.layer:
        layer.detection_output_param.ClearField("save_output_param")
    native = list(Net(param, "TEST", device="meta").blob_shapes["data"][2:])
    for side in list(range(64, max(native) + 1, 16)) + [max(native)]:
        try:
            shapes.plan_net(param, caffe_pb2.TEST, device="meta", input_shapes={"data": (batch, 3, side, side)})
            break
        except Exception:  # noqa: BLE001 - too small for some layer: try the next size
            continue
    shape = (batch, 3, side, side) if side != max(native) else (batch, 3, *native)
    net = Net(param, "TEST", seed=0, input_shapes={"data": shape}).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in net.layers:                  # fillers leave variance 0: activations overflow
            if layer.caffe_type == "BatchNorm":
                mean, var, factor = layer.blobs
                mean.copy_(torch.randn(mean.shape, generator=gen) * 0.1)
                var.copy_(torch.rand(var.shape, generator=gen) * 4 + 1)
                factor.fill_(1.0)
    return net


def detection_bottoms(net: Net):
    layer = [layer for layer in net.layers if layer.caffe_type == "DetectionOutput"][0]
    return list(layer.lp.bottom), layer.lp.top[0]


def assert_close(want, have, name):
    assert want.shape == have.shape, name
    scale = float(want.abs().max())
    assert float((want - have).abs().max()) <= 1e-4 * max(scale, 1e-6), name


def same_detections(want, have, share=0.98):
    """The same rows up to float noise (1e-4), in any order. With random weights many scores are
    equal or within float noise of each other, so which of two such candidates comes first (and
    suppresses or outranks the other) may differ between the paths: at least ``share`` of the
    rows must match both ways, and the counts must agree."""
    want, have = want.reshape(-1, 7), have.reshape(-1, 7)
    assert want.shape == have.shape

    def matched(a, b):
        close = ((a.unsqueeze(1) - b.unsqueeze(0)).abs() <= 1e-4 + 1e-4 * b.abs().unsqueeze(0)).all(-1)
        return float(close.any(1).float().mean()) if len(a) else 1.0
    assert matched(want, have) >= share and matched(have, want) >= share


@pytest.mark.parametrize("backend", ["torchscript", "onnxruntime"])
@pytest.mark.parametrize("model", MODELS)
def test_fast_path_equals_the_exact_path(model, backend):
    if backend == "onnxruntime" and not has_onnxruntime():
        pytest.skip("onnxruntime is not installed (pip install -e .[onnx])")
    net = smallest_net(model)
    bottoms, top = detection_bottoms(net)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(net.blob_shapes["data"], generator=gen) * 40
    runner = fast.optimize(net, backend=backend, extra_outputs=bottoms)
    ours = runner(data=x)
    assert runner.fallback is None
    with torch.no_grad():
        exact = net(keep_blobs=True, data=x)
    for name in bottoms:
        assert_close(net.blobs[name], ours[name], name)
    same_detections(exact[top], ours[top])
    assert set(ours) >= set(exact)


def test_fallback_keeps_the_exact_path_and_says_why(monkeypatch, caplog):
    net = smallest_net("deeper_ssd500_tiny")
    x = torch.randn(net.blob_shapes["data"]) * 40
    monkeypatch.setattr(fast, "EAGER_TYPES", fast.EAGER_TYPES)

    def broken(self, traced, inputs):
        raise RuntimeError("tracer cannot follow layer 'x'")
    monkeypatch.setattr(fast.FastNet, "_torchscript", broken)
    runner = fast.optimize(net, backend="torchscript")
    with caplog.at_level("WARNING"):
        ours = runner(data=x)
    assert "tracer cannot follow layer 'x'" in runner.fallback and "exact executor" in caplog.text
    with torch.no_grad():
        assert torch.equal(ours["detection_out"], net(data=x)["detection_out"])


def test_compiled_graph_is_cached_and_weights_stay_as_they_were(tmp_path):
    net = smallest_net("deeper_ssd500_tiny")
    weight = net.layers[1].blobs[0]
    before = (weight.clone(), weight.stride())
    x = torch.randn(net.blob_shapes["data"]) * 40
    first = fast.optimize(net, backend="torchscript", cache_dir=tmp_path)
    out = first(data=x)
    assert first.last_source == "compiled" and len(list(tmp_path.iterdir())) == 1
    second = fast.optimize(net, backend="torchscript", cache_dir=tmp_path)
    again = second(data=x)
    assert second.last_source.startswith("cache")
    assert torch.equal(out["detection_out"], again["detection_out"])
    assert torch.equal(weight, before[0]) and weight.stride() == before[1]      # channels-last on a copy
    with torch.no_grad():
        net.layers[1].blobs[0].mul_(2)                                          # other weights: other file
    fast.optimize(net, backend="torchscript", cache_dir=tmp_path)(data=x)
    assert len(list(tmp_path.iterdir())) == 2


def test_bad_backend_and_unknown_blob_are_refused():
    net = smallest_net("deeper_ssd500_tiny")
    with pytest.raises(ValueError, match="backend"):
        fast.optimize(net, backend="tvm")
    with pytest.raises(KeyError, match="no blob"):
        fast.optimize(net, extra_outputs=["nope"])


# ---------------------------------------------------------------------------------------------
# ONNX export

@pytest.mark.parametrize("model", ["ssd300_voc0712", "deeper_ssd500_tiny_srtod"])
def test_onnx_export_runs_in_onnxruntime_with_our_outputs(model, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .[onnx])")
    from deeper_ssd import box
    from deeper_ssd.export import export_onnx
    net = smallest_net(model)
    names = export_onnx(net, tmp_path / "net.onnx")
    layer = [layer for layer in net.layers if layer.caffe_type == "DetectionOutput"][0]
    x = torch.randn(net.blob_shapes["data"], generator=torch.Generator().manual_seed(3)) * 40
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    theirs = dict(zip(names, (torch.from_numpy(a) for a in session.run(None, {"data": x.numpy()}))))
    with torch.no_grad():
        exact = net(keep_blobs=True, data=x)
    loc, conf, prior = layer.lp.bottom
    for name in (loc, conf, prior):
        assert_close(net.blobs[name], theirs[name], name)
    k = layer.num_priors
    boxes = box.decode(net.blobs[prior][0, 0].view(k, 1, 4), net.blobs[prior][0, 1].view(k, 1, 4),
                       net.blobs[loc].view(1, k, 1, 4), layer.code_type, layer.variance_encoded_in_target)
    assert_close(boxes, theirs["boxes"], "boxes")
    same_detections(exact[layer.lp.top[0]], layer(theirs[loc], theirs[conf], theirs[prior]))


def test_export_command(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .[onnx])")
    from deeper_ssd import cli
    net = smallest_net("deeper_ssd500_tiny")
    deploy, weights = tmp_path / "deploy.prototxt", tmp_path / "w.caffemodel"
    io.write_net(net.to_proto(with_blobs=False), deploy)
    net.save_caffemodel(weights)
    assert cli.main(["export", str(deploy), "--weights", str(weights), str(tmp_path / "a.onnx"), "--no-nms"]) == 0
    assert "outputs mbox_loc" in capsys.readouterr().out
    assert cli.main(["export", str(deploy), "--weights", str(weights), str(tmp_path / "b.onnx")]) == 0
    assert capsys.readouterr().out.rstrip().endswith("boxes, detections")
    session = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[-1].name == "detections"
    assert cli.main(["export", str(deploy), "--weights", str(weights), str(tmp_path / "d.onnx"), "--batch", "2",
                     "--no-nms"]) == 0
    session = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 2
    assert cli.main(["export", str(deploy), "--weights", str(weights), str(tmp_path / "e.onnx"), "--batch", "0"]) == 2
    capsys.readouterr()
    param = net.to_proto(with_blobs=False)
    [layer for layer in param.layer if layer.type == "DetectionOutput"][0].detection_output_param.nms_param.eta = 0.9
    io.write_net(param, deploy)
    assert cli.main(["export", str(deploy), "--weights", str(weights), str(tmp_path / "c.onnx")]) == 2
    assert "eta < 1" in capsys.readouterr().err


NMS_CASES = [
    "code_type: CENTER_SIZE nms_param { nms_threshold: 0.45 top_k: 40 } keep_top_k: 20 confidence_threshold: 0.01",
    "code_type: CENTER_SIZE nms_param { nms_threshold: 0.3 } confidence_threshold: 0.2",
    "code_type: CENTER_SIZE nms_param { nms_threshold: 0.45 top_k: 30 } keep_top_k: 300 background_label_id: 2",
    "code_type: CENTER_SIZE variance_encoded_in_target: true nms_param { nms_threshold: 0.6 top_k: 50 } "
    "keep_top_k: 7 background_label_id: 4",
]


@pytest.mark.parametrize("fields", NMS_CASES)
def test_onnx_detection_output_equals_the_layer_on_random_scores(fields):
    """DetectionOutput as ONNX TopK + NonMaxSuppression (export.py) against the layer, on random
    boxes and scores without ties: the same rows (the ONNX output is best-first and padded).
    CENTER_SIZE decodes no inverted box; where ONNX Runtime treats those differently:
    docs/decisions.md."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .[onnx])")
    import numpy as np
    from deeper_ssd.export import _WithBoxes
    from deeper_ssd.layers.detection_output import DetectionOutput
    from support.layers import layer_param
    from test_nms import random_case

    class Bottoms(torch.nn.Module):
        def forward(self, loc, conf, prior):
            return loc, conf, prior

    def rows_in_order(rows):
        rows = rows[rows[:, 1] >= 0] if len(rows) else rows
        return rows[np.lexsort((rows[:, 3], rows[:, 1], -rows[:, 2], rows[:, 0]))]

    for seed in range(3):
        bottoms = random_case(seed, 2, 80, 5, 1, ties=False)
        text = (f'name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" '
                f'top: "out" detection_output_param {{ num_classes: 5 {fields} }}')
        layer = DetectionOutput(layer_param(text), [tuple(b.shape) for b in bottoms])
        module = _WithBoxes(Bottoms(), layer, [0, 1, 2], nms=True).eval()
        data = fast.onnx_bytes(module, bottoms, ["loc", "conf", "prior"], ["l", "c", "p", "boxes", "detections"])
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        theirs = session.run(["detections"], dict(zip(["loc", "conf", "prior"], (b.numpy() for b in bottoms))))[0]
        ours = layer(*bottoms)[0, 0].numpy()
        if ours[0, 1] == -1:                                       # no detection: Caffe's filler rows
            ours = ours[:0]
        np.testing.assert_allclose(rows_in_order(theirs.reshape(-1, 7)), rows_in_order(ours), atol=1e-6)
