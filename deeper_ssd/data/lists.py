"""List files for ``create-data``: what the SSD fork's data/VOC0712/create_list.sh does, for
four dataset layouts.

Every layout writes, into the output folder, ``trainval.txt`` (lines ``<image> <annotation>``
relative to the dataset root, shuffled with a seeded generator as the script shuffles with
perl's ``shuffle``), ``test.txt`` (in layout order) and ``test_name_size.txt`` (``<stem>
<height> <width>`` per test line, what the fork's get_image_size writes and the generated
test.prototxt's DetectionEvaluate reads). A split's parts are given as ``SPEC``\\s:

* ``voc``: a VOCdevkit year folder (``VOC2007``) whose ``ImageSets/Main/<split>.txt`` lists the
  ids; lines ``VOC2007/JPEGImages/<id>.jpg VOC2007/Annotations/<id>.xml``. Defaults as the
  script: trainval from VOC2007 and VOC2012, test from VOC2007;
* ``folders``: a folder holding an image folder (``Images``, ``images`` or ``JPEGImages``) and a
  label folder (``Labels``, ``labels``, ``annotations`` or ``Annotations``); each image is paired
  with the label file of the same stem (``.xml``, ``.txt`` or ``.json``; an image without one
  gets the folder's usual extension, and create-data stores it without objects). VisDrone-DET's
  ``VisDrone2019-DET-train`` (images/ + annotations/) is such a folder;
* ``coco``: ``IMAGES:JSON``, an image folder and an instances json (COCO, AI-TOD); every image
  of the json, in its order, as ``IMAGES/<file_name> JSON`` (create-data --label-type coco).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import io
from .annoset import AnnosetError, write_name_size_file

PathLike = Union[str, os.PathLike]

__all__ = ["LAYOUTS", "ListReport", "create_lists", "layout_entries"]

LAYOUTS = ("voc", "folders", "coco")

#: the script's splits per layout when none are given
VOC_DEFAULTS = {"trainval": ("VOC2007", "VOC2012"), "test": ("VOC2007",)}

IMAGE_FOLDERS = ("Images", "images", "JPEGImages")
LABEL_FOLDERS = ("Labels", "labels", "annotations", "Annotations")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_EXTENSIONS = (".xml", ".txt", ".json")


@dataclass
class ListReport:
    """What :func:`create_lists` wrote: ``{split: (path, lines)}`` and the name-size file."""
    lists: Dict[str, Tuple[str, int]] = field(default_factory=dict)
    name_size: Optional[str] = None

    def summary(self) -> str:
        parts = [f"{path}: {count} lines" for path, count in self.lists.values()]
        if self.name_size:
            parts.append(f"{self.name_size}: {self.lists['test'][1]} lines")
        return "; ".join(parts)


def _find_folder(base: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (base / name).is_dir():
            return base / name
    raise AnnosetError(f"{base}: no {what} folder (looked for {', '.join(names)})")


def _voc_entries(root: Path, year: str, split: str) -> List[Tuple[str, str]]:
    ids_file = root / year / "ImageSets" / "Main" / f"{split}.txt"
    try:
        ids = ids_file.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as err:
        raise AnnosetError(f"{ids_file}: cannot read the {split} ids "
                           f"({getattr(err, 'strerror', None) or err})") from None
    return [(f"{year}/JPEGImages/{i}.jpg", f"{year}/Annotations/{i}.xml") for i in ids]


def _folder_entries(root: Path, spec: str) -> List[Tuple[str, str]]:
    base = root / spec
    if not base.is_dir():
        raise AnnosetError(f"{base}: not a folder")
    images = _find_folder(base, IMAGE_FOLDERS, "image")
    labels = _find_folder(base, LABEL_FOLDERS, "label")
    by_stem: Dict[str, str] = {}
    for path in sorted(labels.iterdir()):
        if path.suffix.lower() in LABEL_EXTENSIONS:
            by_stem.setdefault(path.stem, path.name)
    usual = max(LABEL_EXTENSIONS, key=lambda e: sum(n.lower().endswith(e) for n in by_stem.values()))
    entries = []
    for path in sorted(images.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        label = by_stem.get(path.stem, path.stem + usual)
        entries.append((str(path.relative_to(root).as_posix()),
                        str((labels / label).relative_to(root).as_posix())))
    if not entries:
        raise AnnosetError(f"{images}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return entries


def _coco_entries(root: Path, spec: str) -> List[Tuple[str, str]]:
    if ":" not in spec:
        raise AnnosetError(f"coco layout: {spec!r} is not IMAGES:JSON (an image folder and an "
                           "instances json, both relative to the root)")
    image_dir, json_path = spec.rsplit(":", 1)
    try:
        doc = json.loads((root / json_path).read_text(encoding="utf-8"))
        names = [str(image["file_name"]) for image in doc["images"]]
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise AnnosetError(f"{root / json_path}: not a readable JSON file ({err})") from None
    except (KeyError, TypeError):
        raise AnnosetError(f"{root / json_path}: not a COCO instances file (no 'images' "
                           "with 'file_name')") from None
    entries = []
    for name in names:
        image = Path(image_dir) / name
        if not (root / image).is_file():
            raise AnnosetError(f"{root / json_path}: image {name!r} is not in {root / image_dir}")
        entries.append((image.as_posix(), Path(json_path).as_posix()))
    return entries


def layout_entries(root: PathLike, layout: str, specs: Sequence[str],
                   split: str) -> List[Tuple[str, str]]:
    """The ``(image, annotation)`` pairs of one split, parts in the order given."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise AnnosetError(f"unknown layout {layout!r} ({', '.join(LAYOUTS)})")
    entries: List[Tuple[str, str]] = []
    for spec in specs:
        if layout == "voc":
            entries += _voc_entries(root, spec, split)
        elif layout == "folders":
            entries += _folder_entries(root, spec)
        else:
            entries += _coco_entries(root, spec)
    for image, label in entries:
        for path in (image, label):
            if any(c.isspace() for c in path):
                raise AnnosetError(f"{root / path}: a path with white space cannot go into a list "
                                   "file (the converter splits lines at white space); rename it")
    return entries


def create_lists(root: PathLike, out_dir: PathLike, layout: str,
                 trainval: Optional[Sequence[str]] = None, test: Optional[Sequence[str]] = None,
                 seed: int = 0, name_size: bool = True) -> ListReport:
    """Write ``<out_dir>/trainval.txt`` (shuffled with ``seed``), ``<out_dir>/test.txt`` and,
    with ``name_size``, ``<out_dir>/test_name_size.txt``. ``trainval``/``test`` are SPECs of
    ``layout`` (None: the voc layout's defaults; an empty list skips the split). No list is
    written unless every split's parts read."""
    root, out_dir = Path(root), Path(out_dir)
    if not root.is_dir():
        raise AnnosetError(f"{root}: dataset root does not exist")
    splits = {"trainval": trainval, "test": test}
    for split, specs in splits.items():
        if specs is None:
            if layout != "voc":
                raise AnnosetError(f"the {layout} layout needs the {split} part(s) named "
                                   f"(--{split} SPEC ...)")
            splits[split] = VOC_DEFAULTS[split]
    report = ListReport()
    lines = {split: layout_entries(root, layout, specs, split)
             for split, specs in splits.items() if specs}
    if not lines:
        raise AnnosetError("no split to write (give --trainval and/or --test)")
    if "trainval" in lines:
        order = np.random.default_rng(seed).permutation(len(lines["trainval"]))
        lines["trainval"] = [lines["trainval"][i] for i in order]
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, entries in lines.items():
        path = out_dir / f"{split}.txt"
        io.atomic_write_bytes(path, "".join(f"{a} {b}\n" for a, b in entries).encode("utf-8"))
        report.lists[split] = (str(path), len(entries))
    if name_size and "test" in lines:
        report.name_size = str(out_dir / "test_name_size.txt")
        write_name_size_file(root, out_dir / "test.txt", report.name_size)
    return report
