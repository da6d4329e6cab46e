"""The test loop, one implementation for the solver's in-run tests (``Solver.test_all``) and
``deeper-ssd test`` (:func:`deeper_ssd.eval.evaluate.evaluate`): forward a TEST net a number of
times without gradients and collect what its outputs hold.

    rows = DetectionRows()
    run_test_net(net, iterations, rows.add)
    rows.accumulators["detection_eval"].result("11point").mean_ap
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .ap import DetectionAccumulator

__all__ = ["run_test_net", "DetectionRows"]


@torch.no_grad()
def run_test_net(net, iterations: int, consume: Callable[[dict], None], *,
                 before_batch: Optional[Callable[[int], bool]] = None) -> bool:
    """Forward ``net`` ``iterations`` times without gradients, handing each batch's outputs
    (:class:`deeper_ssd.net.NetOutputs`) to ``consume``. ``before_batch(i)`` runs before batch
    ``i``; when it returns False the loop stops there. Returns whether every batch ran."""
    for i in range(iterations):
        if before_batch is not None and before_batch(i) is False:
            return False
        consume(net())
    return True


class DetectionRows:
    """One :class:`deeper_ssd.eval.ap.DetectionAccumulator` per output blob, fed as Caffe's
    ``Solver::TestDetection``: every output holds DetectionEvaluate rows of width 5. With
    ``strict`` (Caffe's check) another output raises ValueError; without, it is skipped."""

    def __init__(self, strict: bool = True):
        self.strict = strict
        self.accumulators: Dict[str, DetectionAccumulator] = {}

    def add(self, outputs: dict) -> None:
        for name, rows in outputs.items():
            if rows.shape[-1] != 5:
                if self.strict:
                    raise ValueError(f"output '{name}' has shape {tuple(rows.shape)}; detection "
                                     "evaluation needs DetectionEvaluate rows of width 5")
                continue
            self.accumulators.setdefault(name, DetectionAccumulator()).add(rows.cpu().numpy())
