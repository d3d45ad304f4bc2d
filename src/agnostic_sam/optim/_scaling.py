"""Loss scaling inside a multi-pass step: the reciprocal scale every pass's gradient is
unscaled by, the final gradient handed to a `torch.amp.GradScaler`'s `unscale_` (so that its
inf check covers every pass), and the skip-or-step decision with its one host sync.

Two scalers are supported: `agnostic_sam.LossScaler` (``loss_scaler=``; the optimizer unscales
and calls its `update`) and `torch.amp.GradScaler` driving ``scaler.step(opt, closure)`` (the
optimizer unscales the intermediate passes itself, the scaler the final one).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import _checks, _flat

__all__ = [
    "final_gradients",
    "gradients",
    "inv_scale",
    "step_or_skip",
    "step_unless_overflow",
    "unscale_final",
]


def inv_scale(
    loss_scaler: LossScaler | None, grad_scaler: Any, dtype: torch.dtype
) -> Tensor | None:
    """1 / loss scale for this step (float64 reciprocal, then cast), None without scaling."""
    if loss_scaler is not None:
        return loss_scaler.inv_scale(dtype)
    if grad_scaler is not None:
        return grad_scaler._scale.double().reciprocal().to(dtype)
    return None


def unscale_final(opt: Any, grad_scaler: Any, params: list[Tensor], check: list[Tensor]) -> None:
    """Hand the final gradients in p.grad to `grad_scaler.unscale_(opt)`, which unscales them
    and records its inf check for `scaler.update()`.

    A non-finite earlier pass (a norm in `check`) must reach the scaler's found_inf too, so that
    scaler.update() lowers the scale: it poisons the final gradient with NaN (the step is
    skipped anyway), on the device, without a host sync.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if check and grads:
        bad = ~torch.isfinite(torch.stack(check)).all()
        grads[0].mul_(torch.where(bad, float("nan"), 1.0).to(grads[0].device))
    grad_scaler.unscale_(opt)


def step_unless_overflow(
    base_optimizer: torch.optim.Optimizer,
    loss_scaler: LossScaler | None,
    bad: Tensor,
    stats: dict[str, Tensor],
) -> None:
    """With loss scaling: `bad` holds 1.0 per pass whose gradient norm was inf/NaN. Updates the
    `LossScaler` (a GradScaler lowers its scale in scaler.update(), from what unscale_
    recorded), sets ``stats["skipped"]`` and steps the base optimizer unless a pass overflowed.
    """
    found_inf = bad.amax() > 0
    if loss_scaler is not None:
        loss_scaler.update(found_inf)
    stats["skipped"] = found_inf.to(torch.float32)
    if not bool(found_inf):  # the one sync: GradScaler makes the same one
        base_optimizer.step()


def final_gradients(
    opt: Any, params: list[Tensor], check: list[Tensor], foreach: bool, *, want_norm: bool
) -> Tensor | None:
    """Make p.grad the gradient the base optimizer steps with: unscaled (by a GradScaler's
    `unscale_`, which records its inf check for `scaler.update()`), its norm appended to
    `check`, then clipped to `opt.max_grad_norm`. Returns the norm before clipping, if computed.
    """
    norm = None
    if opt._grad_scaler is not None:
        unscale_final(opt, opt._grad_scaler, params, check)
    elif opt.loss_scaler is not None:
        opt._grads(params, foreach, take=False)  # unscales p.grad in place
    # A method whose step direction is not the last pass's gradient (GSAM, WSAM, ...) makes it
    # from the unscaled p.grad here, so the norm check and clipping act on what is stepped with.
    opt._transform_final(params, foreach)
    if want_norm or opt.check_finite or opt._scaled:
        # one read of p.grad each (a getter, not free); marked for the fast path when every
        # parameter has one, else the present ones
        final = _flat.checked(opt._layout(), params, [p.grad for p in params])
        if not isinstance(final, _flat.Checked):
            final = [g for g in final if g is not None]
        norm = opt._global_norm(final, foreach) if final else opt._zero_like_norm(params)
        if opt.check_finite or opt._scaled:
            check.append(norm)
    if opt.max_grad_norm is not None:
        with_grad = [p for p in params if p.grad is not None]
        if with_grad:
            torch.nn.utils.clip_grad_norm_(with_grad, opt.max_grad_norm)
    return norm


def step_or_skip(
    opt: Any, params: list[Tensor], check: list[Tensor], pass_names: tuple[str, ...]
) -> None:
    """Step `opt.base_optimizer` unless a pass's gradient norm in `check` is non-finite: with
    loss scaling the step is skipped (``stats["skipped"]`` = 1), else FloatingPointError names
    the pass. Exactly one host sync reads every norm (none when check_finite=False and there is
    no loss scaling)."""
    device = check[0].device if check else opt._zero_like_norm(params).device
    if not opt._scaled and not opt.check_finite:
        opt.stats["skipped"] = torch.zeros((), device=device)
        opt.base_optimizer.step()
        return
    # Under DDP with local perturbations the ranks agree on a non-finite pass: a non-finite
    # ascent gradient on one rank makes its perturbed weights, hence its final gradient,
    # non-finite, and the all-reduce spreads that.
    norms = torch.stack(check)
    if opt._scaled:  # 1.0 where a pass's gradient norm is inf/NaN, on the device
        bad = (~torch.isfinite(norms)).to(torch.float32)
        step_unless_overflow(opt.base_optimizer, opt.loss_scaler, bad, opt.stats)
        return
    opt.stats["skipped"] = torch.zeros((), device=device)
    flags = [0.0 if math.isfinite(v) else 1.0 for v in norms.tolist()]  # the one sync
    _checks.check_finite_passes(flags, pass_names)
    opt.base_optimizer.step()


def gradients(opt: Any, params: list[Tensor], foreach: bool, *, take: bool) -> list[Any]:
    """`SharpnessOptimizer._grads`: the gradients of `params` (None where there is none),
    unscaled in place when loss scaling is on; with `take`, detached from their parameters (the
    next pass writes fresh ones; the list is a buffer, not a copy)."""
    grads: list[Tensor | None] = [p.grad for p in params]
    if not opt._supports_sparse:
        _checks.check_dense(type(opt).__name__, grads)
    if take:
        alias = bool(getattr(opt.model, "gradient_as_bucket_view", False))
        for p in params:
            p.grad = None
        if alias:  # DDP would overwrite bucket views in the next pass
            grads = [g.clone() if g is not None else None for g in grads]
    present = [g for g in grads if g is not None] if opt._scaled else []
    if present:
        scale = opt._inv_scale(present[0].dtype)
        if foreach:
            torch._foreach_mul_(present, scale)
        else:
            for g in present:
                g.mul_(scale)
    return _flat.checked(opt._layout(), params, grads)
