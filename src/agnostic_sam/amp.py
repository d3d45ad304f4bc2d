"""Dynamic loss scaling for float16 that fits a multi-pass sharpness-aware step.

`torch.amp.GradScaler` assumes one backward pass and one `optimizer.step()`: its `unscale_` may be
called once per step and its inf check covers one set of gradients. SAM-family steps run two to
four backward passes whose gradients are each normalized (so each must be unscaled first), and a
non-finite value in any of them must skip the whole step. `LossScaler` keeps GradScaler's
schedule (grow by `growth_factor` after `growth_interval` clean steps, shrink by `backoff_factor`
on overflow) while leaving unscaling and the skip decision to the optimizer::

    scaler = LossScaler(device="cuda")
    opt = AgnosticSAM(model.parameters(), torch.optim.SGD, lr=0.1, loss_scaler=scaler)

    def closure(x, y):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = criterion(model(x), y)
        opt.backward(loss)  # = scaler.scale(loss).backward()
        return loss

    opt.step(lambda: closure(x_t, y_t), lambda: closure(x_v, y_v))
    opt.stats["skipped"]  # 1 when the step was skipped for non-finite gradients

The scale and the growth counter live on the device; `update` changes them without a host sync.
The optimizer's `state_dict()` carries `LossScaler.state_dict()` under the key ``"loss_scaler"``.

`torch.amp.GradScaler` works too, the standard way (``scaler.step(opt, closure)`` with closures
calling ``scaler.scale(loss).backward()``, then ``scaler.update()``): the optimizers take part in
its ``_step_supports_amp_scaling`` protocol and give the same steps as `LossScaler`. Of its two
forms they follow the installed torch's: GradScaler setting ``opt.grad_scale`` /
``opt.found_inf`` before ``step`` (no FutureWarning; the step finds the scaler that drives it),
or, in older releases, passing ``grad_scaler=`` to ``step``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["LossScaler"]


class LossScaler:
    """Dynamic loss scale: `scale(loss)` multiplies, the optimizer unscales and calls `update`."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        device: torch.device | str | None = None,
    ) -> None:
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale}")
        if growth_factor <= 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._scale = torch.full((), float(init_scale), dtype=torch.float32, device=device)
        # Clean steps since the last change of scale.
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        # Number of `scale` calls so far: the optimizer checks that every pass made one, so a
        # closure calling `loss.backward()` instead of `opt.backward(loss)` is caught.
        self.calls = 0

    def _to(self, device: torch.device) -> None:
        if self._scale.device != device:
            self._scale = self._scale.to(device)
            self._growth_tracker = self._growth_tracker.to(device)

    def scale(self, loss: Tensor) -> Tensor:
        """`loss * scale`, for `.backward()`; the scale follows the loss to its device."""
        self._to(loss.device)
        self.calls += 1
        return loss * self._scale.to(loss.dtype)

    def inv_scale(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """1 / scale as a 0-d tensor on the scale's device (computed in float64, then cast)."""
        return self._scale.double().reciprocal().to(dtype)

    def update(self, found_inf: Tensor) -> None:
        """Shrink the scale after an overflow, grow it after `growth_interval` clean steps."""
        found = found_inf.to(device=self._scale.device, dtype=torch.bool)
        tracker = torch.where(
            found, torch.zeros_like(self._growth_tracker), self._growth_tracker + 1
        )
        grow = tracker >= self.growth_interval
        # Arithmetic with Python floats instead of torch.tensor(...) constants: no host-to-device
        # copy, so no sync. factor = backoff on overflow, growth after the interval, else 1.
        factor = (
            1.0
            + found.to(torch.float32) * (self.backoff_factor - 1.0)
            + grow.to(torch.float32) * (self.growth_factor - 1.0)
        )
        self._scale.mul_(factor)
        self._growth_tracker.copy_(torch.where(grow, torch.zeros_like(tracker), tracker))

    def get_scale(self) -> float:
        """The current scale as a Python float (a host sync: for logging, not inside a step)."""
        return float(self._scale)

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": float(self._scale),
            "growth_tracker": int(self._growth_tracker),
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scale.fill_(float(state["scale"]))
        self._growth_tracker.fill_(int(state["growth_tracker"]))
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
