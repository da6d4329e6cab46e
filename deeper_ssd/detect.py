"""Inference on image files: SSD's test-time preprocessing, a forward pass, boxes in pixels.

Preprocessing is the SSD fork's deploy path (``examples/ssd/ssd_detect.py``): the BGR image is
warped to the net's input size with bilinear interpolation, the per-channel mean (BGR order)
is subtracted and the result multiplied by ``scale``; the net's DetectionOutput rows
``[image, label, score, xmin, ymin, xmax, ymax]`` (normalised) are scaled to the original image.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .net import Net

__all__ = ["Detection", "preprocess", "detect", "draw", "write_outputs", "SSD_MEAN_BGR"]

SSD_MEAN_BGR = (104.0, 117.0, 123.0)


@dataclass
class Detection:
    """One detected object in original-image pixels (Caffe's normalised corners times the image
    width and height, not clipped)."""
    label: int
    name: str
    score: float
    xmin: float
    ymin: float
    xmax: float
    ymax: float


def read_image(path) -> np.ndarray:
    """An image file as an H x W x 3 uint8 BGR array; ValueError naming the file if unreadable."""
    import cv2
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: cannot read as an image")
    return image


def preprocess(image: np.ndarray, height: int, width: int, mean: Sequence[float] = SSD_MEAN_BGR,
               scale: float = 1.0) -> torch.Tensor:
    """H x W x 3 uint8 BGR -> 1 x 3 x height x width float32 (warped, mean-subtracted, scaled)."""
    import cv2
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    resized -= np.asarray(mean, dtype=np.float32).reshape(1, 1, -1)
    resized *= scale
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))[None]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _detection_blob(net: Net) -> str:
    names = [layer.lp.top[0] for layer in net.layers if layer.caffe_type == "DetectionOutput"]
    if len(names) != 1:
        raise ValueError(f"net '{net.name}' needs exactly one DetectionOutput layer, has {len(names)}")
    return names[0]


@torch.no_grad()
def detect(net: Net, images: Sequence[np.ndarray], labels: Optional[Dict[int, str]] = None,
           mean: Sequence[float] = SSD_MEAN_BGR, scale: float = 1.0,
           threshold: float = 0.5, warn: Callable[[str], None] = _warn) -> List[List[Detection]]:
    """Run a deploy net on BGR images (any sizes); detections with score >= threshold per image.
    Rows with a non-finite score or coordinate (untrained or diverged weights) are dropped and
    counted in one ``warn`` line."""
    data = net.inputs[0]
    _, _, height, width = net.blob_shapes[data]
    top = _detection_blob(net)
    batch = torch.cat([preprocess(im, height, width, mean, scale) for im in images]).to(net.device)
    rows = net(**{data: batch})[top].reshape(-1, 7).cpu().numpy()
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        warn(f"{int((~finite).sum())} detection(s) with a non-finite score or coordinate dropped "
             "(untrained or diverged weights?)")
    results: List[List[Detection]] = [[] for _ in images]
    for image_id, label, score, x0, y0, x1, y1 in rows[finite]:
        if label < 0 or score < threshold:
            continue
        h, w = images[int(image_id)].shape[:2]
        name = (labels or {}).get(int(label), str(int(label)))
        results[int(image_id)].append(Detection(int(label), name, float(score),
                                                float(x0 * w), float(y0 * h), float(x1 * w), float(y1 * h)))
    return results


def draw(image: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
    """A copy of the BGR image with each detection's box, name and score drawn."""
    import cv2
    canvas = image.copy()
    h, w = canvas.shape[:2]
    for det in detections:
        colour = tuple(int(c) for c in np.random.default_rng(det.label).integers(64, 256, 3))
        p0 = (_pixel(det.xmin, w), _pixel(det.ymin, h))     # far-outside corners drawn at the border
        p1 = (_pixel(det.xmax, w), _pixel(det.ymax, h))
        cv2.rectangle(canvas, p0, p1, colour, 2)
        cv2.putText(canvas, f"{det.name} {det.score:.2f}", (p0[0], max(p0[1] - 4, 10)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    return canvas


def _pixel(value: float, size: int) -> int:
    return int(round(min(max(value, -1.0), float(size))))


def write_outputs(paths: Sequence[Path], images: Sequence[np.ndarray],
                  detections: Sequence[Sequence[Detection]], out_dir: Path) -> Path:
    """Write ``<stem>_detections.jpg`` per image and one ``detections.json``; returns the JSON
    path. A folder this call created is removed again when writing fails."""
    import cv2
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        report = []
        for path, image, dets in zip(paths, images, detections):
            cv2.imwrite(str(out_dir / f"{Path(path).stem}_detections.jpg"), draw(image, dets))
            report.append({"image": str(path), "height": image.shape[0], "width": image.shape[1],
                           "detections": [asdict(d) for d in dets]})
        json_path = out_dir / "detections.json"
        json_path.write_text(json.dumps(report, indent=1))
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return json_path
