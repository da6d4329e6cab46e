"""A deliberately simple, per-image MultiBoxLoss written from docs/semantics.md ("Box coding",
"Matching", "Hard-negative mining", "MultiBoxLoss normalisation"; not from deeper_ssd.box), to check the batched implementation on random batches and as the
baseline of bench/loss.py.

One image at a time: read its objects, match them to the priors with the greedy
bipartite + per-prediction rules, mine negatives, gather the selected rows and let autograd
differentiate the plain sums. Supported: share_location true, use_prior_for_matching true or
false, every code_type, encode_variance_in_target (with the true gradient of pred/variance),
match_type, overlap_threshold, ignore_cross_boundary_bbox, use_difficult_gt, mining NONE /
MAX_NEGATIVE / HARD_EXAMPLE (no mining NMS), SMOOTH_L1 / L2, SOFTMAX / LOGISTIC (one-hot
targets), map_object_to_agnostic, the four normalisations and loc_weight.
"""
import math

import torch
import torch.nn.functional as F

DEFAULTS = dict(num_classes=21, background_label_id=0, overlap_threshold=0.5, match_type="PER_PREDICTION",
                use_prior_for_matching=True, use_difficult_gt=True, ignore_cross_boundary_bbox=False,
                mining_type="MAX_NEGATIVE", neg_pos_ratio=3.0, neg_overlap=0.5, sample_size=64,
                code_type="CENTER_SIZE", encode_variance_in_target=False, loc_loss_type="SMOOTH_L1",
                conf_loss_type="SOFTMAX", loc_weight=1.0, normalization="VALID",
                map_object_to_agnostic=False)
LOG_FLT_MIN = math.log(1.1754943508222875e-38)

# three priors and one object, worked by hand (tests of box.py and MultiBoxLoss)
PRIORS = torch.tensor([[0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75], [0.5, 0.5, 1, 1]])
OBJECT = torch.tensor([[0.2, 0.2, 0.6, 0.6]])
# A: inter 0.3^2 = 0.09, union 0.25 + 0.16 - 0.09; B: 0.35^2 / (0.41 - 0.1225); C: 0.01 / 0.40
HAND_IOU = [0.09 / 0.32, 0.1225 / 0.2875, 0.01 / 0.40]
VAR = [0.1, 0.1, 0.2, 0.2]   # SSD's prior variances


def prior_blob(boxes, variances=VAR):
    """A PriorBox top ``[1, 2, 4K]`` (boxes, then their variances) for ``boxes [K, 4]``."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    var = torch.tensor(variances, dtype=torch.float32).repeat(len(boxes))
    return torch.stack([boxes.reshape(-1), var]).unsqueeze(0)


def iou_matrix(a, b):
    """JaccardOverlap of every box of a [A, 4] with every box of b [B, 4] (float32)."""
    ix = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0]))
    iy = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1]))
    area = lambda x: ((x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])).clamp(min=0)
    inter = ix * iy
    iou = inter / (area(a)[:, None] + area(b)[None, :] - inter)
    return torch.where((ix > 0) & (iy > 0), iou, torch.zeros_like(iou))


def encode_box(p, v, g, code, variance_in_target):
    """The "Box coding" table of docs/semantics.md, one formula per code."""
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    if code == "CENTER_SIZE":
        gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
        t = torch.stack([((g[:, 0] + g[:, 2]) / 2 - (p[:, 0] + p[:, 2]) / 2) / pw,
                         ((g[:, 1] + g[:, 3]) / 2 - (p[:, 1] + p[:, 3]) / 2) / ph,
                         torch.log(gw / pw), torch.log(gh / ph)], 1)
    elif code == "CORNER":
        t = g - p
    else:
        t = (g - p) / torch.stack([pw, ph, pw, ph], 1)
    return t if variance_in_target else t / v


def decode_box(p, v, t, code, variance_in_target):
    if not variance_in_target:
        t = t * v
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    if code == "CENTER_SIZE":
        cx, cy = t[:, 0] * pw + (p[:, 0] + p[:, 2]) / 2, t[:, 1] * ph + (p[:, 1] + p[:, 3]) / 2
        w, h = torch.exp(t[:, 2]) * pw, torch.exp(t[:, 3]) * ph
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    if code == "CORNER":
        return p + t
    return p + t * torch.stack([pw, ph, pw, ph], 1)


def match_image(iou, threshold, per_prediction, ignored):
    """"Matching" (docs/semantics.md) for one image: iou [K, G]; returns (index [K], best IoU [K])."""
    k, g = iou.shape
    present = (iou > 1e-6) & ~ignored[:, None]
    iou = torch.where(present, iou, torch.zeros_like(iou))
    idx = torch.full((k,), -1, dtype=torch.long)
    idx[ignored] = -2
    best = iou.max(1).values if g else torch.zeros(k)
    free_gt = list(range(g))
    while free_gt:
        usable = present.clone()
        usable[idx != -1] = False
        usable[:, [j for j in range(g) if j not in free_gt]] = False
        if not usable.any():
            break
        flat = torch.where(usable, iou, torch.full_like(iou, -1.0)).flatten().argmax().item()
        i, j = divmod(flat, g)                    # first maximum in (prior, object) order
        idx[i], best[i] = j, iou[i, j]
        free_gt.remove(j)
    if per_prediction:                            # each still-free prior: its best object >= thr
        rows, free = iou.tolist(), idx.tolist()
        for i in range(k):
            if free[i] != -1:
                continue
            cand = [(o, j) for j, o in enumerate(rows[i]) if o > 1e-6 and o >= threshold]
            if cand:
                o, j = max(cand, key=lambda pair: (pair[0], -pair[1]))   # first j on ties
                idx[i], best[i] = j, o
    return idx, best


def conf_row_loss(logits, target, kind, num_classes):
    """Cross-entropy of rows ``logits [R, C]`` towards class ``target [R]``."""
    if kind == "SOFTMAX":
        logp = F.log_softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
        return -(logp + (logp.clamp(min=LOG_FLT_MIN) - logp).detach())
    goal = F.one_hot(target, num_classes).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, goal, reduction="none").sum(1)


def multibox_loss(loc, conf, prior, label, **options):
    """The MultiBoxLoss scalar for ``loc [N, 4K]``, ``conf [N, KC]``, ``prior [1, 2, 4K]``,
    ``label [1, 1, G, 8]``; ``options`` are MultiBoxLossParameter fields by name (enums as text)
    plus ``normalization``."""
    o = dict(DEFAULTS, **options)
    n, c = loc.shape[0], o["num_classes"]
    k = prior.shape[2] // 4
    priors = prior[0, 0].detach().float().view(k, 4)
    var = prior[0, 1].detach().float().view(k, 4)
    rows = label.detach().reshape(-1, 8).float()
    bg = o["background_label_id"]
    loc_rows, loc_targets, conf_rows, conf_targets = [], [], [], []
    num_matches = 0
    for i in range(n):
        mine = [r for r in rows if int(r[0]) == i and (o["use_difficult_gt"] or r[7] == 0)]
        loc_i = loc[i].view(k, 4)
        conf_i = conf[i].view(k, c)
        if not mine:
            if o["mining_type"] == "NONE":
                conf_rows.append(conf_i)
                conf_targets.append(torch.full((k,), bg, dtype=torch.long))
            continue
        gts = torch.stack([r[3:7] for r in mine])
        labels = torch.tensor([int(r[1]) for r in mine])
        boxes = priors if o["use_prior_for_matching"] else decode_box(
            priors, var, loc_i.detach().float(), o["code_type"], o["encode_variance_in_target"])
        ignored = (((boxes < 0) | (boxes > 1)).any(1) if o["ignore_cross_boundary_bbox"]
                   else torch.zeros(k, dtype=torch.bool))
        idx, best = match_image(iou_matrix(boxes, gts), o["overlap_threshold"],
                                o["match_type"] == "PER_PREDICTION", ignored)
        positive = idx > -1
        cls = torch.where(positive, labels[idx.clamp(min=0)], torch.full_like(idx, bg))
        if o["map_object_to_agnostic"]:
            cls = torch.where(positive, torch.full_like(cls, bg + 1), cls)
        target = encode_box(priors, var, gts[idx.clamp(min=0)], o["code_type"], o["encode_variance_in_target"])
        pred = loc_i
        if o["encode_variance_in_target"]:
            pred, target = pred / var.to(pred.dtype), target / var
        if o["mining_type"] == "NONE":
            negatives = torch.zeros(k, dtype=torch.bool)
        else:
            with torch.no_grad():
                score = conf_row_loss(conf_i, cls, o["conf_loss_type"], c).float()
                if o["mining_type"] == "HARD_EXAMPLE":
                    d = pred - target.to(pred.dtype)
                    per = torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5) \
                        if o["loc_loss_type"] == "SMOOTH_L1" else 0.5 * d * d
                    score = score + torch.where(positive, per.sum(1).float(), torch.zeros(k))
                    eligible = torch.ones(k, dtype=torch.bool)
                    wanted = min(o["sample_size"], k)
                else:
                    eligible = (idx == -1) & (best < o["neg_overlap"])
                    ratio = torch.tensor(o["neg_pos_ratio"], dtype=torch.float32)
                    wanted = min(int(positive.sum().float() * ratio), int(eligible.sum()))
                ok = eligible.tolist()
                candidates = [m for m in torch.argsort(-score, stable=True).tolist() if ok[m]]
                chosen = torch.zeros(k, dtype=torch.bool)
                chosen[candidates[:wanted]] = True
            if o["mining_type"] == "HARD_EXAMPLE":                  # unchosen positives drop out
                positive = positive & chosen
            negatives = chosen & (idx == -1)
        num_matches += int(positive.sum())
        loc_rows.append(pred[positive])
        loc_targets.append(target[positive].to(pred.dtype))
        rows_i = torch.ones(k, dtype=torch.bool) if o["mining_type"] == "NONE" else positive | negatives
        conf_rows.append(conf_i[rows_i])
        conf_targets.append(torch.where(positive, cls, torch.full_like(cls, bg))[rows_i])
    zero = loc.sum() * 0
    loc_sum = zero
    if loc_rows:
        d = torch.cat(loc_rows) - torch.cat(loc_targets)
        per = torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5) if o["loc_loss_type"] == "SMOOTH_L1" \
            else 0.5 * d * d
        loc_sum = per.sum()
    conf_sum = zero
    if conf_rows:
        conf_sum = conf_row_loss(torch.cat(conf_rows), torch.cat(conf_targets), o["conf_loss_type"], c).sum()
    norm = {"FULL": n * k, "VALID": num_matches, "BATCH_SIZE": n, "NONE": 1}[o["normalization"]]
    norm = max(1, norm)
    return o["loc_weight"] * loc_sum / norm + conf_sum / norm
