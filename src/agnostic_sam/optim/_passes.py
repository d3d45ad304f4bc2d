"""One closure pass of a sharpness-aware step: p.grad emptied, the closure run with grad enabled,
BatchNorm running statistics moved only at theta, DDP communication only where the perturbation
mode says, and the closure's loss scaling checked.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from agnostic_sam.optim import _checks
from agnostic_sam.optim._checks import Closure

__all__ = ["batchnorm_layers", "frozen_batchnorm", "run_pass", "sync_context"]


@contextlib.contextmanager
def frozen_batchnorm(layers: list[_BatchNorm]) -> Iterator[None]:
    """The BatchNorm `layers` leave their running statistics alone inside the block (they
    normalize with batch statistics as usual); every setting is restored, even on error."""
    saved = [(m, m.track_running_stats) for m in layers]
    try:
        for m, _ in saved:
            m.track_running_stats = False
        yield
    finally:
        for m, value in saved:
            m.track_running_stats = value


def batchnorm_layers(layout: Any, model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of `model`, looked up once per parameter structure (`layout`)."""
    if layout.batchnorms is None or layout.batchnorms[0] is not model:
        layout.batchnorms = (model, [m for m in model.modules() if isinstance(m, _BatchNorm)])
    return layout.batchnorms[1]


def sync_context(model: nn.Module | None, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's no_sync() for a pass that must not communicate."""
    if sync or model is None or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return cast(Any, model).no_sync()  # DDP's


def run_pass(opt: Any, closure: Closure, params: list[Tensor], *, at_theta: bool, final: bool,
             keep: bool) -> Tensor:
    """`SharpnessOptimizer._run`: the pass, its checks, its loss as a detached 0-d tensor."""
    if not keep:
        for p in params:
            p.grad = None
    # A method whose step direction or cross-step state uses an earlier pass's gradient
    # (`_sync_every_pass`) all-reduces every pass: each rank must hold the same.
    sync = final or opt.perturbation == "synced" or opt._sync_every_pass
    calls = opt.loss_scaler.calls if opt.loss_scaler is not None else 0
    driven = opt._grad_scaler is not None
    # In one step (and again when GradScaler use changes): does every closure scale its loss
    # with the GradScaler that drives the step, and only then? Skipped under another profiler.
    watch = opt.loss_scaler is None and opt._checked_driven is not driven and (
        sys.getprofile() is None)
    opt.at_theta = at_theta
    try:
        with (
            opt._frozen_batchnorm(not at_theta),
            opt._sync_context(sync),
            torch.enable_grad(),
        ):
            if watch:
                loss, scalers = _checks.run_watching_grad_scalers(closure)
            else:
                loss = closure()
    finally:
        opt.at_theta = False
    if watch:
        _checks.check_closure_scaling(opt._grad_scaler, scalers)
    if opt.loss_scaler is not None:
        _checks.check_scaled_pass(opt.loss_scaler, calls)
    return opt._as_loss(loss)
