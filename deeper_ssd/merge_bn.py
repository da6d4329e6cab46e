"""Fold BatchNorm, Scale and Bias layers into the Convolution/Deconvolution before them, for
deployment (``deeper-ssd merge-bn``).

In a TEST net each of these layers is a per-channel affine map ``y = a_c x + b_c``:

* BatchNorm (global statistics): ``a = 1 / sqrt(var + eps)``, ``b = -mean a``, with
  ``mean = blob0 * f``, ``var = blob1 * f``, ``f = 1 / blob2`` (0 when ``blob2`` is 0), as
  Caffe's BatchNorm forward;
* Scale over channel axis 1 with a learned ``[C]`` blob: ``a = scale``, ``b = bias`` or 0;
* Bias over channel axis 1 with a learned ``[C]`` blob: ``a = 1``, ``b = bias``.

A chain of them directly after a convolution (its top read by nothing else in between, in
place or not) composes into one ``(a, b)`` that goes into the convolution's weights (per output
channel; for a Deconvolution, weight ``[C_in, C_out / group, kh, kw]``, output channel
``group_of(i) * C_out / group + j``) and bias (added with ``bias_term: true`` when the
convolution had none). The folded layers disappear and the convolution writes the chain's last
top, so the rest of the net is unchanged. A BatchNorm that cannot be folded (not after a
convolution, ``use_global_stats: false``, its input read elsewhere, a convolution whose
parameters are shared by name) stays, and :class:`MergeReport` says why.
Arithmetic is float64, stored as float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from . import io
from .net import Net
from .proto import caffe_pb2

__all__ = ["MergeError", "MergeReport", "merge_bn", "merge_bn_files", "max_relative_difference"]

_FOLDABLE = ("BatchNorm", "Scale", "Bias")
_CONVOLUTIONS = ("Convolution", "Deconvolution")


class MergeError(ValueError):
    """The weights do not fit the deploy net (one line for the user)."""


@dataclass
class MergeReport:
    """What :func:`merge_bn` did: ``folded`` maps a convolution to the layers folded into it;
    ``kept`` lists ``(layer, reason)`` for BatchNorm layers left in the net."""
    folded: Dict[str, List[str]] = field(default_factory=dict)
    kept: List[Tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        removed = sum(len(v) for v in self.folded.values())
        lines = [f"folded {removed} layers into {len(self.folded)} convolutions"]
        lines += [f"kept BatchNorm '{name}': {reason}" for name, reason in self.kept]
        return "\n".join(lines)


def _affine(layer, lp: caffe_pb2.LayerParameter) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], str]:
    """``(a, b, "")`` of a foldable layer, or ``(None, None, reason)``."""
    blobs = [b.detach().double().cpu().numpy() for b in layer.blobs]
    if lp.type == "BatchNorm":
        if not layer.use_global_stats:
            return None, None, "use_global_stats: false (normalises with batch statistics)"
        weight = blobs[2].reshape(-1)[0]
        factor = 0.0 if weight == 0 else 1.0 / weight
        a = 1.0 / np.sqrt(blobs[1] * factor + lp.batch_norm_param.eps)
        return a, -blobs[0] * factor * a, ""
    shape = layer.bottom_shapes[0]
    channels = shape[1] if len(shape) > 1 else None
    if len(lp.bottom) != 1 or layer.view != (1, channels) + (1,) * (len(shape) - 2):
        return None, None, f"{lp.type} is not a learned per-channel operand on axis 1"
    if lp.type == "Bias":
        return np.ones_like(blobs[0]), blobs[0], ""
    return blobs[0], blobs[1] if len(blobs) > 1 else np.zeros_like(blobs[0]), ""


def _chain(net: caffe_pb2.NetParameter, layers: Dict[str, object], start: int,
           report: MergeReport) -> List[int]:
    """Indices of the foldable layers that follow convolution ``start`` as a chain."""
    lps = net.layer
    chain: List[int] = []
    blob = lps[start].top[0]
    index = start
    while True:
        # the next layer reading ``blob`` must be the only one to read this version of it
        later = [i for i in range(index + 1, len(lps)) if blob in lps[i].bottom or blob in lps[i].top]
        if not later:
            return chain
        nxt = lps[later[0]]
        if nxt.type not in _FOLDABLE or list(nxt.bottom) != [blob] or len(nxt.top) != 1:
            return chain
        if nxt.top[0] != blob:
            readers = [i for i in later if blob in lps[i].bottom]
            rewritten = [i for i in later if blob in lps[i].top]
            if len(readers) > 1 and (not rewritten or readers[1] < rewritten[0]):
                if nxt.type == "BatchNorm":
                    report.kept.append((nxt.name, f"its input '{blob}' is also read by another layer"))
                return chain
        a, _, reason = _affine(layers[nxt.name], nxt)
        if a is None:
            if nxt.type == "BatchNorm":
                report.kept.append((nxt.name, reason))
            return chain
        chain.append(later[0])
        blob, index = nxt.top[0], later[0]


def _fold_into(layer, lp: caffe_pb2.LayerParameter, a: np.ndarray, b: np.ndarray):
    """The convolution's new (weight, bias) arrays for ``y = a * conv(x) + b``."""
    weight = layer.blobs[0].detach().double().cpu().numpy()
    bias = layer.blobs[1].detach().double().cpu().numpy() if len(layer.blobs) > 1 else np.zeros(len(a))
    if lp.type == "Convolution":
        weight = weight * a.reshape(-1, 1, 1, 1)
    else:
        group = lp.convolution_param.group
        per_group = weight.shape[1]
        rows = a.reshape(group, per_group)[np.arange(weight.shape[0]) // (weight.shape[0] // group)]
        weight = weight * rows[:, :, None, None]
    return weight, a * bias + b


def merge_bn(deploy: caffe_pb2.NetParameter, weights: caffe_pb2.NetParameter,
             ) -> Tuple[caffe_pb2.NetParameter, caffe_pb2.NetParameter, MergeReport]:
    """Fold every foldable BatchNorm/Scale/Bias chain of the TEST net ``deploy`` (weights from the
    caffemodel ``weights``) into its convolution. Returns the new deploy net (no blobs), the new
    caffemodel (every layer of the new net with its blobs) and a report."""
    net = Net(deploy, "TEST", device="cpu", seed=0)
    missing = [layer.name for layer in net.layers if len(layer.blobs)]
    loaded = set(net.load_caffemodel(weights))
    missing = [name for name in missing if name not in loaded]
    if missing:
        raise MergeError(f"the weights have no blobs for layer(s) {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    out = caffe_pb2.NetParameter()
    out.CopyFrom(deploy)
    del out.layer[:]
    out.layer.extend(lp for lp in deploy.layer if lp.name in net.layer_by_name)
    report = MergeReport()
    arrays: Dict[str, List[np.ndarray]] = {layer.name: [b.detach().cpu().numpy() for b in layer.blobs]
                                           for layer in net.layers}
    drop = set()
    for index, lp in enumerate(out.layer):
        if lp.type not in _CONVOLUTIONS or index in drop or len(lp.top) != 1:
            continue
        chain = _chain(out, net.layer_by_name, index, report)
        if not chain:
            continue
        if any(spec.name for spec in lp.param):
            report.kept.extend((out.layer[i].name, f"convolution '{lp.name}' shares its parameters by name")
                               for i in chain if out.layer[i].type == "BatchNorm")
            continue
        a, b = np.ones(lp.convolution_param.num_output), np.zeros(lp.convolution_param.num_output)
        for i in chain:
            a_i, b_i, _ = _affine(net.layer_by_name[out.layer[i].name], out.layer[i])
            a, b = a_i * a, a_i * b + b_i
        weight, bias = _fold_into(net.layer_by_name[lp.name], lp, a, b)
        arrays[lp.name] = [weight.astype(np.float32), bias.astype(np.float32)]
        lp.convolution_param.bias_term = True
        lp.top[0] = out.layer[chain[-1]].top[0]
        drop.update(chain)
        report.folded[lp.name] = [out.layer[i].name for i in chain]
    kept_layers = [lp for i, lp in enumerate(out.layer) if i not in drop]
    explained = {name for name, _ in report.kept}
    report.kept.extend((lp.name, "it does not directly follow a Convolution or Deconvolution")
                       for lp in kept_layers if lp.type == "BatchNorm" and lp.name not in explained)
    del out.layer[:]
    out.layer.extend(kept_layers)
    model = caffe_pb2.NetParameter()
    model.CopyFrom(out)
    for lp in model.layer:
        lp.blobs.extend(io.array_to_blob(a) for a in arrays[lp.name])
    return out, model, report


def max_relative_difference(deploy_a: caffe_pb2.NetParameter, weights_a: caffe_pb2.NetParameter,
                            deploy_b: caffe_pb2.NetParameter, weights_b: caffe_pb2.NetParameter,
                            seed: int = 0) -> Dict[str, float]:
    """Run both nets on one random image-like input (uniform in [-128, 128), a mean-subtracted
    image) and return ``max |a - b| / max |a|``
    for every output blob both have and, in place of DetectionOutput's detections (NMS ties may
    reorder them), for that layer's inputs."""
    nets = [Net(d, "TEST", device="cpu", seed=seed) for d in (deploy_a, deploy_b)]
    for net, weights in zip(nets, (weights_a, weights_b)):
        net.load_caffemodel(weights)
    data = {name: torch.from_numpy(np.random.default_rng(seed).uniform(
        -128, 128, nets[0].blob_shapes[name]).astype(np.float32)) for name in nets[0].inputs}
    with torch.no_grad():
        for net in nets:
            net(keep_blobs=True, **data)
    names = set(nets[0].outputs)
    for layer in nets[0].layers:
        if layer.caffe_type == "DetectionOutput":
            names = (names - set(layer.lp.top)) | set(layer.lp.bottom)
    result = {}
    for name in sorted(names & set(nets[1].blobs)):
        a, b = nets[0].blobs[name], nets[1].blobs[name]
        result[name] = float((a - b).abs().max()) / (float(a.abs().max()) or 1.0)
    return result


def merge_bn_files(deploy: Union[str, Path], weights: Union[str, Path], out_deploy: Union[str, Path],
                   out_weights: Union[str, Path]) -> Tuple[MergeReport, Dict[str, float]]:
    """:func:`merge_bn` on files; writes both outputs and returns the report and the per-output
    relative differences of the merged net against the original on a random input."""
    net, model = io.read_net(deploy), io.read_caffemodel(weights)
    merged, merged_model, report = merge_bn(net, model)
    io.write_net(merged, out_deploy)
    io.write_caffemodel(merged_model, out_weights)
    return report, max_relative_difference(net, model, merged, merged_model)
