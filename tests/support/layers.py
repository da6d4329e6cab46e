"""Run one layer in deeper-ssd and (optionally) in real Caffe with the same bottoms, blobs and
top gradients, and return both sides' tops, bottom gradients and blob gradients."""
import numpy as np
import torch

from deeper_ssd import io
from deeper_ssd.layers import registry
from deeper_ssd.proto import caffe_pb2


def layer_param(text: str) -> caffe_pb2.LayerParameter:
    return io.parse_text(text, caffe_pb2.LayerParameter())


def build(text: str, bottom_shapes, phase=caffe_pb2.TEST):
    """Our layer for the LayerParameter ``text`` (its bottoms get ``bottom_shapes``)."""
    lp = layer_param(text)
    return registry.get(lp.type, lp.name)(lp, bottom_shapes, phase)


def run_ours(text, bottoms, blobs=None, top_grads=None, phase=caffe_pb2.TEST, dtype=torch.float64):
    """Forward (and backward when ``top_grads``) of our layer; arrays in, arrays out."""
    layer = build(text, [b.shape for b in bottoms], phase).to(dtype)
    for blob, value in zip(layer.blobs, blobs or []):
        blob.data.copy_(torch.as_tensor(value))
    inputs = [torch.tensor(b, dtype=dtype, requires_grad=True) for b in bottoms]
    tops = layer(*inputs)
    tops = (tops,) if isinstance(tops, torch.Tensor) else tuple(tops)
    result = {"tops": [t.detach().numpy() for t in tops],
              "blobs_after": [b.detach().numpy().copy() for b in layer.blobs]}
    if top_grads is not None:
        torch.autograd.backward(list(tops), [torch.as_tensor(g, dtype=dtype) for g in top_grads])
        result["bottom_grads"] = [x.grad.numpy() if x.grad is not None else np.zeros(x.shape) for x in inputs]
        result["blob_grads"] = [b.grad.numpy() if b.grad is not None else np.zeros(tuple(b.shape))
                                for b in layer.blobs]
    return result


def run_caffe(oracle, text, bottoms, blobs=None, top_grads=None, phase="TEST"):
    """The same in the Caffe oracle: Input layers feed the layer; force_backward on."""
    return run_caffe_cases(oracle, [dict(text=text, bottoms=bottoms, blobs=blobs,
                                         top_grads=top_grads, phase=phase)])[0]


def run_caffe_cases(oracle, cases):
    """Several ``run_caffe`` cases in one oracle process (starting Caffe costs ~1 s). A case with
    ``force_backward: False`` leaves it off (a layer that refuses a bottom gradient, e.g. Embed,
    then back-propagates to its blobs only)."""
    files, specs = {}, []
    for c, case in enumerate(cases):
        lp = layer_param(case["text"])
        inputs = "\n".join(
            f'layer {{ name: "in_{name}" type: "Input" top: "{name}" '
            f'input_param {{ shape {{ {" ".join(f"dim: {d}" for d in np.shape(b))} }} }} }}'
            for name, b in zip(lp.bottom, case["bottoms"]))
        force = "true" if case.get("force_backward", True) else "false"
        files[f"net{c}.prototxt"] = f'name: "h"\nforce_backward: {force}\n{inputs}\nlayer {{\n{case["text"]}\n}}\n'
        for kind, arrays in (("bottom", case["bottoms"]), ("blob", case.get("blobs") or []),
                             ("grad", case.get("top_grads") or [])):
            for i, array in enumerate(arrays):
                files[f"{kind}{c}_{i}.npy"] = np.asarray(array, dtype=np.float32)
        specs.append((lp.name, list(lp.bottom), list(lp.top), len(case.get("blobs") or []),
                      case.get("top_grads") is not None, case.get("phase", "TEST")))
    script = f"""
for c, (name, bottoms, tops, nblobs, backward, phase) in enumerate({specs!r}):
    net = caffe.Net("net%d.prototxt" % c, getattr(caffe, phase))
    for i, b in enumerate(bottoms):
        net.blobs[b].data[...] = np.load("bottom%d_%d.npy" % (c, i))
    params = net.params[name] if name in net.params else []
    for i in range(nblobs):
        params[i].data[...] = np.load("blob%d_%d.npy" % (c, i))
    net.forward()
    for i, t in enumerate(tops):
        out["c%d_top%d" % (c, i)] = net.blobs[t].data.copy()
    for i in range(len(params)):
        out["c%d_after%d" % (c, i)] = params[i].data.copy()
    if backward:
        for i, t in enumerate(tops):
            net.blobs[t].diff[...] = np.load("grad%d_%d.npy" % (c, i))
        net._backward(len(net.layers) - 1, 0)
        for i, b in enumerate(bottoms):
            out["c%d_bgrad%d" % (c, i)] = net.blobs[b].diff.copy()
        for i in range(len(params)):
            out["c%d_pgrad%d" % (c, i)] = params[i].diff.copy()
"""
    out = oracle.run(script, files)
    results = []
    for c, (_, bottoms, tops, _, backward, _) in enumerate(specs):
        def pick(prefix):
            keys = sorted((k for k in out if k.startswith(f"c{c}_{prefix}")),
                          key=lambda k: int(k[len(f"c{c}_{prefix}"):]))
            return [out[k] for k in keys]
        result = {"tops": pick("top"), "blobs_after": pick("after")}
        assert len(result["tops"]) == len(tops), f"case {c}: Caffe returned {len(result['tops'])} of {len(tops)} tops"
        if backward:
            result["bottom_grads"] = pick("bgrad")
            result["blob_grads"] = pick("pgrad")
        results.append(result)
    return results
