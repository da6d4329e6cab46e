"""ImageNet VGG16 weights (torchvision's layout, or Caffe's original VGG16) → the SSD fork's base model
``VGG_ILSVRC_16_layers_fc_reduced`` (conv1_1 … conv5_3, fc6 1024×512×3×3 with dilation 6, fc7
1024×1024×1×1), for ``train --weights`` without a Caffe model-zoo file.

* **Input convention.** torchvision's VGG16 expects RGB in [0, 1], normalised per channel by
  ``(x - mean) / std`` with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225). The zoo's
  data layers feed BGR pixel values in 0–255 minus ``mean_value`` (104, 117, 123). With ``p``
  the 0–255 RGB pixel and ``x = p_bgr - M`` the Caffe input, torchvision's input is
  ``(x[bgr(c)] + M[bgr(c)] - 255 mean[c]) / (255 std[c])``, an affine map per channel. conv1_1
  absorbs it: its input channels are reordered RGB → BGR and divided by ``255 std[c]``, and
  the constant ``(M - 255 mean) / (255 std)`` times each filter's taps is added to its bias.
  This is exact wherever conv1_1's 3×3 window lies inside the image. On the image border the
  window reads zero padding, which torchvision's net sees as the pixel ``255 mean`` and the
  converted net as the pixel ``M``: conv1_1 differs on its outermost row and column, and the
  difference reaches 6 cells into conv5_3 (each 3×3 convolution widens it by one, each 2×2
  pool halves it, rounding up: 1, 2 → 1, 3 → 2, 5 → 3, 6 → 3, 6), i.e. about the outer 96
  input pixels. Fine-tuning absorbs this; it is why the conversion test compares interiors.
* **fc6 / fc7** (SSD's "subsample the parameters of fc6 and fc7", following DeepLab-LargeFOV,
  which reduces fc6 to 1024 3×3 filters by decimation): fc6's 4096×25088 matrix viewed as
  4096×512×7×7 (torchvision flattens pool5 as C×H×W, as Caffe does) keeps every 4th filter and
  every 3rd tap in each spatial direction from the first (rows 0, 4, …, 4092; taps 0, 3, 6) →
  1024×512×3×3; the 3 taps at spacing 3 of a stride-32 map are spacing 6 at stride 16 (pool5 is
  3×3/1 in the reduced net), hence dilation 6. fc7's 4096×4096 keeps every 4th row and column →
  1024×1024×1×1. Biases keep every 4th entry. The published fc-reduced caffemodel's offsets
  are not documented; this is the rule public re-implementations use (docs/decisions.md).
* fc8 (the 1000-way classifier) is dropped.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from . import io
from .proto import caffe_pb2

PathLike = Union[str, os.PathLike]

__all__ = ["VGGConversionError", "TORCHVISION_MEAN", "TORCHVISION_STD", "CAFFE_MEAN_BGR",
           "VGG16_CONVS", "convert_state_dict", "convert_caffe_vgg16", "base_net", "convert_file"]

TORCHVISION_MEAN = (0.485, 0.456, 0.406)     # RGB, of [0, 1] pixels
TORCHVISION_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)       # the zoo's transform_param mean_value

#: torchvision ``features.N`` index of each VGG16 convolution, in Caffe's names
VGG16_CONVS: Tuple[Tuple[str, int], ...] = tuple(
    (f"conv{block}_{i + 1}", index) for block, indices in (
        (1, (0, 2)), (2, (5, 7)), (3, (10, 12, 14)), (4, (17, 19, 21)), (5, (24, 26, 28)))
    for i, index in enumerate(indices))


class VGGConversionError(ValueError):
    """The state dict is not torchvision's VGG16 layout: the message names the key."""


def _take(state: Dict[str, np.ndarray], key: str, shape: Sequence[int]) -> np.ndarray:
    if key not in state:
        raise VGGConversionError(f"no {key!r} in the state dict (expected torchvision's VGG16: "
                                 "features.N.weight/bias, classifier.0/3.weight/bias)")
    value = state[key]
    if tuple(value.shape) != tuple(shape):
        raise VGGConversionError(f"{key!r} has shape {tuple(value.shape)}, VGG16 needs {tuple(shape)}")
    return value


def _reduce_fc(fc6: np.ndarray, fc6_bias: np.ndarray, fc7: np.ndarray, fc7_bias: np.ndarray
               ) -> Dict[str, List[np.ndarray]]:
    """fc6 (4096 x 25088, inputs C x H x W) and fc7 (4096 x 4096) decimated to the reduced
    layers (module docstring)."""
    # fc6 input k = c*49 + y*7 + x: the columns of taps y, x in (0, 3, 6)
    taps = np.arange(0, 7, 3)
    columns = (np.arange(512)[:, None, None] * 49 + taps[None, :, None] * 7 + taps[None, None, :]).reshape(-1)
    return {"fc6": [fc6[::4][:, columns].reshape(1024, 512, 3, 3), fc6_bias[::4]],
            "fc7": [fc7[::4, ::4].reshape(1024, 1024, 1, 1), fc7_bias[::4]]}


def _float32(blobs: Dict[str, List[np.ndarray]]) -> Dict[str, List[np.ndarray]]:
    return {name: [np.ascontiguousarray(b, dtype=np.float32) for b in arrays] for name, arrays in blobs.items()}


def _conv_shapes():
    """(Caffe name, torchvision index, weight shape) of the 13 convolutions."""
    channels_in = 3
    for name, index in VGG16_CONVS:
        channels_out = {"1": 64, "2": 128, "3": 256}.get(name[4], 512)
        yield name, index, (channels_out, channels_in, 3, 3)
        channels_in = channels_out


def convert_state_dict(state: Dict[str, np.ndarray], caffe_mean: Sequence[float] = CAFFE_MEAN_BGR
                       ) -> Dict[str, List[np.ndarray]]:
    """``{caffe layer: [weight, bias]}`` (float32) from torchvision VGG16 arrays; see the module
    docstring for conv1_1's folding and the fc6/fc7 decimation."""
    out: Dict[str, List[np.ndarray]] = {}
    for name, index, shape in _conv_shapes():
        weight = _take(state, f"features.{index}.weight", shape).astype(np.float64)
        bias = _take(state, f"features.{index}.bias", shape[:1]).astype(np.float64)
        if name == "conv1_1":
            std = 255.0 * np.asarray(TORCHVISION_STD)                          # RGB
            offset = (np.asarray(caffe_mean[::-1]) - 255.0 * np.asarray(TORCHVISION_MEAN)) / std
            bias = bias + np.einsum("ochw,c->o", weight, offset)
            weight = (weight / std[None, :, None, None])[:, ::-1]              # RGB -> BGR
        out[name] = [weight, bias]
    out.update(_reduce_fc(_take(state, "classifier.0.weight", (4096, 512 * 7 * 7)),
                          _take(state, "classifier.0.bias", (4096,)),
                          _take(state, "classifier.3.weight", (4096, 4096)),
                          _take(state, "classifier.3.bias", (4096,))))
    return _float32(out)


def convert_caffe_vgg16(layers: Dict[str, List[np.ndarray]]) -> Dict[str, List[np.ndarray]]:
    """The same reduction from the original Caffe VGG16 (``VGG_ILSVRC_16_layers.caffemodel``,
    a V1 file; ``{layer: [weight, bias]}`` as read): it already takes BGR 0-255 input minus
    its mean (103.939, 116.779, 123.68), which the fork fed as (104, 117, 123) unchanged, so the
    convolutions are copied as they are and only fc6/fc7 are decimated. Legacy 4-D blob
    shapes (1 x 1 x rows x cols) are accepted."""
    def blob(name: str, i: int, shape) -> np.ndarray:
        arrays = layers.get(name)
        if arrays is None or len(arrays) != 2:
            raise VGGConversionError(f"no layer {name!r} with weight and bias (expected Caffe's VGG16: "
                                     "conv1_1 ... conv5_3, fc6, fc7)")
        value = arrays[i]
        stripped = value.shape[next((k for k, d in enumerate(value.shape) if d != 1), len(value.shape)):]
        if stripped != tuple(shape):               # legacy blobs pad the shape with leading 1s
            raise VGGConversionError(f"layer {name!r} blob {i} has shape {tuple(value.shape)}, VGG16 needs "
                                     f"{tuple(shape)}")
        return value.reshape(shape)

    out = {name: [blob(name, 0, shape), blob(name, 1, shape[:1])] for name, _, shape in _conv_shapes()}
    out.update(_reduce_fc(blob("fc6", 0, (4096, 25088)), blob("fc6", 1, (4096,)),
                          blob("fc7", 0, (4096, 4096)), blob("fc7", 1, (4096,))))
    return _float32(out)


def base_net(input_size: int = 300) -> caffe_pb2.NetParameter:
    """The fork's fc-reduced VGG16 body (``deeper_ssd.builder.ssd.vgg16_reduced``) behind an
    Input layer: the layer definitions the converted blobs are stored with."""
    from .builder.netspec import L, NetSpec
    from .builder.ssd import FeatureNet, vgg16_reduced
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, input_size, input_size]))
    vgg16_reduced(FeatureNet(n))
    return n.to_proto("VGG_ILSVRC_16_layers_fc_reduced")


def _load_state_dict(path: PathLike) -> Dict[str, np.ndarray]:
    import pickle
    import torch
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise VGGConversionError(f"{path}: no such file") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VGGConversionError(f"{path}: not a PyTorch state dict of tensors ({first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise VGGConversionError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {k: v.detach().cpu().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}


def convert_file(source: PathLike, out: PathLike, caffe_mean: Sequence[float] = CAFFE_MEAN_BGR
                 ) -> List[str]:
    """Convert ``source`` into the caffemodel ``out``: torchvision's VGG16 state dict
    (``vgg16-397923af.pth``), or with a ``.caffemodel`` suffix Caffe's VGG16 (``caffe_mean``
    then unused). Returns the layer names written."""
    if str(source).endswith(".caffemodel"):
        try:
            model = io.read_caffemodel(source)
        except (OSError, io.CaffeFormatError) as err:
            raise VGGConversionError(f"{source}: {getattr(err, 'strerror', None) or err}") from None
        blobs = convert_caffe_vgg16({layer.name: [io.blob_to_array(b) for b in layer.blobs]
                                     for layer in model.layer if len(layer.blobs)})
    else:
        blobs = convert_state_dict(_load_state_dict(source), caffe_mean)
    net = base_net()
    for layer in net.layer:
        if layer.name in blobs:
            layer.blobs.extend(io.array_to_blob(b) for b in blobs[layer.name])
    io.write_caffemodel(net, Path(out))
    return [layer.name for layer in net.layer if layer.name in blobs]
