"""Box math of the SSD Caffe fork as batched tensor functions (docs/semantics.md: "Box helpers"
to "DetectionOutput and NMS").

Boxes are ``[..., 4]`` tensors ``[xmin, ymin, xmax, ymax]``. Every function works on any
device and in any floating dtype; Caffe itself does all box geometry in float32 (its
``NormalizedBBox`` has float fields, even in a double build), so the layers call these with
float32 boxes to reproduce its rounding and tie-breaking. Nothing here loops over images or
priors in Python: per-image variable sizes are padded tensors with masks. Loops that remain
are over the (small) number of ground-truth boxes per image in the greedy bipartite matcher
and over the (top_k-bounded) candidate list of greedy NMS, vectorised over everything else.

Conventions: ``N`` images, ``K`` priors, ``G`` (padded) ground-truth boxes per image, ``B``
independent NMS problems, ``M`` candidates per problem.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["CORNER", "CENTER_SIZE", "CORNER_SIZE", "CODE_NAMES", "box_area", "pairwise_iou",
           "is_cross_boundary", "encode", "decode", "match", "greedy_nms",
           "top_candidates", "select_top", "positions_mask", "clip", "to_image_pixels"]

#: PriorBoxParameter.CodeType values (note: they start at 1)
CORNER, CENTER_SIZE, CORNER_SIZE = 1, 2, 3
CODE_NAMES = {CORNER: "CORNER", CENTER_SIZE: "CENTER_SIZE", CORNER_SIZE: "CORNER_SIZE"}

#: pairs overlapping by at most this much are "not overlapping" for the matcher (Caffe: 1e-6)
MATCH_EPS = 1e-6


def box_area(boxes: torch.Tensor, pixel: bool = False) -> torch.Tensor:
    """Caffe's BBoxSize: ``w*h`` (``(w+1)*(h+1)`` in pixel mode), 0 for an inverted box.
    ``[..., 4] -> [...]``."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    inverted = (w < 0) | (h < 0)
    if pixel:
        w, h = w + 1, h + 1
    return torch.where(inverted, torch.zeros_like(w), w * h)


def _corners(boxes: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """``xmin, ymin, xmax, ymax`` of ``[..., 4]`` boxes as four contiguous ``[...]`` tensors."""
    return tuple(c.contiguous() for c in boxes.unbind(-1))


def _iou(a, b, area_a: torch.Tensor, area_b: torch.Tensor, pixel: bool) -> torch.Tensor:
    """JaccardOverlap of broadcast-compatible boxes given as :func:`_corners` tuples, with
    ``[...]`` (cached) areas.

    Geometry only: no autograd (temporaries are updated in place, which also keeps this fast)."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    iw = torch.minimum(ax2, bx2)
    scratch = torch.maximum(ax1, bx1)
    iw.sub_(scratch)
    ih = torch.minimum(ay2, by2)
    ih.sub_(torch.maximum(ay1, by1, out=scratch))
    if pixel:
        disjoint = (bx1 > ax2) | (bx2 < ax1) | (by1 > ay2) | (by2 < ay1)
        iw.add_(1)
        ih.add_(1)
        positive = ~disjoint & (iw > 0) & (ih > 0)
        inter = iw.mul_(ih)
        iou = inter / (area_a + area_b - inter)
        return iou.masked_fill_(~positive, 0.0)
    # normalised: disjoint boxes have a non-positive side, clamped to 0 -> IoU 0
    inter = iw.clamp_(min=0).mul_(ih.clamp_(min=0))
    union = torch.add(area_a, area_b, out=scratch).sub_(inter)
    return inter.div_(union).nan_to_num_(0.0)     # two empty boxes: 0 / 0


def pairwise_iou(a: torch.Tensor, b: torch.Tensor, pixel: bool = False,
                 area_a: Optional[torch.Tensor] = None,
                 area_b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """IoU of every box of ``a [..., A, 4]`` with every box of ``b [..., B, 4]`` -> ``[..., A, B]``.

    Caffe's JaccardOverlap: strict disjointness test, intersection sides (``+1`` each in
    ``pixel`` mode), 0 unless both sides are positive, else ``inter / (area_a + area_b - inter)``
    in the input dtype with Caffe's operation order. ``area_a``/``area_b`` override the areas
    (Caffe's cached ``size``; default: :func:`box_area`). Not differentiable.
    """
    area_a = box_area(a, pixel) if area_a is None else area_a
    area_b = box_area(b, pixel) if area_b is None else area_b
    return _iou(_corners(a.unsqueeze(-2)), _corners(b.unsqueeze(-3)), area_a.unsqueeze(-1),
                area_b.unsqueeze(-2), pixel)


def is_cross_boundary(boxes: torch.Tensor) -> torch.Tensor:
    """True where any coordinate of ``boxes [..., 4]`` lies outside [0, 1]."""
    return ((boxes < 0) | (boxes > 1)).any(-1)


def _center_size(boxes: torch.Tensor):
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2, w, h


def encode(priors: torch.Tensor, variances: torch.Tensor, boxes: torch.Tensor, code_type: int,
           variance_in_target: bool) -> torch.Tensor:
    """Regression targets of ``boxes`` w.r.t. ``priors`` (both ``[..., 4]``, broadcast).

    docs/semantics.md, "Box coding".

    ``variances [..., 4]`` divide the targets unless ``variance_in_target`` (Caffe's
    ``encode_variance_in_target``). Widths and heights must be positive for the size codes.
    """
    if code_type == CORNER:
        out = boxes - priors
    elif code_type == CENTER_SIZE:
        pcx, pcy, pw, ph = _center_size(priors)
        gcx, gcy, gw, gh = _center_size(boxes)
        out = torch.stack([(gcx - pcx) / pw, (gcy - pcy) / ph,
                           torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
    elif code_type == CORNER_SIZE:
        _, _, pw, ph = _center_size(priors)
        size = torch.stack([pw, ph, pw, ph], dim=-1)
        out = (boxes - priors) / size
    else:
        raise ValueError(f"unknown code_type {code_type}")
    return out if variance_in_target else out / variances


def decode(priors: torch.Tensor, variances: torch.Tensor, loc: torch.Tensor, code_type: int,
           variance_in_target: bool) -> torch.Tensor:
    """Boxes from predictions ``loc [..., 4]`` relative to ``priors [..., 4]`` (broadcast).

    docs/semantics.md, "Box coding".

    The inverse of :func:`encode`; predictions are multiplied by ``variances`` unless
    ``variance_in_target`` (Caffe's ``variance_encoded_in_target``). No clipping.
    """
    if not variance_in_target:
        loc = variances * loc
    if code_type == CORNER:
        return priors + loc
    if code_type == CENTER_SIZE:
        pcx, pcy, pw, ph = _center_size(priors)
        cx = loc[..., 0] * pw + pcx
        cy = loc[..., 1] * ph + pcy
        w = torch.exp(loc[..., 2]) * pw
        h = torch.exp(loc[..., 3]) * ph
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    if code_type == CORNER_SIZE:
        _, _, pw, ph = _center_size(priors)
        return priors + loc * torch.stack([pw, ph, pw, ph], dim=-1)
    raise ValueError(f"unknown code_type {code_type}")


def clip(boxes: torch.Tensor, width: float = 1.0, height: float = 1.0) -> torch.Tensor:
    """Clamp ``[..., 4]`` boxes to ``[0, width] x [0, height]`` (Caffe's ClipBBox)."""
    bound = boxes.new_tensor([width, height, width, height])
    return torch.minimum(boxes.clamp(min=0), bound)


def to_image_pixels(boxes: torch.Tensor, height: int, width: int, resize=None):
    """Caffe's OutputBBox: normalised boxes of the network input -> pixels of the original
    ``height x width`` image, undoing the test-time ``resize`` policy (a ResizeParameter or None).

    Returns ``(boxes, areas)``: the areas are the ones Caffe caches for the pixel-mode IoU,
    ``(w+1)*(h+1)`` after ScaleBBox (``w*h`` when a FIT_SMALL_SIZE box is clipped to the image
    last). WARP / no policy: clip to [0, 1], scale. FIT_LARGE_SIZE_AND_PAD: project out of the
    padded region first (a box outside it stays as it is), then clip and scale. FIT_SMALL_SIZE
    with ``height_scale``/``width_scale``: scale by those, then clip to the image.
    """
    boxes = boxes.float()
    mode = resize.resize_mode if resize is not None else 0
    scale = boxes.new_tensor([width, height, width, height])
    pixel = width > 1 or height > 1

    def clip_and_scale(b):
        out = clip(b) * scale
        return out, box_area(out, pixel=pixel)

    if mode == 3:                                                 # FIT_LARGE_SIZE_AND_PAD
        rh, rw = float(resize.height), float(resize.width)
        if not (rh > 0 and rw > 0):
            raise ValueError("resize_param height and width must be > 0 for FIT_LARGE_SIZE_AND_PAD")
        f32 = np.float32
        aspect, resize_aspect = f32(width) / f32(height), f32(rw) / f32(rh)
        if aspect > resize_aspect:
            pad = (f32(rh) - f32(rw) / aspect) / f32(2)
            src = [0.0, pad / f32(rh), 1.0, 1.0 - pad / f32(rh)]
        else:
            pad = (f32(rw) - f32(rh) * aspect) / f32(2)
            src = [pad / f32(rw), 0.0, 1.0 - pad / f32(rw), 1.0]
        src = boxes.new_tensor([float(f32(v)) for v in src])
        overlap = ~((boxes[..., 0] >= src[2]) | (boxes[..., 2] <= src[0]) |
                    (boxes[..., 1] >= src[3]) | (boxes[..., 3] <= src[1]))
        size = torch.stack([src[2] - src[0], src[3] - src[1]] * 2)
        origin = torch.stack([src[0], src[1]] * 2)
        projected = clip((boxes - origin) / size)
        return clip_and_scale(torch.where(overlap.unsqueeze(-1), projected, boxes))
    if mode == 2 and resize.height_scale and resize.width_scale:  # FIT_SMALL_SIZE with scales
        out = clip(boxes * boxes.new_tensor([resize.width_scale, resize.height_scale] * 2),
                   float(width), float(height))
        return out, box_area(out)
    return clip_and_scale(boxes)


# ---------------------------------------------------------------------------------------------
# matching

_NO_KEY = torch.iinfo(torch.int64).min


def _sortable_key(values: torch.Tensor, index_of_max_priority: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering float32 ``values`` descending and, on equal values, the smaller
    ``index_of_max_priority`` (``< 2**31``) first: ``ordered_bits(value) << 32 | ~index``.
    -0.0 counts as +0.0, as in a float comparison."""
    bits = (values.float() + 0.0).contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)               # monotone for negative floats too
    return (ordered.long() << 32) | (0x7FFFFFFF - index_of_max_priority)


def _key_index(key: torch.Tensor) -> torch.Tensor:
    return 0x7FFFFFFF - (key & 0xFFFFFFFF)


def _key_value(key: torch.Tensor) -> torch.Tensor:
    ordered = (key >> 32).int()
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _best_candidates(iou: torch.Tensor, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` best predictions of every object of ``iou [B, G, K]``, ordered by IoU
    descending and, on equal IoU, by prediction index ascending: ``(keys, index)`` ``[B, G, count]``
    with the int64 keys of :func:`_sortable_key`.

    A float top-k decides which values are in; among the predictions tied with its last value
    (common: a small object inside several equal priors) the lowest indices are taken."""
    k = iou.shape[-1]
    values, index = iou.topk(count, dim=-1)
    last = values[..., -1:]
    above = (values > last).sum(-1, keepdim=True)                      # these come first
    reverse = torch.arange(k, 0, -1, dtype=torch.int32, device=iou.device)
    tied = torch.where(iou == last, reverse, torch.zeros_like(reverse)).topk(count, dim=-1).values
    slot = torch.arange(count, device=iou.device)
    from_tied = (k - tied.long()).gather(-1, (slot - above).clamp(min=0))
    index = torch.where(slot < above, index, from_tied)
    values = torch.where(slot < above, values, last.expand_as(values))
    keys = torch.sort(_sortable_key(values, index), dim=-1, descending=True).values
    return keys, _key_index(keys)


def match(iou: torch.Tensor, gt_valid: Optional[torch.Tensor], ignored: Optional[torch.Tensor],
          overlap_threshold: float, per_prediction: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Caffe's MatchBBox for ``B`` independent problems (docs/semantics.md, "Matching").

    ``iou [B, G, K]`` float32 between ground truth and predictions (priors or decoded boxes);
    ``gt_valid [B, G]`` (or None when padding objects already have IoU 0) marks real objects;
    ``ignored [B, K]`` (or None) marks predictions never matched (``ignore_cross_boundary_bbox``).

    Greedy bipartite pass: repeatedly the largest IoU among free predictions x free objects
    (only pairs with IoU > 1e-6 exist; ties go to the smaller prediction, then the smaller object
    index), then, with ``per_prediction``, every still-free prediction takes its best object when
    that IoU is >= ``overlap_threshold`` (first object on ties).

    Returns ``indices [B, K]`` int64 (object index; -1 unmatched; -2 ignored) and
    ``overlaps [B, K]`` float32 (IoU with the matched object; for unmatched predictions their
    best IoU over all objects, 0 if none exceeds 1e-6; 0 for ignored ones).

    The bipartite pass is exact but looks only at each object's ``G`` best predictions: an
    object still free at step ``t`` has lost at most ``t < G`` of them to other objects.
    """
    b, g, k = iou.shape
    if gt_valid is not None:
        iou = iou.masked_fill(~gt_valid.unsqueeze(-1), 0.0)
    if ignored is not None:
        iou = iou.masked_fill(ignored.unsqueeze(1), 0.0)
    indices = torch.full((b, k), -1, dtype=torch.long, device=iou.device)
    if ignored is not None:
        indices = indices.masked_fill(ignored, -2)
    if g == 0 or k == 0:
        return indices, iou.new_zeros(b, k)
    best, best_gt = iou.max(1)                                                  # first max
    present = best > MATCH_EPS
    overlaps = torch.where(present, best, torch.zeros_like(best))
    cand_key, cand_prior = _best_candidates(iou, min(g, k))                     # [B, G, G']
    cand_ok = _key_value(cand_key) > MATCH_EPS
    taken = torch.zeros(b, k, dtype=torch.bool, device=iou.device)
    gt_free = torch.ones(b, g, dtype=torch.bool, device=iou.device)
    rows = torch.arange(b, device=iou.device)
    none = torch.full((b, g), -1, dtype=torch.long, device=iou.device)
    for _ in range(g):
        avail = cand_ok & ~taken.gather(1, cand_prior.view(b, -1)).view_as(cand_ok)
        first = avail.byte().argmax(-1, keepdim=True)                          # first free one
        pick = cand_key.gather(-1, first).squeeze(-1)
        pick = torch.where(avail.any(-1) & gt_free, pick, none)                 # [B, G]
        pick_gt = pick.argmax(-1)                                               # first max: smaller g
        pick_key = pick.gather(-1, pick_gt.unsqueeze(-1)).squeeze(-1)
        ok = pick_key >= 0
        pick_prior = _key_index(pick_key).clamp(0, k - 1)
        indices[rows, pick_prior] = torch.where(ok, pick_gt, indices[rows, pick_prior])
        overlaps[rows, pick_prior] = torch.where(ok, _key_value(pick_key), overlaps[rows, pick_prior])
        taken[rows, pick_prior] |= ok
        gt_free[rows, pick_gt] &= ~ok
    if per_prediction:
        take = (indices == -1) & present & (best >= overlap_threshold)
        indices = torch.where(take, best_gt, indices)
        overlaps = torch.where(take, best, overlaps)
    return indices, overlaps


# ---------------------------------------------------------------------------------------------
# ranking, selection and NMS

def top_candidates(scores: torch.Tensor, candidates: Union[torch.Tensor, float],
                   count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` best candidates of every row of ``scores [..., K]`` (float32 comparison),
    ordered by score descending and, on equal scores, by position ascending (a stable sort).
    ``candidates``: a ``[..., K]`` bool mask, or a number: the scores strictly above it.

    Returns ``positions [..., count]`` and ``valid [..., count]`` (False past a row's last
    candidate). A float top-k of ``count + 1`` picks them; exact int64 keys (score, position)
    then order the ``count`` picked. Only when the last pick ties with the first one left out
    (which of equal scores a top-k takes is unspecified) are keys built for the whole rows.
    One host sync (two with a threshold)."""
    k = scores.shape[-1]
    count = min(count, k)
    inf = float("inf")
    if isinstance(candidates, torch.Tensor):
        masked = torch.where(candidates, scores.float(), -inf)
        if (candidates & ~masked.isfinite()).any():         # a top-k cannot tell these apart
            return _positions(_top_keys(masked, candidates, count))
        values, positions = masked.topk(min(count + 1, k), dim=-1)
    else:                               # no masked copy: the candidates are the top of each row
        masked = scores.float()
        values, positions = masked.topk(min(count + 1, k), dim=-1)
        if values.isnan().any():                                  # a top-k ranks NaN first
            return top_candidates(scores, masked > candidates, count)
        values = values.masked_fill(~(values > candidates), -inf)
    if 0 < count < k:
        cut = values[..., count - 1]
        if ((values[..., count] == cut) & (cut > -inf)).any():
            if not isinstance(candidates, torch.Tensor):
                candidates = masked > candidates
            return _positions(_top_keys(masked, candidates, count))
    values, positions = values[..., :count], positions[..., :count]
    keys = _sortable_key(values, positions).masked_fill_(values == -inf, _NO_KEY)
    return _positions(keys.sort(dim=-1, descending=True).values)


def _top_keys(scores: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` largest :func:`_sortable_key` keys of each row (``_NO_KEY``: no candidate)."""
    keys = _sortable_key(scores, torch.arange(scores.shape[-1], device=scores.device))
    return keys.masked_fill_(~candidates, _NO_KEY).topk(count, dim=-1).values


def _positions(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(positions, valid)`` of sorted :func:`_sortable_key` keys (``_NO_KEY``: no candidate)."""
    valid = keys != _NO_KEY
    return torch.where(valid, _key_index(keys), torch.zeros_like(keys)), valid


def select_top(scores: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mask of the ``count[b]`` best candidates of each row (ties: lower position first).

    ``scores [B, K]``, ``candidates [B, K]`` bool, ``count [B]`` int -> ``[B, K]`` bool.
    One host sync: the largest count."""
    b, k = scores.shape
    most = min(int(count.max()), k) if b else 0
    if most == 0:
        return torch.zeros_like(candidates)
    positions, valid = top_candidates(scores, candidates, most)
    return positions_mask(positions, valid & (torch.arange(most, device=scores.device) < count.unsqueeze(-1)), k)


def positions_mask(positions: torch.Tensor, valid: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, size]`` bool mask that is True at the ``positions [B, M]`` where ``valid``."""
    slot = torch.where(valid, positions, torch.full_like(positions, size))        # size: discarded
    mask = torch.zeros(positions.shape[0], size + 1, dtype=torch.bool, device=positions.device)
    return mask.scatter_(1, slot, True)[:, :size]


def _adaptive_thresholds(threshold: float, eta: float, count: int, dtype, device) -> torch.Tensor:
    """``[count + 1]``: the NMS threshold after 0, 1, ... ``count`` kept boxes (times ``eta`` after
    each kept box while above 0.5), in ``dtype`` arithmetic as Caffe's float."""
    thr = torch.tensor(float(threshold), dtype=dtype)
    table = [thr]
    for _ in range(count):
        if thr > 0.5:
            thr = thr * eta
        table.append(thr)
    return torch.stack(table).to(device)


def greedy_nms(boxes: torch.Tensor, valid: torch.Tensor, threshold: float, eta: float = 1.0,
               done: Optional[Callable[[torch.Tensor, int], bool]] = None, block: int = 64) -> torch.Tensor:
    """Caffe's greedy NMS (ApplyNMSFast / ApplyNMS) on ``B`` problems at once.

    ``boxes [B, M, 4]`` are the candidates of each problem already in descending score order,
    ``valid [B, M]`` marks real candidates. A candidate is kept when its IoU with every box kept
    before it is ``<=`` the current threshold; after each kept box the threshold of that problem
    is multiplied by ``eta`` while it is above 0.5 (adaptive NMS, ``eta < 1``).
    Returns ``keep [B, M]`` bool.

    The candidates are decided ``block`` at a time, all problems together: first the largest IoU
    of each with the boxes kept in earlier blocks (gathered into a compact list), then the
    block's own greedy order by fixed-point iteration of "kept iff the largest IoU with the
    kept candidates before it is <= the threshold for the number kept before it": decisions are
    final up to the first candidate that changed, so it ends in at most ``block`` rounds (two
    or three in practice). ``done(keep, decided)``, called after each block with the number of
    candidates decided so far, may end the walk early: the rest are returned as not kept.
    """
    b, m, _ = boxes.shape
    device = boxes.device
    keep = torch.zeros(b, m, dtype=torch.bool, device=device)
    table = _adaptive_thresholds(threshold, eta, m, boxes.dtype, device) if eta < 1 else None
    areas = box_area(boxes)
    corners = _corners(boxes)
    kept = boxes.new_zeros(5, b, m)                      # corners and area of the kept boxes, compacted
    count = torch.zeros(b, dtype=torch.long, device=device)
    lower = torch.ones(block, block, dtype=torch.bool, device=device).tril_(-1)
    for start in range(0, m, block):
        end = min(start + block, m)
        t = end - start
        mine = tuple(c[:, start:end].unsqueeze(-1) for c in corners)               # [B, T, 1]
        area = areas[:, start:end]
        most = int(count.max())                                                     # host sync
        if most:
            earlier = _iou(mine, tuple(c[:, None, :most] for c in kept[:4]), area.unsqueeze(-1),
                           kept[4, :, None, :most], pixel=False)
            past = torch.arange(most, device=device) >= count.unsqueeze(-1)
            earlier = earlier.masked_fill_(past.unsqueeze(1), 0.0).amax(-1)        # [B, T]
        else:
            earlier = area.new_zeros(b, t)
        inner = _iou(mine, tuple(c[:, None, start:end] for c in corners), area.unsqueeze(-1),
                     area.unsqueeze(1), pixel=False).masked_fill_(~lower[:t, :t], 0.0)  # [B, T, T]
        real = valid[:, start:end]
        thr = threshold if table is None else table[count].unsqueeze(-1)
        chosen = real & (earlier <= thr)
        while True:
            if table is not None:
                thr = table[count.unsqueeze(-1) + chosen.cumsum(-1) - chosen.long()]
            worst = torch.maximum(earlier, inner.masked_fill(~chosen.unsqueeze(1), 0.0).amax(-1))
            again = real & (worst <= thr)
            if torch.equal(again, chosen):                                          # host sync
                break
            chosen = again
        keep[:, start:end] = chosen
        image, pos = chosen.nonzero(as_tuple=True)
        slot = count[image] + chosen.cumsum(-1)[image, pos] - 1
        kept[:, image, slot] = torch.stack(tuple(c[:, start:end][image, pos] for c in corners)
                                           + (area[image, pos],))
        count += chosen.sum(-1)
        if done is not None and end < m and done(keep, end):
            break
    return keep
