"""The SR-TOD view of an image (the paper's Fig. 1): what the net sees, its reconstruction, the
difference map and DGFE's binary mask, side by side.

Works on any net with one DGFE layer whose difference map comes from a DifferenceMap layer fed
by a reconstruction and a DenormalizeImage image (what :mod:`deeper_ssd.builder.heads` builds). The
image is preprocessed as :mod:`deeper_ssd.detect` does, with the mean and scale the net's own
DenormalizeImage layer states.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from .detect import preprocess
from .net import Net

__all__ = ["SRTODView", "srtod_view", "write_view"]


@dataclass
class SRTODView:
    """One image's panels, ``H x W`` at the net's input size. ``image`` and ``reconstruction``
    are ``H x W x 3`` in ``[0, 1]``, BGR; ``difference`` (``H x W``) is the map in image units,
    ``mask`` (``H x W``) DGFE's ``(sign(D − t) + 1) / 2`` ∈ {0, ½, 1} at full resolution."""
    image: np.ndarray
    reconstruction: np.ndarray
    difference: np.ndarray
    mask: np.ndarray
    threshold: float


def _layer_writing(net: Net, blob: str, caffe_type: str):
    layers = [layer for layer in net.layers if blob in layer.lp.top and layer.caffe_type == caffe_type]
    if len(layers) != 1:
        raise ValueError(f"net '{net.name}': blob '{blob}' does not come from one {caffe_type} layer")
    return layers[0]


def _srtod_layers(net: Net):
    """The net's DGFE, DifferenceMap and DenormalizeImage layers; ValueError if they are absent."""
    dgfe = [layer for layer in net.layers if layer.caffe_type == "DGFE"]
    if len(dgfe) != 1:
        raise ValueError(f"net '{net.name}' has {len(dgfe)} DGFE layers; the SR-TOD view needs one "
                         "(generate the model with --head srtod)")
    difference = _layer_writing(net, dgfe[0].lp.bottom[1], "DifferenceMap")
    denormalize = _layer_writing(net, difference.lp.bottom[1], "DenormalizeImage")
    return dgfe[0], difference, denormalize


@torch.no_grad()
def view_blobs(net: Net) -> List[str]:
    """The blobs :func:`srtod_view` reads after the forward pass (difference map, reconstruction,
    image); ValueError if the net has no SR-TOD head."""
    dgfe, difference, _ = _srtod_layers(net)
    return [dgfe.lp.bottom[1], *difference.lp.bottom]


def srtod_view(net: Net, image: np.ndarray) -> SRTODView:
    """Run ``net`` on one ``H x W x 3`` uint8 BGR image and collect the SR-TOD panels."""
    dgfe, difference, denormalize = _srtod_layers(net)
    data = net.inputs[0]
    _, _, height, width = net.blob_shapes[data]
    mean = denormalize.mean.flatten().tolist()
    batch = preprocess(image, height, width, mean, denormalize.scale).to(net.device)
    net(keep_blobs=True, **{data: batch})
    recon_blob, image_blob = difference.lp.bottom
    threshold = float(dgfe.blobs[-1].detach().reshape(()))
    diff = net.blobs[dgfe.lp.bottom[1]][0, 0]
    mask = (torch.sign(diff - threshold) + 1) * 0.5

    def bgr(blob: str) -> np.ndarray:
        pixels = net.blobs[blob][0]
        pixels = pixels.flip(0) if denormalize.reverse else pixels
        return pixels.permute(1, 2, 0).float().cpu().numpy()
    return SRTODView(bgr(image_blob), bgr(recon_blob), diff.float().cpu().numpy(),
                     mask.float().cpu().numpy(), threshold)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(array * 255), 0, 255).astype(np.uint8)


def _caption(panel: np.ndarray, text: str) -> np.ndarray:
    import cv2
    band = np.full((22, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(band, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, panel])


def write_view(view: SRTODView, out_dir: Path, stem: str) -> Dict[str, Path]:
    """Write ``<stem>_reconstruction.png``, ``<stem>_difference.png`` (the map divided by its
    maximum), ``<stem>_mask.png`` (0, 128, 255) and ``<stem>_srtod.png``: image, reconstruction,
    difference map and mask side by side with captions. Returns the paths by panel."""
    import cv2
    out_dir.mkdir(parents=True, exist_ok=True)
    peak = float(view.difference.max())
    gray = {"difference": view.difference / peak if peak > 0 else view.difference,
            "mask": view.mask}
    panels = {"image": _to_uint8(view.image), "reconstruction": _to_uint8(view.reconstruction),
              **{name: cv2.cvtColor(_to_uint8(a), cv2.COLOR_GRAY2BGR) for name, a in gray.items()}}
    captions = {"image": "image (net input)", "reconstruction": "reconstruction",
                "difference": f"difference map (max {peak:.3f} = white)",
                "mask": f"mask (t = {view.threshold:.4f})"}
    paths: Dict[str, Path] = {}
    for name in ("reconstruction", "difference", "mask"):
        paths[name] = out_dir / f"{stem}_{name}.png"
        cv2.imwrite(str(paths[name]), panels[name])
    gap = np.full((panels["image"].shape[0] + 22, 6, 3), 255, np.uint8)
    row: List[np.ndarray] = []
    for name in ("image", "reconstruction", "difference", "mask"):
        row += [_caption(panels[name], captions[name]), gap]
    paths["side_by_side"] = out_dir / f"{stem}_srtod.png"
    cv2.imwrite(str(paths["side_by_side"]), np.concatenate(row[:-1], axis=1))
    return paths
