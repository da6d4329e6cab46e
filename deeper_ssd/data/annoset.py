"""Annotated LMDB databases exactly as the SSD fork's ``convert_annoset`` writes them.

One record per line of a list file ``<image> <annotation>`` (detection) or ``<image> <int label>``
(classification):

* key ``"%08d_%s" % (line_index, image_path)`` (a skipped line still consumes its index), so the
  LMDB's byte-sorted key order is the list order;
* value: a serialized ``AnnotatedDatum``. Its ``datum`` holds the original file bytes when they
  can be kept (``--encode-type`` matches the file extension, colour as asked, no resizing), else
  the image re-encoded with OpenCV (``--encode-type``), else raw ``uint8`` pixels in CHW order;
  ``channels/height/width`` are those of the image as decoded by ``cv::imread`` and ``label`` is
  -1 for detection records;
* detection records have ``type = BBOX`` and one ``AnnotationGroup`` per class in order of first
  appearance; each object gets ``instance_id`` 0, 1, 2 ... within its group and a box normalised
  **without the -1**: ``xmin/width, ymin/height, xmax/width, ymax/height`` on the integer pixel
  coordinates of the XML (float32 arithmetic), width/height from the XML's ``size`` element;
  besides VOC XML the fork's per-image json and plain txt, VisDrone-DET text and COCO instances
  json files are read (:func:`fill_annotations`);
* transactions are committed every 1000 records.

Departures from the fork (all stricter, listed in docs/decisions.md): a missing or unreadable
image, an unknown class name, a box outside the image or with ``xmin >= xmax``/``ymin >= ymax``
a non-integer VOC coordinate and a truncated JPEG stop the build with a message naming the file
(``skip_bad`` skips and counts them instead); a label map with a duplicate name or label is
refused; the database is written under a temporary name and renamed into
place only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import lmdb
import numpy as np
from google.protobuf import message as _pb_message
from google.protobuf import text_format

from .. import io
from ..proto import caffe_pb2

PathLike = Union[str, os.PathLike]

__all__ = [
    "AnnosetError", "ConvertOptions", "BuildReport", "AnnotatedDB",
    "map_name_to_label", "read_list_file", "read_image_to_datum", "fill_annotations",
    "read_annotated_datum", "build_annoset", "write_name_size_file", "describe_db",
]

#: records per LMDB write transaction, as convert_annoset.cpp
COMMIT_EVERY = 1000


class AnnosetError(ValueError):
    """Bad input for an annotated database (list, image, annotation, label map, LMDB): the
    message names the file or record."""


# ---------------------------------------------------------------------------------------------
# label map and list file

def map_name_to_label(labelmap_path: PathLike) -> Dict[str, int]:
    """The fork's MapNameToLabel: class name -> label from a LabelMap prototxt.

    A duplicate name or label is always refused (the fork refuses it only with
    ``--check-label``, and its DetectionOutput/DetectionEvaluate refuse the same file later,
    at test time; docs/decisions.md).
    """
    try:
        labelmap = io.read_labelmap(labelmap_path)
    except io.CaffeFormatError as err:
        raise AnnosetError(f"label map: {err}") from None
    name_to_label = {item.name: item.label for item in labelmap.item}
    if not name_to_label:
        raise AnnosetError(f"{labelmap_path}: the label map has no items")
    return name_to_label


def read_list_file(path: PathLike, anno_type: str = "detection") -> List[Tuple[str, str]]:
    """Pairs ``(image, annotation)`` of a list file, read as ``infile >> a >> b`` does.

    For ``anno_type == "classification"`` the second token must be an integer label.
    """
    path = Path(path)
    try:
        tokens = path.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as err:
        raise AnnosetError(f"{path}: cannot read the list file: "
                           f"{getattr(err, 'strerror', None) or err}") from None
    if not tokens:
        raise AnnosetError(f"{path}: the list file is empty (expected lines '<image> <annotation>')")
    if len(tokens) % 2:
        raise AnnosetError(f"{path}: {len(tokens)} tokens; every line needs exactly two "
                           f"('<image> <annotation>'), the last one, {tokens[-1]!r}, has no partner")
    pairs = list(zip(tokens[0::2], tokens[1::2]))
    if anno_type == "classification":
        for number, (image, label) in enumerate(pairs, 1):
            try:
                int(label)
            except ValueError:
                raise AnnosetError(f"{path}: entry {number} ({image}): classification label "
                                   f"{label!r} is not an integer") from None
    return pairs


# ---------------------------------------------------------------------------------------------
# one record

@dataclass
class ConvertOptions:
    """The converter's options (names as in scripts/create_annoset.py)."""
    anno_type: str = "classification"   # classification | detection
    label_type: str = "xml"             # one of LABEL_TYPES
    label_map_file: str = ""
    check_label: bool = False          # accepted; duplicates are always refused
    min_dim: int = 0
    max_dim: int = 0
    resize_width: int = 0
    resize_height: int = 0
    encode_type: str = ""
    encoded: bool = False
    gray: bool = False
    check_size: bool = False
    shuffle: bool = False
    seed: int = 0                       # for shuffle (the fork's shuffle is unseeded)
    skip_bad: bool = False


def _imread(path: str, is_color: bool, height: int, width: int, min_dim: int,
            max_dim: int) -> Optional[np.ndarray]:
    """ReadImageToCVMat: imread (EXIF orientation applied), then the optional resizing."""
    img = cv2.imread(path, cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE)
    if img is None:
        return None
    if min_dim > 0 or max_dim > 0:
        rows, cols = img.shape[:2]
        min_num, max_num = min(rows, cols), max(rows, cols)
        scale = np.float32(1)
        if min_dim > 0 and min_num < min_dim:
            scale = np.float32(min_dim) / np.float32(min_num)
        if max_dim > 0 and int(scale * np.float32(max_num)) > max_dim:
            scale = np.float32(max_dim) / np.float32(max_num)
        if scale != 1:
            img = cv2.resize(img, (0, 0), fx=float(scale), fy=float(scale))
    elif height > 0 and width > 0:
        img = cv2.resize(img, (width, height))
    return img


def _check_complete_jpeg(path: str) -> None:
    """Refuse a truncated JPEG, which OpenCV decodes without an error (grey where the data
    ends; libjpeg only prints "Premature end of JPEG file"): the end-of-image marker FFD9 must
    follow the last start-of-scan marker FFDA (entropy-coded data cannot contain FFD9)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return                                  # reported by the decoder's check
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[max(data.rfind(b"\xff\xda"), 0):]:
        raise AnnosetError(f"{path}: truncated JPEG (no end-of-image marker after the image data)")


def _match_ext(filename: str, encoding: str) -> bool:
    ext = filename.rsplit(".", 1)[-1].lower()
    encoding = encoding.lower()
    return ext == encoding or (encoding == "jpg" and ext == "jpeg")


def read_image_to_datum(path: str, label: int, options: ConvertOptions,
                        datum: caffe_pb2.Datum) -> Tuple[int, int]:
    """ReadImageToDatum of the fork: fill ``datum``; return the decoded (height, width).

    Raises AnnosetError when the image cannot be read or encoded.
    """
    is_color = not options.gray
    _check_complete_jpeg(path)
    img = _imread(path, is_color, options.resize_height, options.resize_width,
                  options.min_dim, options.max_dim)
    if img is None:
        what = "does not exist" if not os.path.exists(path) else "cannot be decoded as an image"
        raise AnnosetError(f"{path}: image {what}")
    channels = 1 if img.ndim == 2 else img.shape[2]
    height, width = img.shape[:2]
    encoding = options.encode_type
    if options.encoded and not encoding:
        encoding = os.path.splitext(path)[1][1:].lower()
    datum.Clear()
    if encoding:
        keep_file = ((channels == 3) == is_color and not options.resize_height
                     and not options.resize_width and not options.min_dim and not options.max_dim
                     and _match_ext(path, encoding))
        datum.channels, datum.height, datum.width = channels, height, width
        if keep_file:
            with open(path, "rb") as handle:
                datum.data = handle.read()
        else:
            ok, buf = cv2.imencode("." + encoding, img)
            if not ok:
                raise AnnosetError(f"{path}: OpenCV cannot encode the image as {encoding!r}")
            datum.data = buf.tobytes()
        datum.label = label
        datum.encoded = True
    else:
        datum.channels, datum.height, datum.width = channels, height, width
        datum.encoded = False
        chw = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
        datum.data = np.ascontiguousarray(chw).tobytes()
        datum.label = label
    return height, width


def _add_object(anno_datum: caffe_pb2.AnnotatedDatum, label: int) -> caffe_pb2.Annotation:
    """Append an object of class ``label``: to its group (created at first appearance), with
    the next instance id of that group."""
    for group in anno_datum.annotation_group:
        if group.group_label == label:
            instance_id = group.annotation[-1].instance_id + 1 if len(group.annotation) else 0
            anno = group.annotation.add()
            anno.instance_id = instance_id
            return anno
    group = anno_datum.annotation_group.add()
    group.group_label = label
    anno = group.annotation.add()
    anno.instance_id = 0
    return anno


def _set_box(anno: caffe_pb2.Annotation, coords: Sequence[float], width: int, height: int,
             difficult: bool, where: str) -> None:
    """Validate pixel ``coords`` (xmin, ymin, xmax, ymax) and store them normalised (float32
    ``coordinate / size``, no -1)."""
    xmin, ymin, xmax, ymax = coords
    if xmin < 0 or ymin < 0 or xmax > width or ymax > height:
        raise AnnosetError(f"{where}: box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) lies outside "
                           f"the {width}x{height} image")
    if xmin >= xmax or ymin >= ymax:
        raise AnnosetError(f"{where}: box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) is empty or "
                           "inverted (needs xmin < xmax and ymin < ymax)")
    w, h = np.float32(width), np.float32(height)
    box = anno.bbox
    box.xmin = float(np.float32(xmin) / w)
    box.ymin = float(np.float32(ymin) / h)
    box.xmax = float(np.float32(xmax) / w)
    box.ymax = float(np.float32(ymax) / h)
    box.difficult = bool(difficult)


def _lookup(name: str, name_to_label: Dict[str, int], where: str) -> int:
    if name not in name_to_label:
        known = ", ".join(sorted(name_to_label))
        raise AnnosetError(f"{where}: unknown class name {name!r} (label map has: {known})")
    return name_to_label[name]


def _size_from(text_h: Optional[str], text_w: Optional[str], image_hw: Tuple[int, int],
               path: str, warnings: List[str]) -> Tuple[int, int]:
    """The annotation's declared (height, width), or the image's when absent/non-integer."""
    try:
        height, width = int(text_h), int(text_w)
    except (TypeError, ValueError):
        warnings.append(f"{path}: no integer image size in the annotation; using the image's")
        height, width = image_hw
    if (height, width) != tuple(image_hw):
        warnings.append(f"{path}: annotation size {width}x{height} differs from the image "
                        f"({image_hw[1]}x{image_hw[0]}); boxes are normalised by the annotation's")
    if width <= 0 or height <= 0:
        raise AnnosetError(f"{path}: no valid image width/height")
    return height, width


def _fill_xml(anno_datum, path: str, image_hw, name_to_label, warnings) -> None:
    """ReadXMLToAnnotatedDatum: objects in document order; ``difficult`` applies to the
    ``bndbox`` that follows it inside the same object."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise AnnosetError(f"{path}: not a valid XML file ({err})") from None
    except OSError as err:
        raise AnnosetError(f"{path}: cannot read: {err.strerror or err}") from None
    if root.tag != "annotation":
        raise AnnosetError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    height, width = _size_from(root.findtext("size/height"), root.findtext("size/width"),
                               image_hw, path, warnings)
    for number, obj in enumerate(root.findall("object"), 1):
        where = f"{path}: object {number}"
        anno, difficult = None, False
        for child in obj:
            if child.tag == "name":
                anno = _add_object(anno_datum, _lookup((child.text or "").strip(), name_to_label, where))
            elif child.tag == "difficult":
                difficult = (child.text or "").strip() == "1"
            elif child.tag == "bndbox":
                if anno is None:
                    raise AnnosetError(f"{where}: <bndbox> before the object's <name>")
                coords = []
                for tag in ("xmin", "ymin", "xmax", "ymax"):
                    text = (child.findtext(tag) or "").strip()
                    try:
                        coords.append(int(text))
                    except ValueError:
                        raise AnnosetError(
                            f"{where}: <{tag}> {text!r} is not an integer pixel coordinate (the SSD "
                            "fork reads such values as 0); round the annotation first") from None
                _set_box(anno, coords, width, height, difficult, where)
        if anno is not None and not anno.HasField("bbox"):
            raise AnnosetError(f"{where}: has a <name> but no <bndbox>")


def _fill_json(anno_datum, path: str, image_hw, name_to_label, warnings) -> None:
    """ReadJSONToAnnotatedDatum: the fork's per-image COCO file ``{"image": {"height", "width"},
    "annotation": [{"category_id", "bbox": [x, y, w, h], "iscrowd"}]}``; ``category_id`` is
    looked up as a name in the label map, ``iscrowd`` becomes ``difficult``."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AnnosetError(f"{path}: not a readable JSON file ({err})") from None
    image = doc.get("image", {}) if isinstance(doc, dict) else {}
    height, width = _size_from(image.get("height"), image.get("width"), image_hw, path, warnings)
    objects = doc.get("annotation")
    if not isinstance(objects, list):
        raise AnnosetError(f"{path}: no 'annotation' list")
    for number, obj in enumerate(objects, 1):
        where = f"{path}: annotation {number}"
        anno = _add_object(anno_datum, _lookup(str(obj.get("category_id")), name_to_label, where))
        box = obj.get("bbox")
        if not isinstance(box, list) or len(box) != 4:
            raise AnnosetError(f"{where}: 'bbox' must be [x, y, width, height]")
        x, y, w, h = (np.float32(v) for v in box)
        _set_box(anno, (x, y, x + w, y + h), width, height, bool(int(obj.get("iscrowd", 0))), where)


def _fill_txt(anno_datum, path: str, image_hw, warnings) -> None:
    """ReadTxtToAnnotatedDatum: lines ``label xmin ymin xmax ymax`` in pixels, image size from
    the image itself; labels are used as they are (no label map)."""
    try:
        tokens = Path(path).read_text().split()
    except OSError as err:
        raise AnnosetError(f"{path}: cannot read: {err.strerror or err}") from None
    height, width = image_hw
    for number in range(len(tokens) // 5):
        where = f"{path}: line {number + 1}"
        fields = tokens[5 * number:5 * number + 5]
        try:
            label, coords = int(fields[0]), [np.float32(v) for v in fields[1:]]
        except ValueError:
            raise AnnosetError(f"{where}: expected 'label xmin ymin xmax ymax', got {' '.join(fields)!r}") from None
        _set_box(_add_object(anno_datum, label), coords, width, height, False, where)


#: VisDrone-DET category ids -> names (the toolkit's order); 0 and 11 are handled apart
VISDRONE_CATEGORIES = {0: "ignored-regions", 1: "pedestrian", 2: "people", 3: "bicycle", 4: "car",
                       5: "van", 6: "truck", 7: "tricycle", 8: "awning-tricycle", 9: "bus",
                       10: "motor", 11: "others"}


def _count(counts: Optional[Dict[str, int]], what: str) -> None:
    if counts is not None:
        counts[what] = counts.get(what, 0) + 1


def _fill_visdrone(anno_datum, path: str, image_hw, name_to_label, counts) -> None:
    """VisDrone-DET text: one object per line ``x,y,w,h,score,category,truncation,occlusion``
    (pixels, top-left corner and size; image size from the image). Category 0 ("ignored
    regions") is dropped and counted; category 11 ("others") is kept under the label-map name
    ``others`` if there is one, else dropped and counted; a box with score 0 (not evaluated by
    the benchmark) is kept as ``difficult``. docs/decisions.md gives the reasons."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise AnnosetError(f"{path}: cannot read: {getattr(err, 'strerror', None) or err}") from None
    height, width = image_hw
    for number, line in enumerate(lines, 1):
        fields = [f.strip() for f in line.strip().rstrip(",").split(",")]
        if fields == [""]:
            continue
        where = f"{path}: line {number}"
        try:
            if len(fields) < 6:
                raise ValueError
            x, y, w, h = (np.float32(int(v)) for v in fields[:4])
            score, category = int(fields[4]), int(fields[5])
        except ValueError:
            raise AnnosetError(f"{where}: expected 'x,y,w,h,score,category,truncation,occlusion' "
                               f"with integer fields, got {line.strip()!r}") from None
        if category not in VISDRONE_CATEGORIES:
            raise AnnosetError(f"{where}: unknown VisDrone category {category} (0-11)")
        name = VISDRONE_CATEGORIES[category]
        if category == 0 or (category == 11 and name not in name_to_label):
            _count(counts, f"VisDrone {name} (category {category}) dropped")
            continue
        anno = _add_object(anno_datum, _lookup(name, name_to_label, where))
        _set_box(anno, (x, y, x + w, y + h), width, height, score == 0, where)


def _coco_index(path: str) -> Tuple[Dict[str, dict], Dict[int, list], Dict[int, str]]:
    """An instances json, indexed: ``file_name -> image``, ``image id -> annotations`` (file
    order), ``category id -> name``. Cached per file and modification time (the last
    :data:`COCO_CACHE_FILES` files: a shuffled list alternates between its jsons)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    if key not in _COCO_CACHE:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
            images = {str(im["file_name"]): im for im in doc["images"]}
            categories = {int(c["id"]): str(c["name"]) for c in doc["categories"]}
            per_image: Dict[int, list] = {}
            for anno in doc.get("annotations", []):
                per_image.setdefault(anno["image_id"], []).append(anno)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise AnnosetError(f"{path}: not a readable JSON file ({err})") from None
        except (KeyError, TypeError) as err:
            raise AnnosetError(f"{path}: not a COCO instances file (needs 'images' with 'file_name' "
                               f"and 'categories' with 'id' and 'name'; {type(err).__name__}: {err})") from None
        while len(_COCO_CACHE) >= COCO_CACHE_FILES:
            del _COCO_CACHE[next(iter(_COCO_CACHE))]
        _COCO_CACHE[key] = (images, per_image, categories)
    return _COCO_CACHE[key]


#: instances jsons kept parsed, oldest dropped first
COCO_CACHE_FILES = 4
_COCO_CACHE: Dict[tuple, tuple] = {}


def _fill_coco(anno_datum, path: str, image_path: str, image_hw, name_to_label, warnings) -> None:
    """A COCO instances json (COCO, AI-TOD, any ``instances_*.json``): the image whose
    ``file_name`` is the longest tail of ``image_path``; its annotations in file order, each
    ``bbox [x, y, w, h]`` (float pixels) under the label-map name of its category's ``name``;
    ``iscrowd`` becomes ``difficult`` as in the fork's per-image json."""
    images, per_image, categories = _coco_index(path)
    parts = Path(image_path).parts
    image = next((images[t] for t in ("/".join(parts[k:]) for k in range(len(parts))) if t in images), None)
    if image is None:
        raise AnnosetError(f"{path}: no image with file_name {parts[-1]!r} (nor a longer tail of "
                           f"{image_path})")
    height, width = _size_from(image.get("height"), image.get("width"), image_hw, path, warnings)
    for number, obj in enumerate(per_image.get(image.get("id"), []), 1):
        where = f"{path}: image {image.get('id')} ({image['file_name']}) annotation id {obj.get('id', number)}"
        try:
            name = categories[int(obj["category_id"])]
        except (KeyError, TypeError, ValueError):
            raise AnnosetError(f"{where}: category_id {obj.get('category_id')!r} is not among the "
                               "file's categories") from None
        box = obj.get("bbox")
        if not isinstance(box, list) or len(box) != 4:
            raise AnnosetError(f"{where}: 'bbox' must be [x, y, width, height]")
        anno = _add_object(anno_datum, _lookup(name, name_to_label, where))
        x, y, w, h = (np.float32(v) for v in box)
        _set_box(anno, (x, y, x + w, y + h), width, height, bool(int(obj.get("iscrowd", 0))), where)


#: --label-type values
LABEL_TYPES = ("xml", "json", "txt", "visdrone", "coco")


def fill_annotations(anno_datum: caffe_pb2.AnnotatedDatum, label_path: str, label_type: str,
                     image_hw: Tuple[int, int], name_to_label: Dict[str, int],
                     warnings: List[str], image_path: str = "",
                     counts: Optional[Dict[str, int]] = None) -> None:
    """Add the annotation groups of one label file to ``anno_datum``: ``xml`` (VOC), ``json``
    (the fork's per-image COCO file), ``txt`` (``label xmin ymin xmax ymax``), ``visdrone``
    (VisDrone-DET text) or ``coco`` (an instances json holding ``image_path``). Objects left
    out by rule (VisDrone ignored regions) are counted in ``counts``."""
    if label_type == "xml":
        _fill_xml(anno_datum, label_path, image_hw, name_to_label, warnings)
    elif label_type == "json":
        _fill_json(anno_datum, label_path, image_hw, name_to_label, warnings)
    elif label_type == "txt":
        _fill_txt(anno_datum, label_path, image_hw, warnings)
    elif label_type == "visdrone":
        _fill_visdrone(anno_datum, label_path, image_hw, name_to_label, counts)
    elif label_type == "coco":
        _fill_coco(anno_datum, label_path, image_path, image_hw, name_to_label, warnings)
    else:
        raise AnnosetError(f"unknown label type {label_type!r} ({', '.join(LABEL_TYPES)})")


def read_annotated_datum(image_path: str, label: str, options: ConvertOptions,
                         name_to_label: Dict[str, int], warnings: List[str],
                         counts: Optional[Dict[str, int]] = None) -> caffe_pb2.AnnotatedDatum:
    """One record: ReadRichImageToAnnotatedDatum (detection) or ReadImageToDatum
    (classification). A detection record whose label file does not exist has no objects, as in
    the fork."""
    anno_datum = caffe_pb2.AnnotatedDatum()
    if options.anno_type == "classification":
        read_image_to_datum(image_path, int(label), options, anno_datum.datum)
        return anno_datum
    decoded_hw = read_image_to_datum(image_path, -1, options, anno_datum.datum)
    if os.path.exists(label):
        # GetImageSize: the size of the image as imread decodes it, before any resizing
        resized = options.min_dim or options.max_dim or (options.resize_height and options.resize_width)
        original_hw = cv2.imread(image_path).shape[:2] if resized else decoded_hw
        fill_annotations(anno_datum, label, options.label_type, original_hw,
                         name_to_label, warnings, image_path, counts)
    else:
        warnings.append(f"{label}: annotation file missing; record stored without objects "
                        "(as the fork does)")
    anno_datum.type = caffe_pb2.AnnotatedDatum.BBOX
    return anno_datum


# ---------------------------------------------------------------------------------------------
# building a database

@dataclass
class BuildReport:
    """What :func:`build_annoset` wrote."""
    db_path: str
    written: int = 0
    skipped: List[str] = field(default_factory=list)       # messages of skipped entries
    warnings: List[str] = field(default_factory=list)
    objects: int = 0
    dropped: Dict[str, int] = field(default_factory=dict)   # objects left out by rule, per rule

    def summary(self) -> str:
        text = f"{self.db_path}: {self.written} records, {self.objects} objects"
        if self.dropped:
            text += "".join(f", {n} {what}" for what, n in sorted(self.dropped.items()))
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        if self.warnings:
            text += f", {len(self.warnings)} warnings"
        return text


def _write_records(env: lmdb.Environment, records: Iterator[Tuple[bytes, bytes]]) -> None:
    """Put (key, value) pairs, committing every COMMIT_EVERY; grows the map when full."""
    batch: List[Tuple[bytes, bytes]] = []

    def commit():
        while True:
            try:
                with env.begin(write=True) as txn:
                    for key, value in batch:
                        txn.put(key, value)
                break
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)
        batch.clear()

    for item in records:
        batch.append(item)
        if len(batch) >= COMMIT_EVERY:
            commit()
    if batch:
        commit()


def build_annoset(root: PathLike, list_file: PathLike, db_path: PathLike,
                  options: ConvertOptions, redo: bool = False, progress=None) -> BuildReport:
    """convert_annoset: write the LMDB at ``db_path`` from ``list_file`` (paths relative to
    ``root``). The database appears only when complete (built as ``.<name>.partial-<pid>``
    next to it, then renamed); an existing one is replaced only with ``redo``.
    """
    root, db_path = Path(root), Path(db_path)
    if options.anno_type not in ("classification", "detection"):
        raise AnnosetError(f"unknown annotation type {options.anno_type!r} (classification or detection)")
    if options.label_type not in LABEL_TYPES:
        raise AnnosetError(f"unknown label type {options.label_type!r} ({', '.join(LABEL_TYPES)})")
    if db_path.exists() and not redo:
        raise AnnosetError(f"{db_path} already exists (pass --redo to recreate it)")
    if not root.is_dir():
        raise AnnosetError(f"{root}: root directory does not exist")
    name_to_label: Dict[str, int] = {}
    if options.anno_type == "detection" and options.label_type != "txt":
        if not options.label_map_file:
            raise AnnosetError("detection needs --label-map-file")
        name_to_label = map_name_to_label(options.label_map_file)
    lines = read_list_file(list_file, options.anno_type)
    order = list(range(len(lines)))
    if options.shuffle:
        np.random.default_rng(options.seed).shuffle(order)

    report = BuildReport(str(db_path))
    expected_shape: List[Optional[Tuple[int, int, int]]] = [None]

    def records():
        for done, line_id in enumerate(order):
            image, label = lines[line_id]
            label_path = label if options.anno_type == "classification" else str(root / label)
            try:
                counts: Dict[str, int] = {}
                anno_datum = read_annotated_datum(str(root / image), label_path, options,
                                                  name_to_label, report.warnings, counts)
            except AnnosetError as err:
                if not options.skip_bad:
                    raise AnnosetError(f"{list_file}: entry {line_id + 1}: {err}") from None
                report.skipped.append(f"entry {line_id + 1}: {err}")
                continue
            datum = anno_datum.datum
            shape = (datum.channels, datum.height, datum.width)
            if options.check_size:
                if expected_shape[0] is None:
                    expected_shape[0] = shape
                elif shape != expected_shape[0]:
                    raise AnnosetError(f"{root / image}: image is {shape[0]}x{shape[1]}x{shape[2]} "
                                       f"(CxHxW), the first one was "
                                       f"{'x'.join(map(str, expected_shape[0]))} (--check-size)")
            for what, n in counts.items():
                report.dropped[what] = report.dropped.get(what, 0) + n
            report.written += 1
            report.objects += sum(len(g.annotation) for g in anno_datum.annotation_group)
            if progress is not None:
                progress(done + 1, len(order))
            yield f"{line_id:08d}_{image}".encode(), anno_datum.SerializeToString()

    db_path.parent.mkdir(parents=True, exist_ok=True)
    partial = db_path.parent / f".{db_path.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        env = lmdb.open(str(partial), map_size=1 << 30, subdir=True, meminit=False)
        try:
            _write_records(env, records())
        finally:
            env.close()
        if report.written == 0:
            raise AnnosetError(f"{list_file}: no record could be written "
                               f"({len(report.skipped)} entries skipped)")
        if db_path.exists():
            old = db_path.parent / f".{db_path.name}.old-{os.getpid()}"
            os.replace(db_path, old)
            os.replace(partial, db_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, db_path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


def write_name_size_file(root: PathLike, list_file: PathLike, out_path: PathLike) -> int:
    """get_image_size: one line ``<file stem> <height> <width>`` per list entry, in list order
    (the order of the test LMDB), sizes of the image as ``cv::imread`` decodes it. Returns the
    number of lines."""
    root = Path(root)
    lines = []
    for number, (image, _) in enumerate(read_list_file(list_file), 1):
        img = cv2.imread(str(root / image))
        if img is None:
            raise AnnosetError(f"{list_file}: entry {number}: {root / image}: image cannot be read")
        lines.append(f"{Path(image).stem} {img.shape[0]} {img.shape[1]}\n")
    io.atomic_write_bytes(out_path, "".join(lines).encode())
    return len(lines)


# ---------------------------------------------------------------------------------------------
# reading a database

#: read-only environments open in this process, keyed by (path, data.mdb inode, pid): LMDB
#: allows one environment per file and process, so readers of one database share it
_SHARED: Dict[Tuple[str, int, int], list] = {}


def _open_shared(path: str) -> list:
    key = (os.path.realpath(path), os.stat(os.path.join(path, "data.mdb")).st_ino, os.getpid())
    handle = _SHARED.get(key)
    if handle is None:
        try:
            env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=True,
                            max_readers=512)
        except lmdb.Error:
            # a forked child may not reopen what its parent still holds: use the inherited
            # read-only, lock-free environment (its map is shared read-only)
            env = next((h[0] for k, h in _SHARED.items() if k[:2] == key[:2]), None)
            if env is None:
                raise
        handle = _SHARED[key] = [env, 0, key]
    handle[1] += 1
    return handle


def _release_shared(handle: list) -> None:
    handle[1] -= 1
    if handle[1] == 0 and _SHARED.get(handle[2]) is handle:
        del _SHARED[handle[2]]
        handle[0].close()


class AnnotatedDB:
    """Read-only access to an annotated LMDB: keys in key (= reading) order, raw values and
    parsed AnnotatedDatum records. Readers of one database in one process share its LMDB
    environment; open a new AnnotatedDB after a fork."""

    def __init__(self, path: PathLike, what: str = "LMDB"):
        self.path = str(path)
        if not os.path.isdir(self.path) or not os.path.exists(os.path.join(self.path, "data.mdb")):
            state = "does not exist" if not os.path.exists(self.path) else "is not an LMDB (no data.mdb)"
            raise AnnosetError(f"{what} {self.path} {state}")
        try:
            self._handle = _open_shared(self.path)
        except lmdb.Error as err:
            raise AnnosetError(f"{what} {self.path}: cannot open: {err}") from None
        self.env = self._handle[0]
        self._keys: Optional[List[bytes]] = None

    def keys(self) -> List[bytes]:
        """All keys in LMDB order (cached)."""
        if self._keys is None:
            with self.env.begin() as txn:
                self._keys = list(txn.cursor().iternext(keys=True, values=False))
        return self._keys

    def __len__(self) -> int:
        return self.env.stat()["entries"]

    def get(self, key: bytes) -> bytes:
        with self.env.begin(buffers=False) as txn:
            value = txn.get(key)
        if value is None:
            raise AnnosetError(f"{self.path}: no record {key.decode(errors='replace')!r}")
        return value

    def datum(self, key: bytes) -> caffe_pb2.AnnotatedDatum:
        return parse_record(self.get(key), f"{self.path}: record {key.decode(errors='replace')!r}")

    def __iter__(self) -> Iterator[Tuple[bytes, bytes]]:
        with self.env.begin() as txn:
            yield from txn.cursor()

    def close(self) -> None:
        if self._handle is not None:
            _release_shared(self._handle)
            self._handle = None


def parse_record(value: bytes, where: str) -> caffe_pb2.AnnotatedDatum:
    """Parse one LMDB value as an AnnotatedDatum; AnnosetError naming ``where`` if corrupt."""
    anno_datum = caffe_pb2.AnnotatedDatum()
    try:
        anno_datum.ParseFromString(value)
    except _pb_message.DecodeError as err:
        raise AnnosetError(f"{where}: not an AnnotatedDatum ({err})") from None
    if not anno_datum.HasField("datum"):
        raise AnnosetError(f"{where}: AnnotatedDatum without a datum (is this a plain Datum "
                           "database? the SSD fork's AnnotatedData layer needs AnnotatedDatum records)")
    return anno_datum


def _record_line(key: bytes, anno_datum: caffe_pb2.AnnotatedDatum) -> str:
    d = anno_datum.datum
    kind = "encoded" if d.encoded else "raw"
    boxes = sum(len(g.annotation) for g in anno_datum.annotation_group)
    anno = (f"{boxes} objects in {len(anno_datum.annotation_group)} groups"
            if anno_datum.HasField("type") else f"label {d.label}")
    return f"{key.decode(errors='replace')}  {d.channels}x{d.height}x{d.width} {kind} {len(d.data)} B  {anno}"


def describe_db(path: PathLike, list_records: bool = False, dump: Sequence[str] = (),
                out=None) -> None:
    """Print a summary (count, first/last key, objects per label), optionally every record
    (``list_records``) and the full text of the records whose key or index is in ``dump``
    (image bytes shown by length only) to ``out`` (default stdout)."""
    out = out if out is not None else sys.stdout
    db = AnnotatedDB(path)
    keys = db.keys()
    per_label: Dict[int, int] = {}
    sizes = set()
    for index, key in enumerate(keys):
        anno_datum = db.datum(key)
        sizes.add((anno_datum.datum.height, anno_datum.datum.width))
        for group in anno_datum.annotation_group:
            per_label[group.group_label] = per_label.get(group.group_label, 0) + len(group.annotation)
        if list_records:
            print(f"{index:6d}  {_record_line(key, anno_datum)}", file=out)
    print(f"{path}: {len(keys)} records", file=out)
    if keys:
        print(f"  first key {keys[0].decode(errors='replace')}, last key {keys[-1].decode(errors='replace')}", file=out)
        hs = [h for h, _ in sizes]
        ws = [w for _, w in sizes]
        print(f"  image heights {min(hs)}..{max(hs)}, widths {min(ws)}..{max(ws)}", file=out)
    if per_label:
        print("  objects per label: " + ", ".join(f"{k}: {v}" for k, v in sorted(per_label.items())), file=out)
    for item in dump:
        if item.isdigit() and int(item) < len(keys):
            key = keys[int(item)]
        else:
            key = item.encode()
        anno_datum = db.datum(key)
        shown = caffe_pb2.AnnotatedDatum()
        shown.CopyFrom(anno_datum)
        shown.datum.data = f"<{len(anno_datum.datum.data)} bytes>".encode()
        print(f"--- {key.decode(errors='replace')}", file=out)
        print(text_format.MessageToString(shown, as_utf8=True).rstrip(), file=out)
    db.close()
