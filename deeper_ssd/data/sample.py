"""The bundled synthetic drone data set: rendered airframes composited onto real photos.

:func:`make_sample_set` draws, with a fixed seed, ``train + test`` images of ``width x height``
pixels (the two subsets from separate random streams, so the test images are the same whatever
the number of training images): a random crop of one of the background photos in
``data/sample/backgrounds`` (sky, city, landscape; sources and licences in
data/sample/README.md) with one to three drones on it. A drone
is a silhouette of a quadcopter, hexacopter or fixed-wing airframe, rendered at 4x and reduced
(anti-aliased), rotated, squashed for perspective, blurred, hazed toward the sky colour and given
a random contrast. Box sizes follow the paper's Table 2 buckets of ``box area / image area``:
small (S, <= 0.12 %) 63.62 % of the objects; medium (<= 1 %), large (<= 10 %) and super-large
(> 10 %) share the rest in the paper's proportions 36.41 : 7.28 : 0.26.

Output (``out``)::

    JPEGImages/*.jpg  Annotations/*.xml (VOC, class "drone", 1-based pixel boxes)
    trainval.txt  test.txt  test_name_size.txt  labelmap_drone.prototxt
    trainval_lmdb/  test_lmdb/  (encoded JPEG AnnotatedDatum records, as create_data.sh makes)
    stats.json  (object counts per size bucket)
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..eval.sizes import SIZE_BUCKETS, bucket_of
from .annoset import ConvertOptions, build_annoset, write_name_size_file

__all__ = ["make_sample_set", "SampleReport",
           "default_backgrounds_dir", "render_airframe"]

_LOWEST_RATIO = 0.0003          # smallest S box: ~9x9 px on a 480x360 image
AIRFRAMES = ("quadcopter", "hexacopter", "fixed-wing")


def _bucket_probabilities() -> np.ndarray:
    """S keeps its 63.62 %; M, L, XL share the remaining 36.38 % as 36.41 : 7.28 : 0.26."""
    small = SIZE_BUCKETS[0][2]
    rest = np.array([b[2] for b in SIZE_BUCKETS[1:]])
    return np.concatenate([[small], rest / rest.sum() * (1 - small)])


def default_backgrounds_dir() -> Path:
    """``data/sample/backgrounds`` of the checkout this package is imported from."""
    return Path(__file__).resolve().parents[2] / "data" / "sample" / "backgrounds"


def render_airframe(kind: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A ``size x size`` float32 alpha mask (0..1) of an airframe seen from below, centred."""
    s = 4                                   # supersampling factor
    n = size * s
    mask = np.zeros((n, n), np.uint8)
    c = n // 2
    line = cv2.LINE_AA
    if kind in ("quadcopter", "hexacopter"):
        arms = 4 if kind == "quadcopter" else 6
        arm = n * rng.uniform(0.26, 0.34)
        rotor = n * rng.uniform(0.09, 0.13)
        start = rng.uniform(0, np.pi) if kind == "hexacopter" else np.pi / 4
        for k in range(arms):
            angle = start + 2 * np.pi * k / arms
            end = (int(c + arm * np.cos(angle)), int(c + arm * np.sin(angle)))
            cv2.line(mask, (c, c), end, 255, max(2, int(n * 0.03)), line)
            cv2.circle(mask, end, int(rotor), 255, max(2, int(n * 0.012)), line)   # rotor guard ring
            cv2.circle(mask, end, int(n * 0.025), 255, -1, line)                   # motor
        body = (int(n * rng.uniform(0.07, 0.1)), int(n * rng.uniform(0.09, 0.13)))
        cv2.ellipse(mask, (c, c), body, 0, 0, 360, 255, -1, line)
    elif kind == "fixed-wing":
        span, length = n * rng.uniform(0.42, 0.48), n * rng.uniform(0.30, 0.38)
        chord = n * rng.uniform(0.06, 0.09)
        cv2.ellipse(mask, (c, c), (int(n * 0.035), int(length)), 0, 0, 360, 255, -1, line)  # fuselage
        wing_y = int(c - length * 0.2)
        wing = np.array([[c - span, wing_y], [c + span, wing_y], [c + span * 0.9, wing_y + chord],
                         [c - span * 0.9, wing_y + chord]], np.int32)
        cv2.fillPoly(mask, [wing], 255, line)
        tail_y, tail_span = int(c + length * 0.85), span * 0.32
        tail = np.array([[c - tail_span, tail_y], [c + tail_span, tail_y],
                         [c + tail_span * 0.8, tail_y + chord * 0.7], [c - tail_span * 0.8, tail_y + chord * 0.7]], np.int32)
        cv2.fillPoly(mask, [tail], 255, line)
    else:
        raise ValueError(f"unknown airframe {kind!r}; choose from {', '.join(AIRFRAMES)}")
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def _pose(mask: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Rotate (any angle; fixed-wing within 40 degrees of an axis) and squash one axis for
    perspective; return the mask cropped to its tight box."""
    n = mask.shape[0]
    angle = rng.uniform(-180, 180) if kind != "fixed-wing" else rng.uniform(-40, 40) + rng.choice([0, 90, 180, 270])
    matrix = cv2.getRotationMatrix2D((n / 2, n / 2), angle, 1.0)
    out = cv2.warpAffine(mask, matrix, (n, n), flags=cv2.INTER_LINEAR)
    squash = rng.uniform(0.55, 1.0)
    out = cv2.resize(out, (n, max(8, int(n * squash))), interpolation=cv2.INTER_AREA)
    ys, xs = np.nonzero(out > 0.02)
    return out[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


@dataclass
class _Object:
    box: Tuple[int, int, int, int]     # 0-based inclusive pixel box (x0, y0, x1, y1)
    bucket: str
    airframe: str


def _place(alpha: np.ndarray, target_area: float, shape: Tuple[int, int], taken: List[Tuple[int, int, int, int]],
           rng: np.random.Generator) -> Optional[Tuple[np.ndarray, int, int]]:
    """Scale ``alpha`` so its box covers ``target_area`` pixels and find a free spot."""
    h, w = alpha.shape
    scale = math.sqrt(target_area / (h * w))
    bw, bh = max(3, int(round(w * scale))), max(3, int(round(h * scale)))
    height, width = shape
    if bw >= width - 2 or bh >= height - 2:
        return None
    scaled = cv2.resize(alpha, (bw, bh), interpolation=cv2.INTER_AREA)
    for _ in range(30):
        x, y = int(rng.integers(1, width - bw - 1)), int(rng.integers(1, height - bh - 1))
        if all(x + bw < a or b < x or y + bh < c or d < y for a, c, b, d in taken):
            return scaled, x, y
    return None


def _draw_drone(img: np.ndarray, alpha: np.ndarray, x: int, y: int, rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """Composite a drone: body colour, contrast, haze toward the local background, blur.
    Returns the 0-based inclusive tight box of the visible silhouette.

    Downscaling thins a small airframe's arms to partial coverage; the alpha is renormalised
    (its densest pixel opaque) so that a drone of a few pixels stays a visible blob, as real
    small drones are, rather than a faint smudge no detector could learn."""
    h, w = alpha.shape
    alpha = np.clip(alpha / max(float(alpha.max()), 1e-6) * 1.25, 0.0, 1.0)
    region = img[y:y + h, x:x + w].astype(np.float32)
    local = region.reshape(-1, 3).mean(0)
    dark = np.array([rng.uniform(10, 50)] * 3) + rng.uniform(-10, 10, 3)
    light = np.array([rng.uniform(180, 240)] * 3) + rng.uniform(-10, 10, 3)     # white airframe
    # a dark airframe against bright sky, a light one against dark ground; 15 % the other way
    body = dark if (local.mean() > 110) == (rng.uniform() > 0.15) else light
    contrast = rng.uniform(0.75, 1.0)
    haze = rng.uniform(0.0, 0.3)
    colour = local + contrast * (body - local)
    colour = (1 - haze) * colour + haze * local
    sigma = rng.uniform(0.0, 1.0) * max(1.0, min(h, w) / 40)
    a = cv2.GaussianBlur(alpha, (0, 0), sigma) if sigma > 0.3 else alpha
    a = a[:, :, None]
    img[y:y + h, x:x + w] = np.clip(region * (1 - a) + colour * a, 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(alpha > 0.25)
    return x + xs.min(), y + ys.min(), x + xs.max(), y + ys.max()


def _draw_image(photos: Sequence[np.ndarray], width: int, height: int,
                rng: np.random.Generator) -> Tuple[np.ndarray, List[_Object]]:
    """One sample image (``height x width x 3`` BGR): a random crop of a random photo, mirrored
    half the time, with one to three drones whose sizes follow the Table 2 buckets."""
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    crop = rng.uniform(0.55, 1.0)
    ch, cw = int(ph * crop), int(min(pw, ph * crop * width / height))
    y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    img = cv2.resize(photo[y0:y0 + ch, x0:x0 + cw], (width, height), interpolation=cv2.INTER_AREA)
    if rng.uniform() < 0.5:
        img = np.ascontiguousarray(img[:, ::-1])
    probabilities = _bucket_probabilities()
    image_area = width * height
    objects: List[_Object] = []
    for _ in range(int(rng.choice([1, 1, 2, 2, 3]))):
        bucket = int(rng.choice(len(SIZE_BUCKETS), p=probabilities))
        _, upper, _ = SIZE_BUCKETS[bucket]
        lower = SIZE_BUCKETS[bucket - 1][1] if bucket else _LOWEST_RATIO
        ratio = math.exp(rng.uniform(math.log(lower * 1.05), math.log(upper * 0.95)))
        kind = AIRFRAMES[int(rng.integers(len(AIRFRAMES)))]
        alpha = _pose(render_airframe(kind, rng, 128 if ratio < 0.01 else 256), kind, rng)
        placed = _place(alpha, ratio * image_area, (height, width), [o.box for o in objects], rng)
        if placed is None:
            continue
        scaled, x, y = placed
        ys, xs = np.nonzero(scaled > 0.25)
        if len(xs) == 0 or np.ptp(xs) < 2 or np.ptp(ys) < 2:
            continue                # too thin to give a box of positive area
        box = _draw_drone(img, scaled, x, y, rng)
        # the size the LMDB stores: normalised (xmax - xmin) * (ymax - ymin), VOC coordinates
        area = (box[2] - box[0]) * (box[3] - box[1]) / image_area
        objects.append(_Object(box, bucket_of(area), kind))
    return img, objects


def _voc_xml(name: str, width: int, height: int, objects: Sequence[_Object]) -> str:
    parts = [f"<annotation>\n  <folder>sample</folder>\n  <filename>{name}.jpg</filename>\n"
             f"  <size>\n    <width>{width}</width>\n    <height>{height}</height>\n    <depth>3</depth>\n  </size>\n"]
    for o in objects:
        x0, y0, x1, y1 = o.box
        parts.append(f"  <object>\n    <name>drone</name>\n    <pose>{o.airframe}</pose>\n    <truncated>0</truncated>\n"
                     f"    <difficult>0</difficult>\n    <bndbox>\n      <xmin>{x0 + 1}</xmin>\n      <ymin>{y0 + 1}</ymin>\n"
                     f"      <xmax>{x1 + 1}</xmax>\n      <ymax>{y1 + 1}</ymax>\n    </bndbox>\n  </object>\n")
    parts.append("</annotation>\n")
    return "".join(parts)


@dataclass
class SampleReport:
    """What :func:`make_sample_set` wrote: counts, per-bucket object shares, build seconds."""
    out: str
    train: int
    test: int
    objects: Dict[str, int]
    seconds: float

    def shares(self) -> Dict[str, float]:
        total = sum(self.objects.values()) or 1          # a set without drones: all 0
        return {k: v / total for k, v in self.objects.items()}

    def summary(self) -> str:
        shares = ", ".join(f"{k} {100 * v:.1f} %" for k, v in self.shares().items())
        return (f"{self.out}: {self.train} train + {self.test} test images, "
                f"{sum(self.objects.values())} drones ({shares}) in {self.seconds:.1f} s")


def make_sample_set(out: Path, seed: int = 0, train: int = 300, test: int = 100,
                    width: int = 480, height: int = 360,
                    backgrounds: Optional[Path] = None, labelmap: Optional[Path] = None) -> SampleReport:
    """Write the synthetic drone set to ``out`` (replacing an earlier one); see the module
    docstring for the layout. The same ``seed`` gives the same files. ``backgrounds`` defaults
    to data/sample/backgrounds, ``labelmap`` to data/labelmap_drone.prototxt."""
    start = time.perf_counter()
    out = Path(out)
    backgrounds = Path(backgrounds) if backgrounds else default_backgrounds_dir()
    labelmap = Path(labelmap) if labelmap else default_backgrounds_dir().parents[1] / "labelmap_drone.prototxt"
    if not labelmap.is_file():
        raise FileNotFoundError(f"{labelmap}: label map not found")
    photos = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in sorted(backgrounds.glob("*.jpg"))]
    if not photos or any(p is None for p in photos):
        raise FileNotFoundError(f"{backgrounds}: no readable background photos (*.jpg)")
    if train < 1 or test < 1:
        raise ValueError("train and test need at least one image each")
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (out / "Annotations").mkdir(parents=True, exist_ok=True)
    counts = {name: 0 for name, _, _ in SIZE_BUCKETS}
    lists = {"trainval": [], "test": []}
    # each subset draws from its own stream, so the test images do not depend on ``train``
    subsets = (("trainval", train, np.random.default_rng([seed, 0])),
               ("test", test, np.random.default_rng([seed, 1])))
    for subset, count, rng in subsets:
        for index in range(count):
            name = f"{subset}_{index:05d}"
            img, objects = _draw_image(photos, width, height, rng)
            for obj in objects:
                counts[obj.bucket] += 1
            cv2.imwrite(str(out / "JPEGImages" / f"{name}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
            (out / "Annotations" / f"{name}.xml").write_text(_voc_xml(name, width, height, objects))
            lists[subset].append(f"JPEGImages/{name}.jpg Annotations/{name}.xml\n")
    for subset, lines in lists.items():
        (out / f"{subset}.txt").write_text("".join(lines))
    (out / "labelmap_drone.prototxt").write_text(labelmap.read_text())
    options = ConvertOptions(anno_type="detection", label_map_file=str(out / "labelmap_drone.prototxt"),
                             encode_type="jpg", encoded=True, check_label=True)
    for subset in lists:
        build_annoset(out, out / f"{subset}.txt", out / f"{subset}_lmdb", options, redo=True)
    write_name_size_file(out, out / "test.txt", out / "test_name_size.txt")
    report = SampleReport(str(out), train, test, counts, time.perf_counter() - start)
    (out / "stats.json").write_text(json.dumps({"train": train, "test": test, "seed": seed,
                                                "objects_per_bucket": counts,
                                                "shares": report.shares()}, indent=2) + "\n")
    return report

