"""The blobs the SSD detection layers exchange, and the checks and readers they share.

Blob layouts (docs/semantics.md, "Blob layouts"), ``K`` priors, ``C`` classes, batch ``N``:

* PriorBox top ``1 x 2 x 4K``: channel 0 the prior corners ``[xmin, ymin, xmax, ymax]``
  normalised by the input image size, channel 1 the four variances of every prior.
* ``mbox_loc`` ``N x 4K`` (``N x 4KC`` with ``share_location: false``), ``mbox_conf``
  ``N x KC`` (logits for the loss, probabilities for DetectionOutput).
* label blob ``1 x 1 x G x 8``: rows ``[item, label, instance, xmin, ymin, xmax, ymax,
  difficult]`` in normalised coordinates (one row of -1 when the batch has no object).
* detections ``1 x 1 x D x 7``: rows ``[image, label, score, xmin, ymin, xmax, ymax]``.
* evaluation rows ``1 x 1 x R x 5`` (see :class:`~deeper_ssd.layers.detection_evaluate.DetectionEvaluate`).

The box math (IoU, coding, matching, mining, NMS) lives in :mod:`deeper_ssd.box`.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..proto import caffe_pb2
from .base import Layer, Shape, count, format_shape


def legacy_dim(shape: Shape, index: int) -> int:
    """Caffe's LegacyShape: num/channels/height/width of a blob with up to 4 axes (missing = 1)."""
    if index >= len(shape):
        return 1
    return shape[index]


def check_heads(layer: Layer, bottoms: Sequence[Shape], num_classes: int, loc_classes: int) -> int:
    """Validate ``mbox_loc``, ``mbox_conf`` and ``mbox_priorbox`` shapes; return the prior count."""
    loc, conf, prior = bottoms[:3]
    if len(prior) != 3 or prior[0] != 1 or prior[1] != 2 or prior[2] % 4:
        raise ValueError(f"prior bottom '{layer.lp.bottom[2]}' must be 1x2x(4*priors), got "
                         f"{format_shape(prior)}")
    num_priors = prior[2] // 4
    if loc[0] != conf[0]:
        raise ValueError(f"loc and conf bottoms disagree on the batch size: "
                         f"{format_shape(loc)} vs {format_shape(conf)}")
    for name, shape, per_prior in ((layer.lp.bottom[0], loc, 4 * loc_classes),
                                   (layer.lp.bottom[1], conf, num_classes)):
        if legacy_dim(shape, 1) != num_priors * per_prior or count(shape, 1) != num_priors * per_prior:
            raise ValueError(f"bottom '{name}' {format_shape(shape)} must be N x "
                             f"{num_priors * per_prior} ({num_priors} priors x {per_prior})")
    return num_priors


def check_label_blob(layer: Layer, shape: Shape, index: int) -> None:
    """The SSD label blob is ``1 x 1 x G x 8`` (G may be dynamic)."""
    if len(shape) != 4 or shape[0] not in (1, -1) or shape[1] not in (1, -1) or shape[3] not in (8, -1):
        raise ValueError(f"label bottom '{layer.lp.bottom[index]}' must be 1x1xGx8 rows "
                         f"[item, label, instance, xmin, ymin, xmax, ymax, difficult], got "
                         f"{format_shape(shape)}")


class GroundTruth(NamedTuple):
    """The objects of a label blob, padded per image: ``boxes [N, G, 4]`` float32,
    ``labels [N, G]`` int64, ``difficult [N, G]`` and ``valid [N, G]`` bool (False = padding).
    Objects keep their order of appearance in the blob."""
    boxes: torch.Tensor
    labels: torch.Tensor
    difficult: torch.Tensor
    valid: torch.Tensor


def read_ground_truth(layer: Layer, label: torch.Tensor, num_images: int, keep_difficult: bool,
                      stop_at_missing: bool = False, max_label: Optional[int] = None) -> GroundTruth:
    """Caffe's GetGroundTruth on a ``1 x 1 x G x 8`` label blob, batched.

    Rows with item -1 are skipped (``stop_at_missing``: the first one ends the list, as the
    DetectionEvaluate variant does); items are truncated to int like Caffe; difficult objects
    are dropped unless ``keep_difficult``; rows of items outside ``[0, num_images)`` are never
    looked up (Caffe ignores them too). A row with the background label is an error, and so is a
    label outside ``[0, max_label)`` when ``max_label`` is given. One host sync: the largest
    object count of an image (the padded size) and the error counts.
    """
    rows = label.detach().reshape(-1, 8)
    device = rows.device
    item = rows[:, 0].long()
    labels = rows[:, 1].long()
    present = item != -1
    if stop_at_missing:
        present &= torch.cumsum((~present).long(), 0) == 0
    difficult = rows[:, 7] != 0
    keep = present & (item >= 0) & (item < num_images)
    if not keep_difficult:
        keep &= ~difficult
    one_hot = (item.unsqueeze(1) == torch.arange(num_images, device=device)) & keep.unsqueeze(1)
    position = (torch.cumsum(one_hot.long(), 0) - 1).gather(1, item.clamp(0, max(num_images - 1, 0))
                                                           .unsqueeze(1)).squeeze(1) if num_images else item
    background = layer.background_label_id
    problems = [one_hot.sum(0).max() if num_images else torch.zeros((), dtype=torch.long, device=device),
                (present & (labels == background)).sum()]
    if max_label is not None:
        problems.append((keep & ((labels < 0) | (labels >= max_label))).sum())
    stats = torch.stack(problems).tolist()
    if stats[1]:
        raise layer.error(f"found background label {background} in the label blob "
                          f"'{layer.lp.bottom[-1]}' ({stats[1]} row(s))")
    if max_label is not None and stats[2]:
        raise layer.error(f"label blob '{layer.lp.bottom[-1]}' has {stats[2]} object(s) with a label "
                          f"outside [0, {max_label})")
    g = max(int(stats[0]), 1)                      # one padding slot keeps gathers simple
    slot = torch.where(keep, item * g + position, torch.full_like(item, num_images * g))

    def scatter(values, fill, dtype):
        out = torch.full((num_images * g + 1, *values.shape[1:]), fill, dtype=dtype, device=device)
        out[slot] = values.to(dtype)
        return out[:-1].view(num_images, g, *values.shape[1:])

    return GroundTruth(scatter(rows[:, 3:7], 0.0, torch.float32), scatter(labels, -1, torch.long),
                       scatter(difficult, False, torch.bool), scatter(keep, False, torch.bool))


def read_name_sizes(layer: Layer, path: str) -> Tuple[List[str], List[Tuple[int, int]]]:
    """Names and ``(height, width)`` of a name/size file ("name height width" per line), as
    Caffe reads it (whitespace-separated triples); an unreadable or empty file names the layer."""
    try:
        with open(path) as handle:
            words = handle.read().split()
        triples = [(words[i], int(words[i + 1]), int(words[i + 2])) for i in range(0, len(words) - 2, 3)]
    except (OSError, ValueError) as err:
        raise layer.error(f"cannot read name_size_file '{path}': {err}") from None
    if not triples:
        raise layer.error(f"name_size_file '{path}' has no 'name height width' line")
    return [name for name, _, _ in triples], [(h, w) for _, h, w in triples]


def check_nms(nms: caffe_pb2.NonMaximumSuppressionParameter) -> None:
    if not nms.nms_threshold >= 0:
        raise ValueError(f"nms_threshold must be non negative, got {nms.nms_threshold}")
    if not 0 < nms.eta <= 1:
        raise ValueError(f"nms_param.eta must be in (0, 1], got {nms.eta}")
