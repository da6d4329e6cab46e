"""SSD300, Deeper SSD500 and the demo's 1/8-width BatchNorm'd Deeper SSD500 written by hand as
plain ``nn.Module`` s: the baselines that the executor (bench/executor.py) and the training step
(bench/train_step.py) are measured against.

Nothing here reads a prototxt: layers are typed out as an ordinary PyTorch user would (VGG16
reduced body, extra layers, L2Norm, heads, permute/flatten/concat, softmax), priors are
precomputed once at construction, and module names equal the Caffe layer names only so that
``copy_weights_from(net)`` can give both models the same weights for an output check.
Detections use the same DetectionOutput routine as the executor, so the comparison measures
the executor's overhead, not two NMS implementations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# VGG16 body: (name, out channels) per 3x3/1/1 conv; "pool" entries are 2x2/2 ceil-mode pools
VGG16 = [("conv1_1", 64), ("conv1_2", 64), "pool", ("conv2_1", 128), ("conv2_2", 128), "pool",
         ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), "pool",
         ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512), "pool",
         ("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512)]


@dataclass(frozen=True)
class Extra:
    """One extra 1x1 + 3x3 pair: ``conv{i}_1`` (1x1, ``mid`` channels) and ``conv{i}_2``."""
    index: int
    mid: int
    out: int
    stride: int
    pad: int


@dataclass(frozen=True)
class Head:
    """A prediction source with its PriorBox settings (sizes in input pixels)."""
    source: str
    min_size: float
    max_size: float
    aspect_ratios: Tuple[float, ...]
    step: float


SSD300_EXTRAS = [Extra(6, 256, 512, 2, 1), Extra(7, 128, 256, 2, 1), Extra(8, 128, 256, 1, 0),
                 Extra(9, 128, 256, 1, 0)]
SSD300_HEADS = [Head("conv4_3", 30, 60, (2,), 8), Head("fc7", 60, 111, (2, 3), 16),
                Head("conv6_2", 111, 162, (2, 3), 32), Head("conv7_2", 162, 213, (2, 3), 64),
                Head("conv8_2", 213, 264, (2,), 100), Head("conv9_2", 264, 315, (2,), 300)]


def ratios(aspect_ratios: Sequence[float]) -> List[float]:
    out = [1.0]
    for r in aspect_ratios:
        out += [r, 1.0 / r]
    return out


def prior_boxes(head: Head, feature: int, image: int) -> torch.Tensor:
    """SSD priors of one square feature map: ``[feature^2 * P, 4]`` corners normalised to the
    image (sizes truncated to int, as Caffe's PriorBox)."""
    mn, mx = int(head.min_size), int(head.max_size)
    sides = [(mn, mn), (math.sqrt(mn * mx),) * 2] + \
        [(mn * math.sqrt(r), mn / math.sqrt(r)) for r in ratios(head.aspect_ratios)[1:]]
    centres = (torch.arange(feature, dtype=torch.float64) + 0.5) * head.step
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    w = torch.tensor([s[0] for s in sides], dtype=torch.float64)
    h = torch.tensor([s[1] for s in sides], dtype=torch.float64)
    cx, cy = cx[..., None], cy[..., None]
    boxes = torch.stack([(cx - w / 2) / image, (cy - h / 2) / image, (cx + w / 2) / image, (cy + h / 2) / image], -1)
    return boxes.reshape(-1, 4).float()


class HandSSD(nn.Module):
    """VGG-reduced SSD written out directly. ``forward(x)`` returns ``(loc [N, 4K], conf
    [N, K*C] logits, priors [1, 2, 4K])``; ``detect(x)`` adds softmax and DetectionOutput."""

    def __init__(self, extras: Sequence[Extra], heads: Sequence[Head], image: int, num_classes: int,
                 detection_output=None, width: float = 1.0, batchnorm: bool = False):
        """``width`` scales every feature convolution's channels (rounded, at least 1);
        ``batchnorm`` puts an affine ``nn.BatchNorm2d`` after each (the convolution then has
        no bias), as the zoo's ``width``/``batchnorm`` settings do."""
        super().__init__()
        self.num_classes = num_classes
        self.convs = nn.ModuleDict()
        self.norms = nn.ModuleDict()

        def add(name: str, c_in: int, c_out: int, kernel: int, **kwargs) -> int:
            c_out = max(1, int(round(c_out * width)))
            self.convs[name] = nn.Conv2d(c_in, c_out, kernel, bias=not batchnorm, **kwargs)
            if batchnorm:
                self.norms[name] = nn.BatchNorm2d(c_out, eps=0.001)      # the fork's ConvBNLayer eps
            return c_out

        channels = 3
        for entry in VGG16:
            if entry != "pool":
                channels = add(entry[0], channels, entry[1], 3, padding=1)
        conv4_3 = self.convs["conv4_3"].out_channels
        channels = add("fc6", channels, 1024, 3, padding=6, dilation=6)
        channels = add("fc7", channels, 1024, 1)
        self.extras = list(extras)
        source_channels = {"conv4_3": conv4_3, "fc7": channels}
        for e in self.extras:
            mid = add(f"conv{e.index}_1", channels, e.mid, 1)
            channels = add(f"conv{e.index}_2", mid, e.out, 3, stride=e.stride, padding=e.pad)
            source_channels[f"conv{e.index}_2"] = channels
        self.norm_scale = nn.Parameter(torch.full((conv4_3,), 20.0))
        self.heads = list(heads)
        self.loc = nn.ModuleDict()
        self.conf = nn.ModuleDict()
        self.boxes_per_cell = []
        for head in self.heads:
            per_cell = len(ratios(head.aspect_ratios)) + 1
            self.boxes_per_cell.append(per_cell)
            name = "conv4_3_norm" if head.source == "conv4_3" else head.source
            self.loc[f"{name}_mbox_loc"] = nn.Conv2d(source_channels[head.source], per_cell * 4, 3, padding=1)
            self.conf[f"{name}_mbox_conf"] = nn.Conv2d(source_channels[head.source], per_cell * num_classes, 3, padding=1)
        sizes = self._feature_sizes(image)
        boxes = torch.cat([prior_boxes(h, sizes[h.source], image) for h in self.heads])
        variances = torch.tensor([0.1, 0.1, 0.2, 0.2]).repeat(boxes.shape[0])
        self.register_buffer("priors", torch.stack([boxes.reshape(-1), variances])[None])
        self.detection_output = detection_output

    def _feature_sizes(self, image: int) -> Dict[str, int]:
        size, sizes = image, {}
        for entry in VGG16:
            if entry == "pool":
                size = -(-size // 2)
            elif entry[0] == "conv4_3":
                sizes["conv4_3"] = size
        sizes["fc7"] = size           # pool5 (3x3/1/1), fc6 and fc7 keep conv5's size
        for e in self.extras:
            size = (size + 2 * e.pad - 3) // e.stride + 1
            sizes[f"conv{e.index}_2"] = size
        return sizes

    def features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        found = {}
        for entry in VGG16:
            if entry == "pool":
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            else:
                x = self._conv_relu(entry[0], x)
                if entry[0] == "conv4_3":
                    norm = x.pow(2).sum(1, keepdim=True).add(1e-10).sqrt()
                    found["conv4_3"] = x / norm * self.norm_scale.view(1, -1, 1, 1)
        x = F.max_pool2d(x, 3, 1, 1, ceil_mode=True)
        x = self._conv_relu("fc6", x)
        x = self._conv_relu("fc7", x)
        found["fc7"] = x
        for e in self.extras:
            x = self._conv_relu(f"conv{e.index}_1", x)
            x = self._conv_relu(f"conv{e.index}_2", x)
            found[f"conv{e.index}_2"] = x
        return found

    def _conv_relu(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = self.convs[name](x)
        if name in self.norms:
            x = self.norms[name](x)
        return F.relu(x, inplace=True)

    def forward(self, x: torch.Tensor):
        found = self.features(x)
        n = x.shape[0]
        locs, confs = [], []
        for head, loc, conf in zip(self.heads, self.loc.values(), self.conf.values()):
            feature = found[head.source]
            locs.append(loc(feature).permute(0, 2, 3, 1).reshape(n, -1))
            confs.append(conf(feature).permute(0, 2, 3, 1).reshape(n, -1))
        return torch.cat(locs, 1), torch.cat(confs, 1), self.priors

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        loc, conf, priors = self(x)
        n = x.shape[0]
        probs = torch.softmax(conf.view(n, -1, self.num_classes), dim=2).view(n, -1)
        return self.detection_output(loc, probs, priors)

    @torch.no_grad()
    def copy_weights_from(self, net) -> None:
        """Take the weights of an executor ``Net`` of the same architecture (by layer name)."""
        params = net.params
        for name, module in list(self.convs.items()) + list(self.loc.items()) + list(self.conf.items()):
            module.weight.copy_(params[name][0])
            if module.bias is not None:
                module.bias.copy_(params[name][1])
        for name, norm in self.norms.items():            # Caffe: <conv>_bn statistics, <conv>_scale affine
            norm.weight.copy_(params[f"{name}_scale"][0])
            norm.bias.copy_(params[f"{name}_scale"][1])
        self.norm_scale.copy_(params["conv4_3_norm"][0])


def ssd300(num_classes: int = 21, detection_output=None) -> HandSSD:
    return HandSSD(SSD300_EXTRAS, SSD300_HEADS, 300, num_classes, detection_output)


DEEPER_SSD500_EXTRAS = [Extra(6, 256, 512, 2, 1), Extra(7, 128, 256, 1, 1)] + \
    [Extra(i, 128, 256, 1, 0) for i in range(8, 13)]
DEEPER_SSD500_HEADS = [Head("conv4_3", 50, 100, (2,), 8), Head("fc7", 100, 150, (2, 3), 16),
                       Head("conv6_2", 150, 200, (2, 3), 32), Head("conv7_2", 200, 250, (2, 3), 32),
                       Head("conv8_2", 250, 300, (2, 3), 500 / 14), Head("conv9_2", 300, 350, (2, 3), 500 / 12),
                       Head("conv10_2", 350, 400, (2, 3), 50), Head("conv11_2", 400, 450, (2,), 62.5),
                       Head("conv12_2", 450, 500, (2,), 500 / 6)]


def deeper_ssd500(num_classes: int = 2, detection_output=None) -> HandSSD:
    """Deeper SSD500 (paper Table 1): conv7_2 keeps 16x16, conv8_2 ... conv12_2 go 14 ... 6."""
    return HandSSD(DEEPER_SSD500_EXTRAS, DEEPER_SSD500_HEADS, 500, num_classes, detection_output)


DEEPER_SSD500_TINY_HEADS = [Head(h.source, mn, mx, h.aspect_ratios, h.step) for h, (mn, mx) in zip(
    DEEPER_SSD500_HEADS, [(12, 24), (24, 40), (40, 64), (64, 96), (96, 140), (140, 200), (200, 280),
                          (280, 370), (370, 460)])]


def deeper_ssd500_tiny(num_classes: int = 2, detection_output=None) -> HandSSD:
    """The demo's model (zoo ``deeper_ssd500_tiny``): Deeper SSD500 at 1/8 width with BatchNorm
    after every feature convolution and its small priors."""
    return HandSSD(DEEPER_SSD500_EXTRAS, DEEPER_SSD500_TINY_HEADS, 500, num_classes, detection_output,
                   width=1 / 8, batchnorm=True)
