"""MultiBoxLoss: SSD's training loss (matching, hard-negative mining, localisation and
confidence terms) with the SSD fork's semantics. Blob layouts: :mod:`.detection_blobs`."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import box
from ..proto import caffe_pb2
from .base import Layer
from .registry import register
from .detection_blobs import GroundTruth, check_heads, check_label_blob, check_nms, read_ground_truth

_MBL = caffe_pb2.MultiBoxLossParameter
_LOSS = caffe_pb2.LossParameter


@register
class MultiBoxLoss(Layer):
    """SSD's training loss (docs/semantics.md, "Matching" to "MultiBoxLoss normalisation"). See :meth:`forward`."""

    caffe_type = "MultiBoxLoss"
    num_bottoms = (4, 4)
    is_loss = True
    host_bottoms = (3,)              # the label blob: its checks and counts need no device sync

    def setup(self, bottoms):
        p = self.lp.multibox_loss_param
        if not p.HasField("num_classes"):
            raise ValueError("must provide num_classes")
        self.num_classes = p.num_classes
        if self.num_classes < 1:
            raise ValueError("num_classes should not be less than 1")
        self.param = p
        self.share_location = p.share_location
        self.loc_classes = 1 if self.share_location else self.num_classes
        self.background_label_id = p.background_label_id
        self.mining_type = p.mining_type
        if p.HasField("do_neg_mining") and p.do_neg_mining != (p.mining_type != _MBL.NONE):
            raise ValueError(f"do_neg_mining: {str(p.do_neg_mining).lower()} contradicts mining_type "
                             f"{_MBL.MiningType.Name(p.mining_type)} (do_neg_mining is deprecated)")
        if self.mining_type != _MBL.NONE and not self.share_location:
            raise ValueError("negative mining needs share_location: true (as in Caffe)")
        if self.mining_type == _MBL.HARD_EXAMPLE and p.sample_size <= 0:
            raise ValueError(f"sample_size must be > 0 for HARD_EXAMPLE mining, got {p.sample_size}")
        if p.HasField("nms_param"):
            check_nms(p.nms_param)
        if p.conf_loss_type == _MBL.SOFTMAX and not self.background_label_id < self.num_classes:
            raise ValueError(f"background_label_id {self.background_label_id} must be within "
                             f"[0, num_classes={self.num_classes}) for SOFTMAX")
        if p.map_object_to_agnostic and self.num_classes != 2:
            raise ValueError("map_object_to_agnostic needs num_classes: 2 (background + object)")
        lp = self.lp.loss_param
        if not lp.HasField("normalization") and lp.HasField("normalize"):
            self.normalization = _LOSS.VALID if lp.normalize else _LOSS.BATCH_SIZE
        else:
            self.normalization = lp.normalization
        pd = list(self.lp.propagate_down)
        if pd and len(pd) != 4:
            raise ValueError(f"propagate_down needs 4 values (one per bottom), got {len(pd)}")
        pd = pd or [True, True, False, False]
        if pd[2] or pd[3]:
            raise ValueError("cannot back-propagate to the prior or label bottoms "
                             "(propagate_down must be false for bottoms 2 and 3)")
        self.use_loc, self.use_conf = bool(pd[0]), bool(pd[1])
        self.num_priors = check_heads(self, bottoms, self.num_classes, self.loc_classes)
        check_label_blob(self, bottoms[3], 3)
        return [()]

    def forward(self, loc, conf, prior, label):
        """The scalar loss; see :meth:`terms` for what it is made of."""
        return self.terms(loc, conf, prior, label).loss

    def terms(self, loc, conf, prior, label) -> "MultiBoxTerms":
        """Match, mine, and sum the two losses (docs/semantics.md: "Matching", "Hard-negative mining",
        "MultiBoxLoss normalisation").

        ``loc [N, 4KL]``, ``conf [N, KC]`` (logits), ``prior [1, 2, 4K]``, ``label [1, 1, G, 8]``.
        Matching, encoding and mining use float32 box geometry like Caffe and carry no
        gradient; the loss is in the dtype of ``loc``/``conf``, and its autograd gradients are
        Caffe's backward (including its quirk with ``encode_variance_in_target``, where the
        gradient w.r.t. ``pred / variance`` is written unscaled to ``mbox_loc``).
        Host syncs: the matched priors and, when mining, the largest number of negatives (counts
        Caffe needs). The padded object count and the label checks cost a third one only when
        ``label`` is on the device: a label on the host (as a data layer makes it; the Net
        passes it so, :attr:`host_bottoms`) is read there and its padded objects are copied over
        without waiting for the device.
        """
        p = self.param
        n, k, c, nl = loc.shape[0], self.num_priors, self.num_classes, self.loc_classes
        priors = prior[0, 0].detach().float().view(k, 4).to(loc.device)
        variances = prior[0, 1].detach().float().view(k, 4).to(loc.device)
        max_label = None if p.map_object_to_agnostic else c
        gt = read_ground_truth(self, label, n, p.use_difficult_gt, max_label=max_label)
        if gt.boxes.device != loc.device:
            gt = GroundTruth(*(t.to(loc.device, non_blocking=True) for t in gt))
        loc4 = loc.view(n, k, nl, 4).transpose(1, 2)                       # [N, L, K, 4]
        conf3 = conf.view(n, k, c)
        decoded = None
        if not p.use_prior_for_matching:
            decoded = box.decode(priors, variances, loc4.detach().float(), p.code_type,
                                 p.encode_variance_in_target)
        indices, overlaps = self._match(priors, decoded, gt)                # [N, L, K]
        matched = (indices > -1).nonzero(as_tuple=True)                     # host sync: the matches
        loc_terms = self._loc_terms(loc4, indices, matched, priors, variances, gt, decoded)
        logp = F.log_softmax(conf3, dim=-1) if p.conf_loss_type == _MBL.SOFTMAX else None
        negatives = None
        if self.mining_type != _MBL.NONE:
            indices, negatives = self._mine(conf3, logp, loc, loc_terms, matched, indices, overlaps,
                                            priors, variances, gt)
        num_matches = (indices > -1).sum()
        still = (indices[matched] > -1).unsqueeze(-1)                       # HARD_EXAMPLE demotes
        loc_sum = torch.where(still, loc_terms, torch.zeros_like(loc_terms)).sum()
        conf_sum = self._conf_sum(conf3, logp, indices, negatives, gt)
        normalizer = self._normalizer(n, k, num_matches, loc.dtype)
        loss = loc.new_zeros(())
        if self.use_loc:
            loss = loss + p.loc_weight * loc_sum / normalizer
        if self.use_conf:
            loss = loss + conf_sum / normalizer
        return MultiBoxTerms(loss, loc_sum, conf_sum, normalizer, num_matches, indices, negatives)

    def _match(self, priors, decoded, gt: GroundTruth):
        """Match indices and overlaps ``[N, L, K]`` (L = 1 with share_location, else one row per
        class, the background row never matched), as FindMatches does."""
        p = self.param
        n, g = gt.valid.shape
        k, c = self.num_priors, self.num_classes
        thr, per_prediction = p.overlap_threshold, p.match_type == _MBL.PER_PREDICTION
        classes = torch.arange(c, device=priors.device)
        if p.use_prior_for_matching:                # padding objects are empty boxes: IoU 0
            iou = box.pairwise_iou(gt.boxes, priors)                            # [N, G, K]
            ignored = (box.is_cross_boundary(priors).expand(n, k)
                       if p.ignore_cross_boundary_bbox else None)
            indices, overlaps = box.match(iou, None, ignored, thr, per_prediction)
            if self.share_location:
                return indices.unsqueeze(1), overlaps.unsqueeze(1)
            label = gt.labels.gather(1, indices.clamp(min=0))                # distribute by class
            own = ((indices > -1) & (label == classes.view(c, 1, 1))).transpose(0, 1)
            own &= (classes != self.background_label_id).view(1, c, 1)
            return (torch.where(own, indices.unsqueeze(1), torch.full_like(own, -1, dtype=torch.long)),
                    overlaps.unsqueeze(1).expand(n, c, k))
        nl = decoded.shape[1]
        valid = gt.valid.unsqueeze(1).expand(n, nl, g)
        if not self.share_location:                                          # objects of class l
            valid = valid & (gt.labels.unsqueeze(1) == classes.view(1, c, 1))
        iou = box.pairwise_iou(gt.boxes.unsqueeze(1), decoded)              # [N, L, G, K]
        ignored = box.is_cross_boundary(decoded) if p.ignore_cross_boundary_bbox else None
        indices, overlaps = box.match(iou.reshape(n * nl, g, k), valid.reshape(n * nl, g),
                                      None if ignored is None else ignored.reshape(n * nl, k),
                                      thr, per_prediction)
        indices, overlaps = indices.view(n, nl, k), overlaps.view(n, nl, k)
        if not self.share_location:                                          # background: no entry
            skip = (classes == self.background_label_id).view(1, c, 1)
            indices = indices.masked_fill(skip, -1)
            overlaps = overlaps.masked_fill(skip, 0.0)
        return indices, overlaps

    def _loc_terms(self, loc4, indices, matched, priors, variances, gt: GroundTruth, decoded):
        """Per-coordinate localisation loss ``[M, 4]`` of the ``M`` matched (image, loc class,
        prior) triples ``matched`` (Caffe's rows of loc_pred / loc_gt, in the same order),
        differentiable w.r.t. ``loc4 [N, L, K, 4]``."""
        p = self.param
        image, _, prior = matched
        objects = gt.boxes[image, indices[matched]]
        target = box.encode(priors[prior], variances[prior], objects, p.code_type,
                            p.encode_variance_in_target).to(loc4.dtype)
        pred = loc4[matched]
        if p.bp_inside:
            inside_box = priors[prior] if p.use_prior_for_matching else decoded[matched]
            outside = (inside_box < 0) | (inside_box > 1)
            pred = torch.where(outside, target, pred)
        if p.encode_variance_in_target:
            var = variances[prior].to(loc4.dtype)
            pred = pred + (pred / var - pred).detach()
            target = target / var
        diff = pred - target
        if p.loc_loss_type == _MBL.SMOOTH_L1:
            return torch.where(diff.abs() < 1, 0.5 * diff * diff, diff.abs() - 0.5)
        return 0.5 * diff * diff

    def _class_targets(self, indices, gt: GroundTruth):
        """Per prior: the class a positive is trained towards (``[N, K]``, -1 where unmatched),
        taking the last loc class with a match like Caffe's EncodeConfPrediction."""
        n, nl, k = indices.shape
        matched = indices > -1
        last = torch.where(matched, torch.arange(nl, device=indices.device).view(1, nl, 1),
                           torch.full_like(indices, -1)).max(1).values               # [N, K]
        index = indices.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1)
        label = gt.labels.gather(1, index.clamp(min=0))
        if self.param.map_object_to_agnostic:
            label = torch.full_like(label, self.background_label_id + 1)
        return torch.where(last >= 0, label, torch.full_like(label, -1))

    def _conf_rows(self, conf3, logp, target, class_row, fill, image_stride=None):
        """Per-prior confidence loss ``[N, K]`` towards the ``target`` classes. LOGISTIC targets
        are 1 at the target class of the priors in ``class_row`` and ``fill`` elsewhere (the
        loss fills with background_label_id, the mining score with 0, as Caffe does).
        ``image_stride``: where image ``i``'s one-hot entries land in the flat ``N*K*C`` target
        (Caffe's EncodeConfPrediction advances by ``K``, not ``K*C``, per image when every prior
        is used, so its LOGISTIC targets of images ``i > 0`` are misplaced; kept as is).
        ``logp``: the log-softmax of ``conf3`` (SOFTMAX only)."""
        n, k, c = conf3.shape
        if logp is not None:
            logp = logp.gather(-1, target.clamp(0, c - 1).unsqueeze(-1)).squeeze(-1)
            # Caffe: -log(max(p, FLT_MIN)); its gradient stays softmax - onehot
            return -(logp + (logp.clamp(min=_LOG_FLT_MIN) - logp).detach())
        hot = class_row & (target >= 0) & (target < c)
        stride = k * c if image_stride is None else image_stride
        flat = (torch.arange(n, device=conf3.device).view(n, 1) * stride
                + torch.arange(k, device=conf3.device).view(1, k) * c + target.clamp(0, c - 1))
        goal = torch.full((n * k * c + 1,), float(fill), dtype=conf3.dtype, device=conf3.device)
        goal[torch.where(hot, flat, torch.full_like(flat, n * k * c))] = 1.0
        goal = goal[:-1].view(n, k, c)
        return F.binary_cross_entropy_with_logits(conf3, goal, reduction="none").sum(-1)

    def _conf_sum(self, conf3, logp, indices, negatives, gt: GroundTruth):
        background = self.background_label_id
        target = self._class_targets(indices, gt)
        positive = target >= 0
        if negatives is None:                                                 # every prior
            rows = torch.ones_like(positive)
            class_row = positive
        else:
            rows = positive | negatives
            class_row = rows
        target = torch.where(positive, target, torch.full_like(target, background))
        per_prior = self._conf_rows(conf3, logp, target, class_row, background,
                                    image_stride=conf3.shape[1] if negatives is None else None)
        return torch.where(rows, per_prior, torch.zeros_like(per_prior)).sum()

    def _mine(self, conf3, logp, loc, loc_terms, matched_at, indices, overlaps, priors, variances,
              gt: GroundTruth):
        """MineHardExamples (share_location only, so L = 1): returns the updated match indices
        and the negatives ``[N, K]``."""
        p = self.param
        n, k = conf3.shape[:2]
        matched = indices[:, 0] > -1
        has_gt = gt.valid.any(1, keepdim=True)
        with torch.no_grad():
            target = self._class_targets(indices, gt)
            target = torch.where(matched, target, torch.full_like(target, self.background_label_id))
            score = self._conf_rows(conf3.detach(), None if logp is None else logp.detach(), target,
                                    torch.ones_like(matched), 0).float()
            if self.mining_type == _MBL.HARD_EXAMPLE:
                loc_loss = torch.zeros_like(score)
                loc_loss[matched_at[0], matched_at[2]] = loc_terms.detach().sum(-1).float()
                score = score + loc_loss
                eligible = has_gt.expand(n, k)
                wanted = torch.full((n,), p.sample_size, dtype=torch.long, device=conf3.device)
            else:
                eligible = (indices[:, 0] == -1) & (overlaps[:, 0] < p.neg_overlap) & has_gt
                num_pos = matched.sum(1).float() * torch.tensor(p.neg_pos_ratio, dtype=torch.float32)
                wanted = num_pos.long()
            count = torch.minimum(wanted, eligible.sum(1))
            if p.HasField("nms_param") and p.nms_param.nms_threshold > 0:
                boxes = priors.expand(n, k, 4) if p.use_prior_for_nms else box.decode(
                    priors, variances, loc.detach().float().view(n, k, 4), p.code_type,
                    p.encode_variance_in_target)
                selected = self._nms_select(score, eligible, count, boxes)
            else:
                selected = box.select_top(score, eligible, count)
        negatives = selected & (indices[:, 0] == -1)
        if self.mining_type == _MBL.HARD_EXAMPLE:                  # unselected positives lose their match
            indices = indices.masked_fill(matched.unsqueeze(1) & ~selected.unsqueeze(1), -1)
        return indices, negatives

    def _nms_select(self, score, eligible, count, boxes):
        """Mining with NMS (ApplyNMS): candidates by descending loss, cut to nms_param.top_k
        (Caffe reads the unset field as 0: nothing is selected), boxes with area < 1e-5 dropped,
        greedy NMS; the first ``count`` survivors are selected."""
        nms = self.param.nms_param
        n, k = score.shape
        if nms.top_k <= 0:
            return torch.zeros_like(eligible)
        order, valid = box.top_candidates(score, eligible, nms.top_k)
        cand = boxes.gather(1, order.unsqueeze(-1).expand(*order.shape, 4))
        valid &= box.box_area(cand) >= 1e-5
        keep = box.greedy_nms(cand, valid, nms.nms_threshold)
        chosen = keep & (keep.long().cumsum(1) <= count.unsqueeze(1))
        return box.positions_mask(order, chosen, k)

    def _normalizer(self, n, k, num_matches, dtype):
        """LossLayer::GetNormalizer, at least 1 (made on the device: no host-to-device copy)."""
        if self.normalization == _LOSS.VALID:
            return num_matches.to(dtype).clamp(min=1)
        value = {_LOSS.FULL: n * k, _LOSS.BATCH_SIZE: n}.get(self.normalization, 1)
        value = float(np.float32(value))                    # as the float32 tensor it was
        return torch.full((), value, dtype=dtype, device=num_matches.device).clamp(min=1)


_LOG_FLT_MIN = math.log(float(np.finfo(np.float32).tiny))


class MultiBoxTerms(NamedTuple):
    """What :meth:`MultiBoxLoss.terms` computed: the scalar ``loss``; the unnormalised sums
    ``loc_sum`` (SmoothL1/L2 over matched priors) and ``conf_sum`` (cross-entropy over the
    selected rows); the ``normalizer`` and ``num_matches`` (after mining); the final match
    ``indices [N, L, K]`` (-1 unmatched, -2 ignored cross-boundary prior) and the mined
    ``negatives [N, K]`` (None without mining)."""
    loss: torch.Tensor
    loc_sum: torch.Tensor
    conf_sum: torch.Tensor
    normalizer: torch.Tensor
    num_matches: torch.Tensor
    indices: torch.Tensor
    negatives: Optional[torch.Tensor]
