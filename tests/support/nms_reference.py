"""The DetectionOutput selection as first written (one greedy-NMS step per candidate, vectorised
over images and classes; int64 sort keys over every prior for top_k), kept as the reference the
blocked implementation in deeper_ssd.box / deeper_ssd.layers.detection_output is checked
against (tests/test_nms.py) and timed against (bench/nms.py)."""
import torch

from deeper_ssd import box


def stepwise_nms(boxes, valid, threshold, eta=1.0):
    """Greedy NMS of ``boxes [B, M, 4]`` (score order) walked one candidate at a time -> keep [B, M]."""
    b, m, _ = boxes.shape
    keep = torch.zeros(b, m, dtype=torch.bool, device=boxes.device)
    thr = torch.full((b,), float(threshold), dtype=boxes.dtype, device=boxes.device)
    areas = box.box_area(boxes)
    corners = tuple(c.contiguous() for c in boxes.unbind(-1))
    for i in range(m):
        iou = box._iou(tuple(c[:, i:i + 1] for c in corners), tuple(c[:, :i] for c in corners),
                       areas[:, i:i + 1], areas[:, :i], pixel=False)
        suppressed = (keep[:, :i] & (iou > thr.unsqueeze(-1))).any(-1)
        kept = valid[:, i] & ~suppressed
        keep[:, i] = kept
        if eta < 1:
            thr = torch.where(kept & (thr > 0.5), thr * eta, thr)
    return keep


def top_by_keys(scores, candidates, count):
    """The ``count`` best of each row (score descending, position ascending) via int64 keys."""
    k = scores.shape[-1]
    count = min(count, k)
    keys = box._sortable_key(scores, torch.arange(k, device=scores.device))
    keys = keys.masked_fill_(~candidates, box._NO_KEY).topk(count, dim=-1).values
    valid = keys != box._NO_KEY
    return torch.where(valid, box._key_index(keys), torch.zeros_like(keys)), valid


def detect(layer, loc, conf, prior):
    """Rows ``[1, 1, D, 7]`` of DetectionOutput ``layer`` for the given bottoms, computed the
    first way."""
    n, k, c, nl = loc.shape[0], layer.num_priors, layer.num_classes, layer.loc_classes
    device = conf.device
    priors = prior[0, 0].float().view(k, 4)
    variances = prior[0, 1].float().view(k, 4)
    boxes = box.decode(priors.unsqueeze(1), variances.unsqueeze(1), loc.float().view(n, k, nl, 4),
                       layer.code_type, layer.variance_encoded_in_target)
    classes = torch.tensor([x for x in range(c) if x != layer.background_label_id], dtype=torch.long,
                           device=device)
    scores = conf.float().view(n, k, c).transpose(1, 2)[:, classes]
    candidate = scores > layer.confidence_threshold
    limit = k if layer.top_k < 0 else min(layer.top_k, k)
    m = min(limit, int(candidate.sum(-1).max())) if len(classes) else 0
    if m == 0:
        return layer._no_detection(n, conf.dtype, device)
    order, valid = top_by_keys(scores, candidate, m)
    cand_score = scores.gather(-1, order)
    nc = len(classes)
    image = torch.arange(n, device=device).view(n, 1, 1)
    loc_class = (torch.zeros_like(classes) if layer.share_location else classes).view(1, nc, 1)
    cand_boxes = boxes[image, order, loc_class]
    keep = stepwise_nms(cand_boxes.view(n * nc, m, 4), valid.view(n * nc, m), layer.nms_threshold,
                        layer.eta).view(n, nc, m)
    if layer.keep_top_k > -1:
        best, chosen = top_by_keys(cand_score.view(n, nc * m), keep.view(n, nc * m), layer.keep_top_k)
        keep = box.positions_mask(best, chosen, nc * m).view(n, nc, m)
    image, cls, pos = keep.nonzero(as_tuple=True)
    if image.numel() == 0:
        return layer._no_detection(n, conf.dtype, device)
    rows = torch.cat([torch.stack([image.float(), classes[cls].float(), cand_score[image, cls, pos]], 1),
                      cand_boxes[image, cls, pos]], dim=1)
    return rows.to(conf.dtype).view(1, 1, -1, 7)
