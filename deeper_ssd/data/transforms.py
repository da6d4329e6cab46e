"""SSD data augmentation exactly as the SSD fork's AnnotatedDataLayer and DataTransformer do it.

Per record (``AnnotatedDataLayer::load_batch``)::

    distort   decode, photometric distortion, JPEG re-encode          (distort_param)
    expand    maybe zoom out onto a mean-filled canvas, JPEG re-encode (expand_param)
    sample    all accepted samples of all batch samplers; one picked uniformly;
              crop to it, JPEG re-encode                               (batch_sampler)
    transform decode, resize, noise, crop_size crop, mirror, (pixel - mean) * scale, CHW

Box arithmetic follows the fork's NormalizedBBox helpers (bbox_util.cpp) in float32: emit
constraint, projection into the crop with clipping, dropping of zero-area boxes, resize policy
update and FIT_SMALL_SIZE extrapolation. Images are OpenCV uint8 arrays ``H x W x C`` in the
stored channel order (BGR); boxes are ``float32 [xmin, ymin, xmax, ymax]`` normalised to the
image. The random draws follow the same distributions as Caffe's but come from a numpy
``Generator`` given by the caller, so a seed fixes every decision.

An option this port cannot reproduce is refused when the transformer is built
(:class:`TransformError`), never ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from .. import io
from ..proto import caffe_pb2

__all__ = ["TransformError", "Objects", "Sample", "SSDTransformer", "sample_from_datum",
           "generate_batch_samples", "satisfy_sample_constraint", "meet_emit_constraint",
           "project_boxes", "jaccard_overlap", "apply_distort", "apply_noise", "apply_resize",
           "update_boxes_by_resize_policy", "encode_jpeg", "decode_image"]

f32 = np.float32
_P = caffe_pb2.ResizeParameter
_INTERP = {_P.LINEAR: cv2.INTER_LINEAR, _P.AREA: cv2.INTER_AREA, _P.NEAREST: cv2.INTER_NEAREST,
           _P.CUBIC: cv2.INTER_CUBIC, _P.LANCZOS4: cv2.INTER_LANCZOS4}
_PAD = {_P.CONSTANT: cv2.BORDER_CONSTANT, _P.MIRRORED: cv2.BORDER_REFLECT101,
        _P.REPEAT_NEAREST: cv2.BORDER_REPLICATE}


class TransformError(ValueError):
    """A transform_param/batch_sampler setting that cannot be honoured, or a record the
    transform cannot process (the message names the record)."""


# ---------------------------------------------------------------------------------------------
# records

@dataclass
class Objects:
    """The objects of one image, flattened in stored order (group by group): ``labels``,
    ``instances`` (int32, n), ``boxes`` (float32, n x 4, normalised), ``difficult`` (bool, n).
    Filtering keeps the order, so groups that lose all objects vanish as in the fork."""
    labels: np.ndarray
    instances: np.ndarray
    boxes: np.ndarray
    difficult: np.ndarray

    @classmethod
    def empty(cls) -> "Objects":
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, 4), f32),
                   np.zeros(0, bool))

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: np.ndarray, boxes: np.ndarray) -> "Objects":
        """The objects where ``keep``, with their boxes replaced by ``boxes[keep]``."""
        return Objects(self.labels[keep], self.instances[keep], boxes[keep].astype(f32),
                       self.difficult[keep])


@dataclass
class Sample:
    """One record on its way through the pipeline: ``image`` is the encoded file (bytes) when
    ``encoded``, else the decoded uint8 array; ``key`` names the record in errors."""
    image: object
    encoded: bool
    objects: Objects
    has_type: bool
    key: str


def sample_from_datum(anno_datum: caffe_pb2.AnnotatedDatum, key: str) -> Sample:
    """Unpack a parsed AnnotatedDatum (encoded bytes or raw CHW uint8 pixels)."""
    datum = anno_datum.datum
    if datum.encoded:
        image = datum.data
    else:
        c, h, w = datum.channels, datum.height, datum.width
        if len(datum.float_data):
            raise TransformError(f"record {key}: float_data datums are not supported "
                                 "(the SSD pipeline works on uint8 images)")
        if c * h * w == 0 or len(datum.data) != c * h * w:
            raise TransformError(f"record {key}: raw datum holds {len(datum.data)} bytes, "
                                 f"expected channels*height*width = {c}*{h}*{w}")
        image = np.frombuffer(datum.data, np.uint8).reshape(c, h, w).transpose(1, 2, 0).copy()
    labels, instances, boxes, difficult = [], [], [], []
    for group in anno_datum.annotation_group:
        for anno in group.annotation:
            b = anno.bbox
            labels.append(group.group_label)
            instances.append(anno.instance_id)
            boxes.append((b.xmin, b.ymin, b.xmax, b.ymax))
            difficult.append(b.difficult)
    objects = (Objects(np.asarray(labels, np.int32), np.asarray(instances, np.int32),
                       np.asarray(boxes, f32).reshape(-1, 4), np.asarray(difficult, bool))
               if labels else Objects.empty())
    return Sample(image, bool(datum.encoded), objects, anno_datum.HasField("type"), key)


def encode_jpeg(img: np.ndarray) -> bytes:
    """EncodeCVMatToDatum(img, "jpg"): OpenCV's default JPEG settings (quality 95)."""
    ok, buf = cv2.imencode(".jpg", img)
    if not ok:
        raise TransformError(f"OpenCV cannot JPEG-encode a {img.shape} image")
    return buf.tobytes()


def decode_image(data: bytes, force_color: bool = False, force_gray: bool = False) -> np.ndarray:
    """DecodeDatumToCVMatNative (IMREAD_UNCHANGED) or, when forced, DecodeDatumToCVMat
    (IMREAD_COLOR / IMREAD_GRAYSCALE). Always ``H x W x C``."""
    flag = (cv2.IMREAD_COLOR if force_color else cv2.IMREAD_GRAYSCALE if force_gray
            else cv2.IMREAD_UNCHANGED)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if img is None:
        raise TransformError("the encoded image cannot be decoded")
    return _hwc(img)


def _hwc(img: np.ndarray) -> np.ndarray:
    return img[:, :, None] if img.ndim == 2 else img


# ---------------------------------------------------------------------------------------------
# NormalizedBBox helpers (bbox_util.cpp), float32, vectorised over boxes (n x 4)

def _box_size(boxes: np.ndarray) -> np.ndarray:
    """BBoxSize (normalised): 0 when xmax < xmin or ymax < ymin, else w*h."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return np.where((w < 0) | (h < 0), f32(0), w * h).astype(f32)


def _clip(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes, f32(0), f32(1)).astype(f32)


def _pairwise_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IntersectBBox of every row of ``a`` (T x 4) with every row of ``b`` (N x 4): T x N x 4,
    all-zero where disjoint (strict comparisons)."""
    a, b = a[:, None, :], b[None, :, :]
    inter = np.concatenate([np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:])], axis=-1)
    disjoint = ((b[..., 0] > a[..., 2]) | (b[..., 2] < a[..., 0]) |
                (b[..., 1] > a[..., 3]) | (b[..., 3] < a[..., 1]))
    inter[disjoint] = 0
    return inter.astype(f32)


def meet_emit_constraint(src: np.ndarray, boxes: np.ndarray,
                         emit: caffe_pb2.EmitConstraint) -> np.ndarray:
    """MeetEmitConstraint of each box against the crop ``src``: CENTER keeps a box whose
    centre lies inside ``src`` (inclusive), MIN_OVERLAP one whose covered fraction exceeds
    ``emit_overlap``."""
    if emit.emit_type == caffe_pb2.EmitConstraint.CENTER:
        xc = (boxes[:, 0] + boxes[:, 2]) / f32(2)
        yc = (boxes[:, 1] + boxes[:, 3]) / f32(2)
        return (xc >= src[0]) & (xc <= src[2]) & (yc >= src[1]) & (yc <= src[3])
    isize = _box_size(_pairwise_intersection(boxes, src[None])[:, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        coverage = np.where(isize > 0, isize / _box_size(boxes), f32(0)).astype(f32)
    return coverage > f32(emit.emit_overlap)


def project_boxes(src: np.ndarray, boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """ProjectBBox: ``boxes`` in the coordinates of ``src``, clipped to [0, 1]; valid where the
    box overlaps ``src`` (touching is no overlap) and its clipped area is positive."""
    overlap = ~((boxes[:, 0] >= src[2]) | (boxes[:, 2] <= src[0]) |
                (boxes[:, 1] >= src[3]) | (boxes[:, 3] <= src[1]))
    sw, sh = src[2] - src[0], src[3] - src[1]
    proj = np.stack([(boxes[:, 0] - src[0]) / sw, (boxes[:, 1] - src[1]) / sh,
                     (boxes[:, 2] - src[0]) / sw, (boxes[:, 3] - src[1]) / sh], axis=1)
    proj = _clip(proj.astype(f32))
    return proj, overlap & (_box_size(proj) > 0)


def update_boxes_by_resize_policy(param: caffe_pb2.ResizeParameter, old_w: int, old_h: int,
                                  boxes: np.ndarray) -> np.ndarray:
    """UpdateBBoxByResizePolicy: re-express boxes after resizing an ``old_w x old_h`` image."""
    new_h, new_w = f32(param.height), f32(param.width)
    ow, oh = f32(old_w), f32(old_h)
    orig_aspect = ow / oh
    new_aspect = new_w / new_h
    x0, y0 = boxes[:, 0] * ow, boxes[:, 1] * oh
    x1, y1 = boxes[:, 2] * ow, boxes[:, 3] * oh
    zero = f32(0)
    mode = param.resize_mode
    if mode == _P.WARP or mode == _P.FIT_SMALL_SIZE:
        if mode == _P.FIT_SMALL_SIZE:
            if orig_aspect < new_aspect:
                new_h = new_w / orig_aspect
            else:
                new_w = orig_aspect * new_h
        x0 = np.maximum(zero, x0 * new_w / ow)
        x1 = np.minimum(new_w, x1 * new_w / ow)
        y0 = np.maximum(zero, y0 * new_h / oh)
        y1 = np.minimum(new_h, y1 * new_h / oh)
    elif mode == _P.FIT_LARGE_SIZE_AND_PAD:
        if orig_aspect > new_aspect:
            pad = (new_h - new_w / orig_aspect) / f32(2)
            x0 = np.maximum(zero, x0 * new_w / ow)
            x1 = np.minimum(new_w, x1 * new_w / ow)
            y0 = pad + np.maximum(zero, y0 * (new_h - f32(2) * pad) / oh)
            y1 = pad + np.minimum(new_h, y1 * (new_h - f32(2) * pad) / oh)
        else:
            pad = (new_w - orig_aspect * new_h) / f32(2)
            x0 = pad + np.maximum(zero, x0 * (new_w - f32(2) * pad) / ow)
            x1 = pad + np.minimum(new_w, x1 * (new_w - f32(2) * pad) / ow)
            y0 = np.maximum(zero, y0 * new_h / oh)
            y1 = np.minimum(new_h, y1 * new_h / oh)
    else:
        raise TransformError(f"unknown resize mode {mode}")
    return np.stack([x0 / new_w, y0 / new_h, x1 / new_w, y1 / new_h], axis=1).astype(f32)


def _extrapolate_boxes(param: caffe_pb2.ResizeParameter, height: int, width: int,
                       crop: np.ndarray, boxes: np.ndarray, key: str) -> np.ndarray:
    """ExtrapolateBBox: FIT_SMALL_SIZE with height_scale and width_scale re-scales the boxes."""
    hs, ws = f32(param.height_scale), f32(param.width_scale)
    if not (hs > 0 and ws > 0 and param.resize_mode == _P.FIT_SMALL_SIZE):
        return boxes
    orig_aspect = f32(width) / f32(height)
    rh, rw = f32(param.height), f32(param.width)
    if orig_aspect < rw / rh:
        rh = rw / orig_aspect
    else:
        rw = rh * orig_aspect
    crop_h = rh * (crop[3] - crop[1])
    crop_w = rw * (crop[2] - crop[0])
    if crop_w < ws or crop_h < hs:
        raise TransformError(f"record {key}: crop {crop_w:g}x{crop_h:g} is smaller than "
                             f"width_scale x height_scale {ws:g}x{hs:g}")
    out = boxes.copy()
    out[:, [0, 2]] = boxes[:, [0, 2]] * crop_w / ws
    out[:, [1, 3]] = boxes[:, [1, 3]] * crop_h / hs
    return out.astype(f32)


# ---------------------------------------------------------------------------------------------
# batch samplers (sampler.cpp)

def _constraint_test(samples: np.ndarray, boxes: np.ndarray,
                     constraint: caffe_pb2.SampleConstraint) -> np.ndarray:
    """SatisfySampleConstraint for T samples against N objects (bool, T).

    The fork's loop sets ``found`` as soon as one test of an object passes and never clears it,
    and skips an object's remaining tests at its first failing one; so a sample is accepted iff
    some object passes the FIRST configured test (jaccard overlap, else sample coverage, else
    object coverage) — later tests never reject. This is that rule, vectorised.
    """
    has = constraint.HasField
    tests = (("min_jaccard_overlap", "max_jaccard_overlap"),
             ("min_sample_coverage", "max_sample_coverage"),
             ("min_object_coverage", "max_object_coverage"))
    first = next((t for t in tests if has(t[0]) or has(t[1])), None)
    if first is None:
        return np.ones(len(samples), bool)
    if len(boxes) == 0:
        return np.zeros(len(samples), bool)
    inter = _pairwise_intersection(samples, boxes)
    iw, ih = inter[..., 2] - inter[..., 0], inter[..., 3] - inter[..., 1]
    sample_size = _box_size(samples)[:, None]
    box_size = _box_size(boxes)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        if first is tests[0]:
            isize = iw * ih
            value = np.where((iw > 0) & (ih > 0), isize / (sample_size + box_size - isize), f32(0))
        else:
            isize = _box_size(inter)
            value = np.where(isize > 0, isize / (sample_size if first is tests[1] else box_size), f32(0))
    value = value.astype(f32)
    ok = np.ones(value.shape, bool)
    if has(first[0]):
        ok &= value >= f32(getattr(constraint, first[0]))
    if has(first[1]):
        ok &= value <= f32(getattr(constraint, first[1]))
    return ok.any(axis=1)


def jaccard_overlap(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """JaccardOverlap(box, each of boxes), normalised coordinates (float32, n)."""
    inter = _pairwise_intersection(box[None], boxes)[0]
    iw, ih = inter[:, 2] - inter[:, 0], inter[:, 3] - inter[:, 1]
    isize = iw * ih
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where((iw > 0) & (ih > 0),
                         isize / (_box_size(box[None]) + _box_size(boxes) - isize), f32(0))
    return value.astype(f32)


def satisfy_sample_constraint(sample: np.ndarray, boxes: np.ndarray,
                              constraint: caffe_pb2.SampleConstraint) -> bool:
    """SatisfySampleConstraint of one sample box against the object boxes (see
    :func:`_constraint_test` for the fork's first-test-decides rule)."""
    return bool(_constraint_test(sample[None], boxes, constraint)[0])


def _sample_boxes(sampler: caffe_pb2.Sampler, count: int, rng: np.random.Generator) -> np.ndarray:
    """SampleBBox, ``count`` times: scale ~ U(min, max); aspect ratio ~ U(min, max) clamped to
    [scale^2, 1/scale^2]; width scale*sqrt(ar), height scale/sqrt(ar); position uniform."""
    scale = rng.uniform(sampler.min_scale, sampler.max_scale, count).astype(f32)
    ar = rng.uniform(sampler.min_aspect_ratio, sampler.max_aspect_ratio, count).astype(f32)
    square = scale.astype(np.float64) ** 2
    ar = np.minimum(np.maximum(ar, square.astype(f32)), (1 / square).astype(f32))
    w = scale * np.sqrt(ar)
    h = scale / np.sqrt(ar)
    u = rng.uniform(size=(2, count))
    x0 = (u[0] * np.maximum(0, f32(1) - w)).astype(f32)
    y0 = (u[1] * np.maximum(0, f32(1) - h)).astype(f32)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1).astype(f32)


def generate_batch_samples(boxes: np.ndarray, batch_samplers: Sequence[caffe_pb2.BatchSampler],
                           rng: np.random.Generator) -> List[np.ndarray]:
    """GenerateBatchSamples: for each sampler using the original image, its trials in order
    (max_trials of them), keeping those that satisfy its constraint, at most max_sample when
    set. (All trials are drawn at once; the fork stops drawing at max_sample, which changes the
    random stream but not the distribution of the kept samples.)"""
    accepted: List[np.ndarray] = []
    for batch_sampler in batch_samplers:
        if not batch_sampler.use_original_image or batch_sampler.max_trials == 0:
            continue
        trials = _sample_boxes(batch_sampler.sampler, batch_sampler.max_trials, rng)
        keep = np.flatnonzero(_constraint_test(trials, boxes, batch_sampler.sample_constraint))
        if batch_sampler.HasField("max_sample"):
            keep = keep[:batch_sampler.max_sample]
        accepted.extend(trials[keep])
    return accepted


# ---------------------------------------------------------------------------------------------
# photometric distortion (im_transforms.cpp) and noise

def _convert(img: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """cv::Mat::convertTo(dst, -1, alpha, beta) on uint8: saturate(round(v*alpha + beta))."""
    lut = np.clip(np.rint(np.arange(256, dtype=f32) * f32(alpha) + f32(beta)), 0, 255)
    return cv2.LUT(img, lut.astype(np.uint8))


def _hsv_channel(img: np.ndarray, channel: int, alpha: float, beta: float) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    hsv[:, :, channel] = _convert(np.ascontiguousarray(hsv[:, :, channel]), alpha, beta)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def apply_distort(img: np.ndarray, p: caffe_pb2.DistortionParameter,
                  rng: np.random.Generator) -> np.ndarray:
    """ApplyDistort on a BGR uint8 image: with probability 1/2 the order brightness, contrast,
    saturation, hue, else brightness, saturation, hue, contrast; then the channel shuffle.
    Every step draws its coin even when its probability is 0."""
    if img.shape[2] != 3:
        raise TransformError(f"distort_param needs 3-channel images, got {img.shape[2]}")

    def brightness(im):
        if rng.uniform() < p.brightness_prob:
            delta = f32(rng.uniform(-p.brightness_delta, p.brightness_delta))
            if abs(delta) > 0:
                return _convert(im, 1.0, delta)
        return im

    def contrast(im):
        if rng.uniform() < p.contrast_prob:
            delta = f32(rng.uniform(p.contrast_lower, p.contrast_upper))
            if abs(delta - f32(1)) > f32(1e-3):
                return _convert(im, delta, 0.0)
        return im

    def saturation(im):
        if rng.uniform() < p.saturation_prob:
            delta = f32(rng.uniform(p.saturation_lower, p.saturation_upper))
            # the fork tests |delta - 1| != 1e-3, so the HSV round trip always happens
            return _hsv_channel(im, 1, delta, 0.0)
        return im

    def hue(im):
        if rng.uniform() < p.hue_prob:
            delta = f32(rng.uniform(-p.hue_delta, p.hue_delta))
            if abs(delta) > 0:
                return _hsv_channel(im, 0, 1.0, delta)   # saturating, no wrap-around
        return im

    def channel_order(im):
        if rng.uniform() < p.random_order_prob:
            return np.ascontiguousarray(im[:, :, rng.permutation(3)])
        return im

    first = rng.uniform()
    steps = ((brightness, contrast, saturation, hue) if first > 0.5
             else (brightness, saturation, hue, contrast))
    for step in steps:
        img = step(img)
    return channel_order(img)


def apply_noise(img: np.ndarray, p: caffe_pb2.NoiseParameter,
                rng: np.random.Generator) -> np.ndarray:
    """ApplyNoise in the fork's order: decolorize, gauss_blur, hist_eq, clahe, jpeg, erode,
    posterize, inverse, saltpepper, convert_to_hsv (``prob`` is not consulted, as in the fork)."""
    out = img
    color = out.shape[2] == 3
    if p.decolorize:
        out = _hwc(cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR))
    if p.gauss_blur:
        out = _hwc(cv2.GaussianBlur(out, (7, 7), 1.5))
    for enabled, equalize in ((p.hist_eq, cv2.equalizeHist),
                              (p.clahe, lambda y: cv2.createCLAHE(clipLimit=4).apply(y))):
        if not enabled:
            continue
        if color:
            ycrcb = cv2.cvtColor(out, cv2.COLOR_BGR2YCrCb)
            ycrcb[:, :, 0] = equalize(np.ascontiguousarray(ycrcb[:, :, 0]))
            out = cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2BGR)
        else:
            out = _hwc(equalize(np.ascontiguousarray(out[:, :, 0])))
    if p.jpeg > 0:
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(p.jpeg)])
        out = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if p.erode:
        element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3), (1, 1))
        out = _hwc(cv2.erode(out, element))
    if p.posterize:
        out = _hwc(cv2.LUT(out, (np.arange(256) // 64 * 64 + 32).astype(np.uint8)))
    if p.inverse:
        out = _hwc(cv2.bitwise_not(out))
    if p.saltpepper:
        values = np.asarray(p.saltpepper_param.value, np.float32).astype(np.uint8)
        rows, cols = out.shape[:2]
        count = int(np.floor(f32(p.saltpepper_param.fraction) * f32(cols) * f32(rows)))
        xs = rng.integers(0, cols, count)
        ys = rng.integers(0, rows, count)
        out = out.copy()
        out[ys, xs] = values if len(values) == out.shape[2] else values[0]
    if p.convert_to_hsv:
        out = cv2.cvtColor(out, cv2.COLOR_BGR2HSV)
    return _hwc(out)


# ---------------------------------------------------------------------------------------------
# resize (im_transforms.cpp)

def _new_size_fit_small(param: caffe_pb2.ResizeParameter, old_w: int, old_h: int) -> Tuple[int, int]:
    """InferNewSize for FIT_SMALL_SIZE: (height, width) keeping the aspect, smaller side fit."""
    orig_aspect = f32(old_w) / f32(old_h)
    height, width = param.height, param.width
    if orig_aspect < f32(width) / f32(height):
        height = int(f32(width) / orig_aspect)
    else:
        width = int(orig_aspect * f32(height))
    return height, width


def apply_resize(img: np.ndarray, param: caffe_pb2.ResizeParameter,
                 rng: np.random.Generator) -> np.ndarray:
    """ApplyResize: WARP, FIT_LARGE_SIZE_AND_PAD (pad_mode/pad_value) or FIT_SMALL_SIZE with
    an interpolation drawn uniformly from ``interp_mode`` (LINEAR when empty)."""
    interp = cv2.INTER_LINEAR
    if len(param.interp_mode):
        interp = _INTERP[param.interp_mode[int(rng.integers(len(param.interp_mode)))]]
    new_h, new_w = param.height, param.width
    rows, cols = img.shape[:2]
    orig_aspect = f32(cols) / f32(rows)
    new_aspect = f32(new_w) / f32(new_h)
    if param.resize_mode == _P.WARP:
        return _hwc(cv2.resize(img, (new_w, new_h), interpolation=interp))
    if param.resize_mode == _P.FIT_SMALL_SIZE:
        if orig_aspect < new_aspect:
            size = (new_w, int(np.floor(f32(new_w) / orig_aspect)))
        else:
            size = (int(np.floor(orig_aspect * f32(new_h))), new_h)
        return _hwc(cv2.resize(img, size, interpolation=interp))
    pad = [0.0, 0.0, 0.0]
    if len(param.pad_value):
        values = list(param.pad_value)
        if len(values) not in (1, img.shape[2]):
            raise TransformError(f"resize_param: {len(values)} pad_value entries for a "
                                 f"{img.shape[2]}-channel image; give 1 or {img.shape[2]}")
        pad = values * 3 if len(values) == 1 else values
    if orig_aspect > new_aspect:
        height = int(np.floor(f32(new_w) / orig_aspect))
        out = _hwc(cv2.resize(img, (new_w, height), interpolation=interp))
        top = int(np.floor((new_h - height) / 2.0))
        border = (top, new_h - height - top, 0, 0)
    else:
        width = int(np.floor(orig_aspect * f32(new_h)))
        out = _hwc(cv2.resize(img, (width, new_h), interpolation=interp))
        left = int(np.floor((new_w - width) / 2.0))
        border = (0, 0, left, new_w - width - left)
    return _hwc(cv2.copyMakeBorder(out, *border, _PAD[param.pad_mode], value=pad))


# ---------------------------------------------------------------------------------------------
# the transformer

class SSDTransformer:
    """The fork's DataTransformer plus the AnnotatedDataLayer augmentation steps.

    Built from a TransformationParameter, the phase (random crop_size offsets in TRAIN,
    centred in TEST) and the layer's batch samplers; :meth:`process` turns one :class:`Sample`
    into ``(C x H x W float32 image, Objects)``. Raises TransformError for settings it refuses.
    """

    def __init__(self, param: caffe_pb2.TransformationParameter, phase: int = caffe_pb2.TEST,
                 batch_samplers: Sequence[caffe_pb2.BatchSampler] = ()):
        self.param = param
        self.phase = phase
        self.batch_samplers = list(batch_samplers)
        self._check()
        self.mean_values = np.asarray(param.mean_value, f32)
        self._mean_blob: Optional[np.ndarray] = None
        crop = param.crop_size
        self.crop_hw = (crop, crop) if crop else (param.crop_h, param.crop_w)
        if not (self.crop_hw[0] > 0 and self.crop_hw[1] > 0):
            self.crop_hw = None

    def __reduce__(self):
        """Pickle through serialized messages (worker processes receive the transformer)."""
        return (_transformer_from_bytes, (self.param.SerializeToString(), self.phase,
                                          [b.SerializeToString() for b in self.batch_samplers]))

    @property
    def mean_blob(self) -> Optional[np.ndarray]:
        """The mean_file blob as C x H x W float32 (read on first use), or None."""
        if self._mean_blob is None and self.param.HasField("mean_file"):
            try:
                blob = io.read_binary(self.param.mean_file, caffe_pb2.BlobProto)
            except io.CaffeFormatError as err:
                raise TransformError(f"transform_param.mean_file: {err}") from None
            array = io.blob_to_array(blob).astype(f32)
            self._mean_blob = array.reshape(array.shape[-3:])
        return self._mean_blob

    def _check(self) -> None:
        p = self.param
        if p.force_color and p.force_gray:
            raise TransformError("transform_param: force_color and force_gray are exclusive")
        if p.HasField("mean_file") and len(p.mean_value):
            raise TransformError("transform_param: give mean_file or mean_value, not both")
        if p.HasField("mean_file") and p.HasField("expand_param"):
            raise TransformError("transform_param: expand_param with mean_file cannot work (the fork "
                                 "fills the expanded canvas from a mean blob that must have the random "
                                 "canvas size); use mean_value")
        if p.HasField("resize_param") and not (p.resize_param.height > 0 and p.resize_param.width > 0):
            raise TransformError("transform_param.resize_param needs height > 0 and width > 0")
        if p.HasField("expand_param") and not p.expand_param.max_expand_ratio > 1:
            raise TransformError("transform_param.expand_param.max_expand_ratio must be > 1")
        if p.HasField("noise_param"):
            n = p.noise_param
            if n.convert_to_lab:
                raise TransformError("noise_param.convert_to_lab is refused: the fork converts to a "
                                     "float Lab image that its transformer then rejects (uint8 only)")
            if n.saltpepper and not len(n.saltpepper_param.value):
                raise TransformError("noise_param.saltpepper needs saltpepper_param.value "
                                     "(one value or one per channel)")
        for i, bs in enumerate(self.batch_samplers):
            s = bs.sampler
            where = f"batch_sampler {i}: sampler"
            if not (0 < s.min_scale <= s.max_scale <= 1):
                raise TransformError(f"{where} needs 0 < min_scale <= max_scale <= 1, "
                                     f"got {s.min_scale:g}, {s.max_scale:g}")
            if not (0 < s.min_aspect_ratio <= s.max_aspect_ratio < np.finfo(f32).max):
                raise TransformError(f"{where} needs 0 < min_aspect_ratio <= max_aspect_ratio, "
                                     f"got {s.min_aspect_ratio:g}, {s.max_aspect_ratio:g}")

    # -- static shape -------------------------------------------------------------------------
    def output_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one transformed image; -1 where only the data decide (no resize or
        crop; FIT_SMALL_SIZE). C is 1 with force_gray, else 3 (checked per record)."""
        p = self.param
        channels = 1 if p.force_gray else 3
        if self.crop_hw:
            return (channels,) + tuple(self.crop_hw)
        if p.HasField("resize_param") and p.resize_param.resize_mode != _P.FIT_SMALL_SIZE:
            return channels, p.resize_param.height, p.resize_param.width
        return channels, -1, -1

    # -- steps ---------------------------------------------------------------------------------
    def decode(self, sample: Sample) -> np.ndarray:
        if not sample.encoded:
            return sample.image
        try:
            return decode_image(sample.image, self.param.force_color, self.param.force_gray)
        except TransformError as err:
            raise TransformError(f"record {sample.key}: {err}") from None

    def _reencode(self, sample: Sample, img: np.ndarray, objects: Objects) -> Sample:
        return Sample(encode_jpeg(img), True, objects, sample.has_type, sample.key)

    def transform_annotation(self, objects: Objects, crop: np.ndarray, mirror: bool,
                             resize_from: Optional[Tuple[int, int]] = None,
                             key: str = "?") -> Objects:
        """TransformAnnotation: optional resize-policy update (``resize_from`` = original
        (width, height)), emit constraint against ``crop``, projection into it, mirror, and
        FIT_SMALL_SIZE extrapolation."""
        if not len(objects):
            return objects
        p = self.param
        boxes = objects.boxes
        do_resize = resize_from is not None and p.HasField("resize_param")
        if do_resize:
            boxes = update_boxes_by_resize_policy(p.resize_param, resize_from[0], resize_from[1], boxes)
        keep = np.ones(len(boxes), bool)
        if p.HasField("emit_constraint"):
            keep &= meet_emit_constraint(crop, boxes, p.emit_constraint)
        proj, valid = project_boxes(crop, boxes)
        keep &= valid
        if mirror:
            proj = np.stack([f32(1) - proj[:, 2], proj[:, 1], f32(1) - proj[:, 0], proj[:, 3]], axis=1)
        if do_resize:
            proj = _extrapolate_boxes(p.resize_param, resize_from[1], resize_from[0], crop, proj, key)
        return objects.select(keep, proj)

    def distort(self, sample: Sample, rng: np.random.Generator) -> Sample:
        """DistortImage: decode, ApplyDistort, JPEG re-encode (encoded records only)."""
        try:
            img = apply_distort(self.decode(sample), self.param.distort_param, rng)
        except (TransformError, cv2.error) as err:
            raise TransformError(f"record {sample.key}: distort: {err}") from None
        return self._reencode(sample, img, sample.objects)

    def expand(self, sample: Sample, rng: np.random.Generator) -> Sample:
        """ExpandImage: with probability ``prob`` paste the image at a random offset of a
        canvas ``ratio`` ~ U(1, max_expand_ratio) times larger, filled with the mean values."""
        e = self.param.expand_param
        if f32(rng.uniform()) > f32(e.prob):
            return sample
        if abs(float(f32(e.max_expand_ratio)) - 1.0) < 1e-2:
            return sample
        ratio = f32(rng.uniform(1.0, e.max_expand_ratio))
        img = self.decode(sample)
        h, w, c = img.shape
        height, width = int(f32(h) * ratio), int(f32(w) * ratio)
        h_off = np.floor(f32(rng.uniform(0, height - h)))
        w_off = np.floor(f32(rng.uniform(0, width - w)))
        fw, fh = f32(w), f32(h)
        expand_box = np.array([-w_off / fw, -h_off / fh, (f32(width) - w_off) / fw,
                               (f32(height) - h_off) / fh], f32)
        top, left = int(h_off), int(w_off)
        fill = np.clip(np.rint(self._means(c, sample.key)), 0, 255).tolist() if len(self.mean_values) else [0] * c
        canvas = _hwc(cv2.copyMakeBorder(img, top, height - h - top, left, width - w - left,
                                         cv2.BORDER_CONSTANT, value=fill + [0] * (4 - c)))
        objects = self.transform_annotation(sample.objects, expand_box, False, key=sample.key)
        return self._reencode(sample, canvas, objects)

    def crop(self, sample: Sample, box: np.ndarray) -> Sample:
        """CropImage: cut the clipped sample box out of the image (JPEG re-encode when the
        record is encoded) and carry the objects into it."""
        img = self.decode(sample)
        h, w = img.shape[:2]
        clipped = _clip(box)
        scaled = clipped * np.array([w, h, w, h], f32)
        x, y = int(scaled[0]), int(scaled[1])
        cw, ch = int(scaled[2] - scaled[0]), int(scaled[3] - scaled[1])
        if cw <= 0 or ch <= 0:
            raise TransformError(f"record {sample.key}: sampled crop {clipped.tolist()} is empty "
                                 f"on a {w}x{h} image")
        cropped = np.ascontiguousarray(img[y:y + ch, x:x + cw])
        objects = self.transform_annotation(sample.objects, clipped, False, key=sample.key)
        if sample.encoded:
            return self._reencode(sample, cropped, objects)
        return Sample(cropped, False, objects, sample.has_type, sample.key)

    def _means(self, channels: int, key: str) -> np.ndarray:
        m = self.mean_values
        if len(m) == 1:
            return np.repeat(m, channels)
        if len(m) != channels:
            raise TransformError(f"record {key}: {len(m)} mean_value entries for a "
                                 f"{channels}-channel image; give 1 or {channels}")
        return m

    def transform(self, sample: Sample, rng: np.random.Generator,
                  uint8: bool = False) -> Tuple[np.ndarray, Objects]:
        """Transform: decode, resize, noise, crop_size crop, mirror, ``(pixel - mean) * scale``
        into ``C x H x W`` float32, and the objects expressed in the output image (``uint8``:
        see :meth:`_pixels`)."""
        p = self.param
        img = self.decode(sample)
        src_h, src_w, channels = img.shape
        resize = p.resize_param if p.HasField("resize_param") else None
        if not sample.encoded:
            # the fork's raw-datum path neither resizes nor adds noise; it needs the blob size
            if p.HasField("noise_param") or (resize is not None and (
                    resize.resize_mode != _P.WARP or (src_h, src_w) != (resize.height, resize.width))):
                raise TransformError(f"record {sample.key}: raw (not encoded) {src_w}x{src_h} records "
                                     "are not resized or noised by the fork's transformer; rebuild "
                                     "the LMDB with --encoded or drop resize_param/noise_param")
        else:
            try:
                if resize is not None:
                    img = apply_resize(img, resize, rng)
                if p.HasField("noise_param"):
                    img = apply_noise(img, p.noise_param, rng)
            except (cv2.error, TransformError) as err:
                raise TransformError(f"record {sample.key}: resize/noise: {err}") from None
        img_h, img_w = img.shape[:2]
        do_mirror = bool(p.mirror) and bool(rng.integers(2))
        if self.crop_hw:
            height, width = self.crop_hw
            if img_h < height or img_w < width:
                raise TransformError(f"record {sample.key}: image {img_w}x{img_h} is smaller than "
                                     f"the crop {width}x{height}")
            if self.phase == caffe_pb2.TRAIN:
                h_off = int(rng.integers(img_h - height + 1))
                w_off = int(rng.integers(img_w - width + 1))
            else:
                h_off, w_off = (img_h - height) // 2, (img_w - width) // 2
        else:
            h_off = w_off = 0
            if resize is not None and resize.resize_mode == _P.FIT_SMALL_SIZE:
                height, width = _new_size_fit_small(resize, src_w, src_h)
            else:
                height, width = img_h, img_w
            if img_h < height or img_w < width:
                raise TransformError(f"record {sample.key}: image {img_w}x{img_h} is smaller than "
                                     f"the blob {width}x{height}")
        pixels = self._pixels(img, h_off, w_off, height, width, do_mirror, sample, uint8)
        crop = np.array([f32(w_off) / f32(img_w), f32(h_off) / f32(img_h),
                         f32(w_off + width) / f32(img_w), f32(h_off + height) / f32(img_h)], f32)
        objects = self.transform_annotation(sample.objects, crop, do_mirror,
                                            resize_from=(src_w, src_h), key=sample.key)
        return pixels, objects

    def _pixels(self, img: np.ndarray, h_off: int, w_off: int, height: int, width: int,
                do_mirror: bool, sample: Sample, uint8: bool = False) -> np.ndarray:
        """The ``height x width`` window at (h_off, w_off), mirrored, as ``(pixel - mean) * scale``
        in C x H x W float32 (float32 arithmetic as the fork's); with ``uint8`` (and
        :attr:`uint8_capable`) 8-bit pixels are returned as they are, C x H x W uint8."""
        img_h, img_w, channels = img.shape
        window = img[h_off:h_off + height, w_off:w_off + width]
        mean_blob = self.mean_blob
        if mean_blob is not None:
            if mean_blob.shape != (channels, img_h, img_w):
                raise TransformError(f"record {sample.key}: mean_file blob is "
                                     f"{'x'.join(map(str, mean_blob.shape))}, the image "
                                     f"{channels}x{img_h}x{img_w}")
            mean = mean_blob[:, h_off:h_off + height, w_off:w_off + width]
            pixels = window.astype(f32).transpose(2, 0, 1)
            # the fork indexes the mean by output pixel, but by source pixel on raw datums
            if do_mirror and sample.encoded:
                pixels = pixels[:, :, ::-1] - mean
            else:
                pixels = pixels - mean
                if do_mirror:
                    pixels = pixels[:, :, ::-1]
        else:
            if do_mirror:
                window = window[:, ::-1]
            chw = window.transpose(2, 0, 1)
            if uint8 and chw.dtype == np.uint8:
                return np.ascontiguousarray(chw)
            return self.normalize(chw, sample.key)
        if self.param.scale != 1:
            pixels = pixels * f32(self.param.scale)
        return np.ascontiguousarray(pixels, dtype=f32)

    # -- (pixel - mean) * scale ----------------------------------------------------------------
    @property
    def uint8_capable(self) -> bool:
        """Whether the last step is exactly ``(pixel - mean_value) * scale`` per channel, so that
        8-bit pixels can travel as uint8 and be normalised later (:meth:`normalize_tensor`) to
        the same float32 values; not with a mean_file (its mean is indexed by position)."""
        return not self.param.HasField("mean_file")

    def channel_means(self, channels: int, key: str = "?") -> np.ndarray:
        """The per-channel mean values (float32, ``channels``; zeros without mean_value)."""
        return self._means(channels, key) if len(self.mean_values) else np.zeros(channels, f32)

    def normalize(self, chw: np.ndarray, key: str = "?") -> np.ndarray:
        """``(pixel - mean_value) * scale`` of ``C x H x W`` pixels in float32 arithmetic (the
        fork's): a contiguous float32 array."""
        channels = chw.shape[0]
        means = self.channel_means(channels, key)
        pixels = np.empty(chw.shape, f32)
        for c in range(channels):
            np.subtract(chw[c], means[c], out=pixels[c], dtype=f32)
        if self.param.scale != 1:
            pixels *= f32(self.param.scale)
        return pixels

    def normalize_tensor(self, data: torch.Tensor) -> torch.Tensor:
        """:meth:`normalize` of an ``N x C x H x W`` uint8 batch on its own device (CUDA: after
        the 4-times smaller transfer), float32 values equal to the host's bit for bit: a uint8
        is exact in float32 and each step is one correctly rounded float32 operation."""
        means = torch.from_numpy(self.channel_means(data.shape[1])).to(data.device, non_blocking=True)
        pixels = data.to(torch.float32).sub_(means.view(1, -1, 1, 1))
        if self.param.scale != 1:
            pixels.mul_(torch.tensor(f32(self.param.scale), dtype=torch.float32))
        return pixels

    def process(self, sample: Sample, rng: np.random.Generator,
                uint8: bool = False) -> Tuple[np.ndarray, Objects]:
        """One record through load_batch: distort, expand, sample + crop, transform (``uint8``:
        8-bit pixels before the mean subtraction, see :meth:`_pixels`)."""
        p = self.param
        if not sample.encoded and (p.HasField("distort_param") or p.HasField("expand_param")):
            raise TransformError(f"record {sample.key}: distort_param/expand_param need encoded "
                                 "records (the fork skips them on raw ones); rebuild with --encoded")
        if p.HasField("distort_param"):
            sample = self.distort(sample, rng)
        if p.HasField("expand_param"):
            sample = self.expand(sample, rng)
        if self.batch_samplers:
            boxes = generate_batch_samples(sample.objects.boxes, self.batch_samplers, rng)
            if boxes:
                sample = self.crop(sample, boxes[int(rng.integers(len(boxes)))])
        return self.transform(sample, rng, uint8)


def _transformer_from_bytes(param: bytes, phase: int, samplers: Sequence[bytes]) -> SSDTransformer:
    return SSDTransformer(caffe_pb2.TransformationParameter.FromString(param), phase,
                          [caffe_pb2.BatchSampler.FromString(b) for b in samplers])
