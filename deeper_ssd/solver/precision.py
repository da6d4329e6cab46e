"""Training precision: float32 (Caffe's), or mixed precision with ``--amp bf16|fp16``, and the
TF32 switch (docs/decisions.md, "Devices, multi-process stops, mixed precision").

    precision = Precision("fp16", device, trained_blobs)
    with precision.autocast():
        outputs = net()
    precision.backward(outputs.loss)         # loss x scale for fp16
    precision.unscale()                      # gradients back to their true values
    if gradients_overflowed and precision.skips_overflow():
        precision.skip()                     # GradScaler's skipped step: the scale halves
    else:
        precision.step(lambda: rule.apply(rate, it))

Under autocast, convolutions and matrix products run in bf16/fp16; the layers whose arithmetic
carries Caffe's semantics (priors, box encoding and decoding, the loss with its softmax and
normaliser, Normalize, DetectionOutput) compute in float32 whatever their inputs
(``Layer.float32``). The blobs and the update stay float32. fp16 gradients are scaled by
:class:`torch.amp.GradScaler`: an overflow (inf/NaN gradient with a finite loss) skips the
update and halves the scale, as GradScaler does; only an overflow that persists until the scale
is below 1 is treated as a non-finite gradient (the NaN guard stops training).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch

__all__ = ["Precision", "AMP_MODES", "set_tf32"]

#: ``--amp`` values and their autocast dtypes
AMP_MODES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def set_tf32(allow: bool) -> None:
    """TF32 for CUDA matrix products and cuDNN convolutions (on Ampere and later). Off keeps
    float32 arithmetic, which the 1e-4 parity with Caffe needs; torch's default turns it on for
    cuDNN convolutions."""
    torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    torch.backends.cudnn.allow_tf32 = bool(allow)


class _Update(torch.optim.Optimizer):
    """The solver's update as the optimizer GradScaler steps (it unscales the gradients of
    ``params`` and calls :meth:`step` unless they overflowed)."""

    def __init__(self, params: Sequence[torch.Tensor]):
        super().__init__(list(params), {})
        self.apply: Callable = lambda: None

    def step(self, closure=None):
        return self.apply()


class Precision:
    """``mode`` None (float32), "bf16" or "fp16" for a net on ``device`` whose trained blobs
    are ``params`` (see the module docstring)."""

    def __init__(self, mode: Optional[str], device, params: Sequence[torch.Tensor]):
        if mode is not None and mode not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, not {mode!r}")
        self.mode = mode
        self.device = torch.device(device)
        self.scaler = torch.amp.GradScaler(self.device.type) if mode == "fp16" else None
        trained = [p for p in params if p.requires_grad]
        self._update = _Update(trained) if self.scaler is not None and trained else None

    def autocast(self):
        """The autocast context of the forward pass (nothing in float32 mode)."""
        if self.mode is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AMP_MODES[self.mode])

    @property
    def scale(self) -> float:
        """The current fp16 loss scale (1 without scaling)."""
        return float(self.scaler.get_scale()) if self._update is not None else 1.0

    def state(self) -> Optional[dict]:
        """The fp16 loss scale and its growth tracker, for a snapshot (None without scaling)."""
        if self._update is None:
            return None
        state = self.scaler.state_dict()
        return dict(scale=float(state["scale"]), growth_tracker=int(state["_growth_tracker"]))

    def load_state(self, state: Optional[dict]) -> None:
        """Continue from a snapshot's :meth:`state` (nothing to do without scaling or state)."""
        if self._update is None or not state:
            return
        self.scaler.load_state_dict(dict(self.scaler.state_dict(), scale=float(state["scale"]),
                                         _growth_tracker=int(state["growth_tracker"])))

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self._update is not None else loss).backward()

    def unscale(self) -> None:
        """Divide the accumulated (and averaged) gradients by the loss scale."""
        if self._update is not None:
            self.scaler.unscale_(self._update)

    def skips_overflow(self) -> bool:
        """Whether a non-finite gradient (with a finite loss) is GradScaler's normal skipped
        step: fp16 scaling with the scale still at least 1."""
        return self._update is not None and self.scale >= 1.0

    def skip(self) -> None:
        """Skip this update (the gradients overflowed) and halve the scale."""
        self.scaler.step(self._update)
        self.scaler.update()

    def step(self, apply: Callable):
        """Run ``apply`` (the update; its result is returned) and let the scale grow."""
        if self._update is None:
            return apply()
        self._update.apply = apply
        result = self.scaler.step(self._update)
        self.scaler.update()
        return result
