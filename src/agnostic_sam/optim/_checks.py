"""Misuse checks of the sharpness-aware steps: the constructor's arguments and the radii in the
param groups, gradients present at step entry, the closure's loss (scalar, scaled by the right
scaler), and the GradScaler protocol's order (no `unscale_` before `step`).

Every check raises one line naming the bad value and the fix; none of them synchronizes with the
host. `SharpnessOptimizer` (in `_base.py`) calls them.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim._watch import all_zero

__all__ = [
    "PERTURBATIONS",
    "as_loss",
    "check_dense",
    "check_finite_passes",
    "check_scaled_pass",
    "check_closure_scaling",
    "check_entry_scaler",
    "check_groups",
    "check_options",
    "check_radius",
    "present_gradients",
    "radius_error",
    "run_watching_grad_scalers",
]

Closure = Callable[[], Any]
PERTURBATIONS = ("local", "synced")


def radius_error(name: str, value: Any) -> str | None:
    """The message for an invalid radius (None when `value` is a finite number >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"invalid perturbation radius {name}={value!r}: must be a finite number >= 0"
    if not (math.isfinite(value) and value >= 0.0):
        return f"invalid perturbation radius {name}={value!r}: must be a finite number >= 0"
    return None


def check_radius(name: str, value: Any) -> None:
    message = radius_error(name, value)
    if message is not None:
        raise ValueError(message)


def check_groups(param_groups: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """Radii set in `param_groups` after construction are checked at every step."""
    for i, group in enumerate(param_groups):
        for key in keys:
            message = radius_error(key, group.get(key))
            if message is not None:
                raise ValueError(f"param group {i}: {message}")


def check_options(
    base_optimizer: Any,
    radii: dict[str, Any],
    *,
    perturb_eps: Any,
    max_grad_norm: Any,
    perturbation: Any,
    model: Any,
    loss_scaler: Any,
) -> None:
    """The constructor's arguments of `SharpnessOptimizer`, each with its own error."""
    if not (
        isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)
    ):
        raise TypeError(
            "base_optimizer must be a torch.optim.Optimizer class such as torch.optim.SGD "
            f"(the class, not an instance), got {type(base_optimizer).__name__}"
        )
    for key, value in radii.items():
        check_radius(key, value)
    if (
        isinstance(perturb_eps, bool)
        or not isinstance(perturb_eps, (int, float))
        or not perturb_eps > 0.0
    ):
        raise ValueError(f"invalid perturb_eps={perturb_eps!r}: must be > 0")
    if max_grad_norm is not None and (
        isinstance(max_grad_norm, bool)
        or not isinstance(max_grad_norm, (int, float))
        or not (math.isfinite(max_grad_norm) and max_grad_norm > 0.0)
    ):
        raise ValueError(
            f"invalid max_grad_norm={max_grad_norm!r}: must be None or a finite number > 0"
        )
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"invalid perturbation={perturbation!r}: expected one of {PERTURBATIONS}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
    if loss_scaler is not None and not isinstance(loss_scaler, LossScaler):
        raise TypeError(
            f"loss_scaler must be an agnostic_sam.LossScaler, got {type(loss_scaler).__name__}"
        )


def check_entry_scaler(opt: Any, grad_scaler: Any) -> None:
    """At step entry: the GradScaler (if any) drives this step (by the protocol's keyword, or
    found by `_contract.driving_grad_scaler` under the attribute protocol), the optimizer has no
    second scaler, and `scaler.unscale_(opt)` was not called before."""
    if grad_scaler is None and "grad_scale" in opt.__dict__:
        # opt.grad_scale without a GradScaler.step driving this step: the step could not feed
        # its inf checks to any scaler.update(). The attributes go now (GradScaler deletes them
        # only after a step that returns).
        opt.__dict__.pop("grad_scale", None)
        opt.__dict__.pop("found_inf", None)
        raise RuntimeError(
            "opt.grad_scale is set but no scaler.step(opt, closure) call of a "
            "torch.amp.GradScaler drives this step: call scaler.step(opt, closure), "
            "or use loss_scaler=LossScaler()"
        )
    if grad_scaler is None:
        return
    if opt.loss_scaler is not None:
        raise ValueError(
            "a torch.amp.GradScaler drives this step but the optimizer also has "
            "loss_scaler=: use one of them (drop loss_scaler= or call opt.step(closure))"
        )
    from torch.amp.grad_scaler import OptState

    state = getattr(grad_scaler, "_per_optimizer_states", {}).get(id(opt))
    if state is not None and state.get("stage") is OptState.UNSCALED:
        raise RuntimeError(
            "scaler.unscale_(opt) was called before scaler.step(opt, closure): the "
            "optimizer unscales every pass itself; remove it (clip with max_grad_norm=)"
        )


def present_gradients(opt: Any, params: list[Tensor]) -> int:
    """The number of backward passes summed into the gradients found in p.grad at step entry
    (0: none), as counted by `opt._watch`. Zeros count as none: those left by the optimizer's own
    `zero_grad(set_to_none=False)`, and those of the model's or another optimizer's, seen as a
    change in place after the last backward pass and confirmed zero by one host sync (only on
    that path)."""
    present = [p for p in params if p.grad is not None]
    if not present:
        return 0
    passes = opt._watch.passes()
    name = type(opt).__name__
    if passes == 0 and opt._grads_zeroed:
        for p in present:
            p.grad = None
        return 0
    if passes > 0 and not opt._watch.untouched() and all_zero(
            cast(list[Tensor], [p.grad for p in present])):  # present: with a gradient
        for p in present:  # zero_grad(set_to_none=False) after the backward: no gradient
            p.grad = None
        return 0
    if passes == 0:
        raise RuntimeError(
            f"{name} found gradients in p.grad at step entry that no backward pass since its "
            "last step produced (left over or set by hand): call opt.zero_grad() first"
        )
    scaler = opt.loss_scaler
    if scaler is not None and scaler.calls - opt._scale_calls < passes:
        raise RuntimeError(
            f"{name} has loss_scaler= but the gradients in p.grad at step entry were not "
            "scaled: call opt.backward(loss) instead of loss.backward()"
        )
    return passes


def as_loss(loss: Any) -> Tensor:
    """The closure's return value as a detached 0-d tensor."""
    if loss is None:
        raise TypeError("the closure must return the loss (a tensor) after calling backward")
    loss = torch.as_tensor(loss).detach()
    if loss.numel() != 1:
        raise ValueError(
            "the closure must return a scalar loss, "
            f"got a tensor of shape {tuple(loss.shape)}: "
            "reduce it (e.g. loss.mean()) before backward and return that"
        )
    return loss if loss.dim() == 0 else loss.reshape(())


def run_watching_grad_scalers(closure: Closure) -> tuple[Any, list[Any]]:
    """Run `closure`, returning its result and the enabled `torch.amp.GradScaler`s whose `scale`
    it called. Uses a profile hook, so it is run once, on one pass, not on every step."""
    target = torch.amp.GradScaler.scale.__code__
    seen: list[Any] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is target:
            scaler = frame.f_locals.get("self")
            if getattr(scaler, "_enabled", False):
                seen.append(scaler)

    sys.setprofile(profile)
    try:
        result = closure()
    finally:
        sys.setprofile(None)
    return result, seen


def check_closure_scaling(grad_scaler: Any, scalers: list[Any]) -> None:
    """After a watched pass: the closure scaled its loss with the GradScaler driving the step
    (`grad_scaler`, None when the step was called directly), and only then."""
    if grad_scaler is not None and not any(s is grad_scaler for s in scalers):
        raise RuntimeError(
            "scaler.step(opt, closure) drives this step but the closure did not scale its "
            "loss: call scaler.scale(loss).backward() in the closure"
        )
    if grad_scaler is None and scalers:
        raise RuntimeError(
            "the closure scaled its loss with a torch.amp.GradScaler but the step was "
            "called directly: call scaler.step(opt, closure), then scaler.update()"
        )


def check_scaled_pass(loss_scaler: LossScaler, calls_before: int) -> None:
    """With ``loss_scaler=``: the closure of the pass just run called `opt.backward(loss)`."""
    if loss_scaler.calls == calls_before:
        raise RuntimeError(
            "the optimizer has loss_scaler= but the closure did not scale its loss: call "
            "opt.backward(loss) instead of loss.backward()"
        )


def check_dense(name: str, grads: list[Tensor | None]) -> None:
    """For optimizers whose arithmetic needs dense gradients (a dot product, two kept buffers)."""
    for i, g in enumerate(grads):
        if g is not None and g.is_sparse:
            raise ValueError(
                f"{name} does not support sparse gradients (parameter {i} has one): use dense "
                "gradients (e.g. nn.Embedding(sparse=False)) or SAM"
            )


def check_finite_passes(flags: list[float], pass_names: tuple[str, ...]) -> None:
    """`flags[i]` is 1.0 when pass i's gradient norm was inf/NaN (read by the one host sync)."""
    if any(flags):
        name = pass_names[next(i for i, f in enumerate(flags) if f)]
        raise FloatingPointError(
            f"non-finite gradient in the pass {name}; the step was skipped, parameters are "
            f"back at theta and the base optimizer's state is untouched"
        )
