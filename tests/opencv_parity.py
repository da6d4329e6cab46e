"""Compare our executor with OpenCV's Caffe importer layer by layer on the same random weights.

``compare_with_opencv`` builds our Net from a deploy prototxt, saves its seeded random weights
as a .caffemodel, loads both files in ``cv2.dnn.readNetFromCaffe`` and checks every layer's
output OpenCV exposes against ours (captured with forward hooks, so in-place chains compare
per layer). OpenCV does not truncate non-integer PriorBox sizes to int as Caffe does; on such
nets (``integer_priors=False``) the priors and everything computed from them are left to the
PriorBox tests against Caffe's rule and the oracle.
"""
import cv2
import numpy as np
import torch

from deeper_ssd import io
from deeper_ssd.net import Net
from deeper_ssd.opencv_check import refuse_unsupported


def has_integer_prior_sizes(net_param) -> bool:
    return all(float(v).is_integer() for layer in net_param.layer if layer.type == "PriorBox"
               for v in list(layer.prior_box_param.min_size) + list(layer.prior_box_param.max_size))


def _depends_on(net_param, roots):
    """Names of layers whose inputs derive from any layer type in ``roots``."""
    tainted_blobs, tainted_layers = set(), set()
    for layer in net_param.layer:
        if layer.type in roots or any(b in tainted_blobs for b in layer.bottom):
            tainted_layers.add(layer.name)
            tainted_blobs.update(layer.top)
    return tainted_layers


def sorted_detections(rows: np.ndarray) -> np.ndarray:
    """Detection rows [image, label, score, box] ordered by image, label, score (desc)."""
    rows = rows.reshape(-1, 7)
    return rows[np.lexsort((-rows[:, 2], rows[:, 1], rows[:, 0]))]


def without_result_files(net_param):
    """A copy without DetectionOutput's save_output_param (result files need the dataset's label
    map and name-size files, which Caffe and we both require to exist; OpenCV ignores them)."""
    copy = type(net_param)()
    copy.CopyFrom(net_param)
    for layer in copy.layer:
        layer.detection_output_param.ClearField("save_output_param")
    return copy


def compare_with_opencv(deploy_path, tmp_path, seed=0, batch=1, rtol=1e-4):
    """Assert per-layer agreement; returns the number of layers compared."""
    net_param = without_result_files(io.read_net(deploy_path))
    refuse_unsupported(net_param, str(deploy_path))     # SR-TOD/ZoomInNet layers: OpenCV has none
    deploy_path = tmp_path / "deploy.prototxt"
    io.write_net(net_param, deploy_path)
    net = Net(net_param, "TEST", seed=seed)
    # conf heads at a larger scale than xavier's make softmax scores decisive, so that the
    # detections do not hinge on near-ties at the top_k / keep_top_k cut-offs
    with torch.no_grad():
        for layer in net.layers:
            if layer.name.endswith("_mbox_conf"):
                layer.blobs[0].mul_(4.0)
    weights = tmp_path / "weights.caffemodel"
    net.save_caffemodel(weights)
    data_name = net.inputs[0]
    shape = (batch,) + tuple(net.blob_shapes[data_name][1:])
    x = torch.from_numpy(np.random.default_rng(seed).uniform(-120, 130, shape).astype(np.float32))

    outputs = {}
    def keep(mod, inp, out):       # copies: a later in-place ReLU overwrites its bottom
        outputs[mod.name] = tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()
    hooks = [layer.register_forward_hook(keep) for layer in net.layers]
    with torch.no_grad():
        net(**{data_name: x})
    for hook in hooks:
        hook.remove()

    skip = set() if has_integer_prior_sizes(net_param) else _depends_on(net_param, {"PriorBox"})
    names = [layer.name for layer in net.layers if layer.caffe_type != "Input" and layer.name not in skip]
    cv_net = cv2.dnn.readNetFromCaffe(str(deploy_path), str(weights))
    cv_net.setInput(x.numpy())
    theirs = dict(zip(names, cv_net.forward(names)))
    for name in names:
        ours = outputs[name]
        ours = (ours[0] if isinstance(ours, tuple) else ours).numpy()
        layer_type = net.layer_by_name[name].caffe_type
        if layer_type == "DetectionOutput":
            a, b = sorted_detections(ours), sorted_detections(theirs[name])
            assert a.shape == b.shape, f"{name}: {a.shape[0]} detections, OpenCV {b.shape[0]}"
            np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-5, err_msg=name)
            continue
        b = theirs[name].reshape(ours.shape)
        scale = np.abs(ours).max() + 1e-12
        assert np.abs(ours - b).max() <= rtol * scale, f"{name} ({layer_type}): max diff {np.abs(ours - b).max()} vs scale {scale}"
    return len(names)
