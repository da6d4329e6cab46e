"""ZoomInNet cross-scale distillation (Liu et al., Remote Sens. 2021; docs/zoominnet.md) as Caffe
layer types: Upsample (layer adaption, LA), AKDPMask (adaptive key distillation positions,
Eq. 11-18) and PositionAwareL2Loss (Eq. 19-21). The 1x1 adapter convolutions of feature
alignment are stock Convolution layers; the builder is :mod:`deeper_ssd.builder.heads`.

Blob layouts (N images, C channels, an h x w feature map with P priors per cell):

* feature maps ``N x C x h x w``; masks ``N x 1 x h x w`` (float, 1 at key positions);
* PriorBox tops ``1 x 2 x 4hwP``: channel 0 the prior corners ``[xmin, ymin, xmax, ymax]``
  (normalised), prior ``(i*w + j)*P + p`` at cell ``(i, j)``; channel 1 the variances (unused);
* the SSD label blob ``1 x 1 x G x 8``, rows ``[item, label, instance, xmin, ymin, xmax, ymax,
  difficult]`` in normalised coordinates.

The choices the paper leaves open are parameters (caffe.proto, ``*Parameter`` messages of the
ZoomInNet section) and are recorded in docs/decisions.md.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import box
from ..proto import caffe_pb2
from .base import Layer, format_shape
from .registry import register
from .detection_blobs import check_label_blob, read_ground_truth

_AKDP = caffe_pb2.AKDPMaskParameter
_PAL2 = caffe_pb2.PositionAwareL2LossParameter


@register
class Upsample(Layer):
    """Nearest-neighbour resize (ZoomInNet's layer adaption, "nearest neighbor interpolation").

    Bottom ``N x C x h x w``; top ``N x C x H x W`` with ``H = scale*h, W = scale*w`` or
    ``out_height`` x ``out_width``. Index convention (PyTorch's legacy ``nearest``, OpenCV's
    ``INTER_NEAREST``): ``y[i, j] = x[floor(i*h/H), floor(j*w/W)]``, i.e. ``x[i // s, j // s]``
    for an integer factor ``s``: every input cell becomes an ``s x s`` block whose top-left cell
    is at ``(s*i, s*j)``. Backward: the gradient of each input cell is the sum over the output
    cells that copy it.
    """

    caffe_type = "Upsample"

    def setup(self, bottoms):
        p = self.lp.upsample_param
        (shape,) = bottoms
        if len(shape) != 4:
            raise ValueError(f"bottom must be N x C x h x w, got {format_shape(shape)}")
        if p.HasField("out_height") != p.HasField("out_width"):
            raise ValueError("give both out_height and out_width, or neither")
        if p.HasField("out_height"):
            if p.out_height <= 0 or p.out_width <= 0:
                raise ValueError(f"out_height ({p.out_height}) and out_width ({p.out_width}) must be > 0")
            self.out_hw: Optional[Tuple[int, int]] = (p.out_height, p.out_width)
        else:
            if p.scale < 1:
                raise ValueError(f"scale must be >= 1, got {p.scale}")
            self.out_hw = None
        self.scale = p.scale
        out = self.out_hw or tuple(d * self.scale if d > 0 else -1 for d in shape[2:])
        return [(shape[0], shape[1], *out)]

    def forward(self, x):
        n, c, h, w = x.shape
        out_h, out_w = self.out_hw or (h * self.scale, w * self.scale)
        if out_h % h == 0 and out_w % w == 0:
            # integer factors: a broadcast copy, whose backward is a (deterministic) block sum
            sh, sw = out_h // h, out_w // w
            return x.view(n, c, h, 1, w, 1).expand(n, c, h, sh, w, sw).reshape(n, c, out_h, out_w)
        rows = torch.arange(out_h, device=x.device) * h // out_h
        cols = torch.arange(out_w, device=x.device) * w // out_w
        return x.index_select(2, rows).index_select(3, cols)


@register
class AKDPMask(Layer):
    """Adaptive key distillation positions (ZoomInNet §3.3.1, Eq. 11-18) of L feature levels.

    Bottoms ``feat_1, prior_1, ..., feat_L, prior_L, label``: each feature map ``N x C x h x w``
    (only N, h, w are used) with its PriorBox top ``1 x 2 x 4hwP``, then the label blob
    ``1 x 1 x G x 8``. Tops: one mask ``N x 1 x h_l x w_l`` per level.

    Per image n with ``G_n`` objects (difficult ones only with ``use_difficult_gt``; an image
    without objects gets an all-zero mask) and the priors of one level (``scope: PER_LEVEL``) or
    of all bottom levels together (``ALL_LEVELS``):

    * ``IOU_map[a, g]`` = IoU of prior a with object g (:func:`deeper_ssd.box.pairwise_iou`);
    * ``lambda = mean + std`` of all ``A x G_n`` entries (``std_mode``: SAMPLE divides by
      ``A G_n - 1``, POPULATION by ``A G_n``), or ``fixed_factor`` with ``threshold_mode: FIXED``;
    * ``thr[g] = lambda * max_a IOU_map[a, g]``; a prior is key for g when ``IOU_map > thr[g]``
      (strictly);
    * ``mask[i, j]`` = 1 if any of the cell's P priors is key for any object (``binarize``),
      else the number of key (prior, object) pairs of the cell (Eq. 17 literally).

    No gradient flows through this layer.
    """

    caffe_type = "AKDPMask"
    num_bottoms = (3, None)
    num_tops = (1, None)
    #: the mask ignores classes: no label value counts as background for read_ground_truth
    background_label_id = -1

    def setup(self, bottoms):
        p = self.lp.akdp_mask_param
        if len(bottoms) % 2 != 1:
            raise ValueError(f"needs (feature, prior) bottom pairs and the label blob last; "
                             f"has {len(bottoms)} bottoms")
        levels = len(bottoms) // 2
        if len(self.lp.top) != levels:
            raise ValueError(f"needs one top per level: {levels} level(s), {len(self.lp.top)} top(s)")
        if p.threshold_mode == _AKDP.FIXED and not p.fixed_factor >= 0:
            raise ValueError(f"fixed_factor must be >= 0, got {p.fixed_factor}")
        check_label_blob(self, bottoms[-1], len(bottoms) - 1)
        tops, self.cell_priors = [], []
        for level in range(levels):
            feat, prior = bottoms[2 * level], bottoms[2 * level + 1]
            names = f"'{self.lp.bottom[2 * level]}' {format_shape(feat)}, " \
                    f"'{self.lp.bottom[2 * level + 1]}' {format_shape(prior)}"
            if len(feat) != 4:
                raise ValueError(f"level {level}: feature bottom must be N x C x h x w ({names})")
            if len(prior) != 3 or prior[:2] != (1, 2) or prior[2] % 4:
                raise ValueError(f"level {level}: prior bottom must be a PriorBox top 1 x 2 x 4K ({names})")
            cells = feat[2] * feat[3]
            if cells <= 0 or (prior[2] // 4) % cells:
                raise ValueError(f"level {level}: {prior[2] // 4} priors do not tile the "
                                 f"{feat[2]} x {feat[3]} map ({names})")
            if feat[0] != bottoms[0][0]:
                raise ValueError(f"level {level}: batch size differs from level 0 ({names})")
            self.cell_priors.append(prior[2] // 4 // cells)
            tops.append((feat[0], 1, feat[2], feat[3]))
        self.param = p
        return tops

    @torch.no_grad()
    def forward(self, *bottoms):
        feats, priors, label = bottoms[0:-1:2], bottoms[1:-1:2], bottoms[-1]
        n = feats[0].shape[0]
        gt = read_ground_truth(self, label, n, self.param.use_difficult_gt)
        boxes = [prior[0, 0].float().view(-1, 4) for prior in priors]
        if self.param.scope == _AKDP.ALL_LEVELS:
            key = self._key_priors(torch.cat(boxes), gt).split([len(b) for b in boxes], dim=1)
        else:
            key = [self._key_priors(b, gt) for b in boxes]
        masks = []
        for feat, hits, per_cell in zip(feats, key, self.cell_priors):
            h, w = feat.shape[2:]
            cell = hits.view(n, h, w, per_cell).sum(-1)
            if self.param.binarize:
                cell = cell > 0
            masks.append(cell.to(feat.dtype).unsqueeze(1))
        return tuple(masks) if len(masks) > 1 else masks[0]

    def _key_priors(self, priors: torch.Tensor, gt) -> torch.Tensor:
        """``priors [A, 4]`` -> ``[N, A]`` number of objects each prior is a key prior for."""
        p = self.param
        valid = gt.valid.unsqueeze(1)                                           # [N, 1, G]
        iou = box.pairwise_iou(priors.unsqueeze(0), gt.boxes)                   # [N, A, G]
        iou = torch.where(valid, iou, torch.zeros_like(iou))
        if p.threshold_mode == _AKDP.FIXED:
            factor = torch.full((iou.shape[0], 1, 1), p.fixed_factor, device=iou.device)
        else:
            entries = valid.sum((1, 2), keepdim=True) * iou.shape[1]            # A * G_n
            mean = iou.sum((1, 2), keepdim=True) / entries.clamp(min=1)
            squares = torch.where(valid, (iou - mean) ** 2, torch.zeros_like(iou)).sum((1, 2), keepdim=True)
            dof = entries - (1 if p.std_mode == _AKDP.SAMPLE else 0)
            std = torch.where(dof > 0, squares / dof.clamp(min=1), torch.zeros_like(squares)).sqrt()
            factor = mean + std
        threshold = factor * iou.max(1, keepdim=True).values                   # [N, 1, G]
        return ((iou > threshold) & valid).sum(-1)


@register
class PositionAwareL2Loss(Layer):
    """Position-aware L2 distillation loss (ZoomInNet §3.3.2, Eq. 19-21) as a scalar top.

    Bottoms: student ``S`` and teacher ``T`` features ``N x C x h x w`` and the mask ``M``
    ``N x 1 x h x w`` (AKDPMask). With ``D[n, i, j] = sum_c (T - S)^2`` (``channel_reduce:
    MEAN``: the channel mean):

    * ``MASK_SUM``: ``sum_{n,i,j} M D / max(1, sum_{n,i,j} M)`` (Eq. 21 over the batch, FGFI);
    * ``PER_IMAGE``: the mean over n of ``sum_{i,j} M D / max(1, sum_{i,j} M)``;
    * ``NONE``: ``sum_{n,i,j} M D``.

    λ_distill is the layer's ``loss_weight`` (ZoomInNet: 0.01, applied once). Only the student
    receives a gradient, ``-2 M (T - S) / normaliser`` (times loss_weight); the teacher and the
    mask are always detached and a ``propagate_down: true`` for them is refused.
    """

    caffe_type = "PositionAwareL2Loss"
    num_bottoms = (3, 3)
    is_loss = True

    def setup(self, bottoms):
        student, teacher, mask = bottoms
        names = ", ".join(f"'{b}' {format_shape(s)}" for b, s in zip(self.lp.bottom, bottoms))
        if len(student) != 4 or tuple(student) != tuple(teacher):
            raise ValueError(f"student and teacher must both be N x C x h x w of one shape; got {names} "
                             "(crop or adapt them first)")
        if tuple(mask) != (student[0], 1, student[2], student[3]):
            raise ValueError(f"mask must be N x 1 x h x w of the student's N, h, w; got {names}")
        pd = list(self.lp.propagate_down)
        if pd and (pd[1] or pd[2]):
            raise ValueError("cannot back-propagate to the teacher or the mask "
                             "(propagate_down must be false for bottoms 1 and 2)")
        self.param = self.lp.position_aware_l2_loss_param
        return [()]

    def forward(self, student, teacher, mask):
        p = self.param
        diff = (teacher.detach() - student) ** 2
        per_cell = diff.sum(1, keepdim=True) if p.channel_reduce == _PAL2.SUM else diff.mean(1, keepdim=True)
        mask = mask.detach().to(per_cell.dtype)
        weighted = per_cell * mask
        if p.normalization == _PAL2.MASK_SUM:
            return weighted.sum() / mask.sum().clamp(min=1)
        if p.normalization == _PAL2.PER_IMAGE:
            return (weighted.sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp(min=1)).mean()
        return weighted.sum()
