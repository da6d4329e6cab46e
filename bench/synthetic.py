"""A fixed synthetic training batch for the bench scripts that replace the train data layer."""
from __future__ import annotations

import numpy as np
import torch


def make_batch(batch: int, size: int, classes: int, seed: int = 0):
    """Images ``[batch, 3, size, size]`` (float32, ~N(0, 50²), like mean-subtracted pixels) and
    an SSD label blob ``[1, 1, G, 8]`` with 1-10 random boxes of labels ``1..classes-1`` per
    image, in normalised corners."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn((batch, 3, size, size), generator=gen) * 50
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(batch):
        for _ in range(rng.integers(1, 11)):
            xy = rng.uniform(0, 0.8, 2)
            wh = rng.uniform(0.02, 0.5, 2)
            rows.append([i, rng.integers(1, classes), 0, *xy, *np.minimum(xy + wh, 1.0), 0])
    return images, torch.tensor(rows, dtype=torch.float32).view(1, 1, -1, 8)
