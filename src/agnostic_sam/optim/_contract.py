"""The parts of torch's optimizer contract that a wrapper around a base optimizer must keep by
hand: step hooks that fire once per step, state-dict hooks, copies (``copy.deepcopy``,
``pickle``), `torch.amp.GradScaler`'s two protocols, and wrappers that skip a closure step.

torch only, like the rest of `optim`: frameworks are recognized by what their objects hold
(accelerate's ``AcceleratedOptimizer`` holds ``.optimizer`` and ``.gradient_state``), never
imported.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "GRAD_SCALER_SETS_ATTRIBUTES",
    "check_not_skipped_by_wrapper",
    "driving_grad_scaler",
    "hooks_once_per_step",
    "prefer_foreach",
    "run_load_state_dict_hooks",
    "run_state_dict_hooks",
    "step_signature",
    "without_global_step_hooks",
]

# torch's GradScaler calls `step` of an optimizer with `_step_supports_amp_scaling` in one of two
# ways: passing itself as ``grad_scaler=`` (with a FutureWarning since torch 2.x, when step has
# that keyword), or setting ``opt.grad_scale`` / ``opt.found_inf`` before the call (the announced
# contract). True when the installed torch implements the second.
GRAD_SCALER_SETS_ATTRIBUTES = "found_inf" in torch.amp.GradScaler.step.__code__.co_names

# How far up the stack a caller of `step` is looked for: torch's hook wrapper, no_grad, our
# context managers and at most one framework wrapper (accelerate's patched step) lie between.
_DEPTH = 16
_PACKAGE = __file__.rsplit("optim", 1)[0]  # .../agnostic_sam/


def step_signature(step: Callable[..., Any]) -> None:
    """Make `step` show no ``grad_scaler`` keyword where the installed GradScaler sets
    attributes: GradScaler picks its protocol by that signature, and the keyword one prints a
    FutureWarning on every step. The keyword still works when a caller passes it."""
    if not GRAD_SCALER_SETS_ATTRIBUTES:
        return
    sig = inspect.signature(step)
    if "grad_scaler" in sig.parameters:
        params = [p for p in sig.parameters.values() if p.name != "grad_scaler"]
        step.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]


def _step_callers(depth: int = _DEPTH) -> Any:
    """The frames of functions named ``step`` among the `depth` callers above the caller's
    caller, outside this package (our own step calls itself ``step`` too)."""
    frame: Any = sys._getframe(2)  # a frame, None past the outermost
    for _ in range(depth):
        if frame is None:
            return
        code = frame.f_code
        if code.co_name == "step" and not code.co_filename.startswith(_PACKAGE):
            yield frame
        frame = frame.f_back


def driving_grad_scaler(opt: torch.optim.Optimizer) -> Any:
    """The `torch.amp.GradScaler` whose ``scaler.step(opt, ...)`` set ``opt.grad_scale`` (the
    attribute protocol), found among the callers; None when there is none.

    The step needs the scaler itself, not only the two tensors: every pass is unscaled by its
    scale, and the final gradient goes through ``scaler.unscale_(opt)`` so that
    ``scaler.update()`` sees the inf check of this step's gradients (computed inside the step,
    after GradScaler looked at p.grad)."""
    for frame in _step_callers():
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.amp.GradScaler) and frame.f_locals.get("optimizer") is opt:
            return owner
    return None


def check_not_skipped_by_wrapper(opt: torch.optim.Optimizer) -> None:
    """Refuse a step called through a wrapper that accumulates gradients over micro-batches and
    calls ``step`` on the last one only: accelerate's ``AcceleratedOptimizer`` inside
    ``accelerator.accumulate()``. With a closure, the skipped micro-batches never run, so the
    step would see 1/k of the data. Looked for only once accelerate is imported: walking the
    callers costs microseconds per step."""
    if "accelerate" not in sys.modules:
        return
    for frame in _step_callers():
        owner = frame.f_locals.get("self")
        if owner is opt or getattr(owner, "optimizer", None) is not opt:
            continue
        steps = getattr(getattr(owner, "gradient_state", None), "num_steps", 1)
        if isinstance(steps, int) and steps > 1:
            raise RuntimeError(
                f"accelerate's gradient accumulation ({steps} micro-batches) calls "
                "optimizer.step(closure) on the last micro-batch only, so the other closures "
                "never run: use agnostic_sam.integrations.accelerate.SharpnessStep, which runs "
                "every micro-batch in every pass"
            )
        return


def without_global_step_hooks(base: torch.optim.Optimizer) -> None:
    """Give `base` a step that skips torch's global step hooks
    (``register_optimizer_step_pre_hook`` / ``_post_hook``): they fire for the wrapper's step,
    once per optimizer step. The base optimizer's own per-instance hooks still fire."""
    hooked = type(base).step
    raw = getattr(hooked, "__wrapped__", None)
    if raw is None or not getattr(hooked, "hooked", False):
        return  # not torch's hook wrapper: nothing to skip

    def step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        full = (self, *args)
        for pre_hook in list(self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, full, kwargs)
            if result is not None:
                full, kwargs = result
        out = raw(*full, **kwargs)
        for post_hook in list(self._optimizer_step_post_hooks.values()):
            post_hook(self, full, kwargs)
        return out

    # a bound method, as torch's LR schedulers expect of optimizer.step
    base.step = types.MethodType(step, base)  # type: ignore[method-assign]


def hooks_once_per_step(cls: type) -> None:
    """torch wraps the step of each optimizer class it instantiates with the runner of the step
    hooks. A step that calls its parent class's step (``super().step()``) would run them again
    when the parent class was instantiated too: wrap the runner so that it runs them only in the
    outermost step of an optimizer."""
    hooked = cls.step  # type: ignore[attr-defined]
    if getattr(hooked, "once_per_step", False) or not getattr(hooked, "hooked", False):
        return
    raw = hooked.__wrapped__

    @functools.wraps(hooked)
    def step(opt: Any, *args: Any, **kwargs: Any) -> Any:
        if opt.__dict__.get("_in_step", False):
            return raw(opt, *args, **kwargs)
        opt._in_step = True
        try:
            return hooked(opt, *args, **kwargs)
        finally:
            opt._in_step = False

    step.once_per_step = True  # type: ignore[attr-defined]
    cls.step = step  # type: ignore[attr-defined]


def run_state_dict_hooks(opt: torch.optim.Optimizer, make: Callable[[], dict[str, Any]]) -> Any:
    """``opt.state_dict()`` as torch.optim builds it: pre hooks, the dict, post hooks (each may
    return a replacement)."""
    for pre_hook in list(opt._optimizer_state_dict_pre_hooks.values()):
        pre_hook(opt)
    state = make()
    for post_hook in list(opt._optimizer_state_dict_post_hooks.values()):
        result = post_hook(opt, state)
        if result is not None:
            state = result
    return state


def run_load_state_dict_hooks(
    opt: torch.optim.Optimizer, state: dict[str, Any], load: Callable[[dict[str, Any]], None]
) -> None:
    """``opt.load_state_dict(state)`` as torch.optim runs it: pre hooks on a shallow copy (each
    may return a replacement), the load, post hooks."""
    state = dict(state)
    for pre_hook in list(opt._optimizer_load_state_dict_pre_hooks.values()):
        result = pre_hook(opt, state)
        if result is not None:
            state = result
    load(state)
    for post_hook in list(opt._optimizer_load_state_dict_post_hooks.values()):
        post_hook(opt)


# Base optimizers whose multi-tensor step (foreach=True) gives the same bits as their per-tensor
# loop on the CPU for float32/float64 parameters (tests/test_base_foreach.py checks every one,
# with every option that changes the arithmetic). torch picks the loop on the CPU by default; the
# multi-tensor form runs the same per-tensor kernels, looped in C++: half the time of the base step
# with 242 small tensors. In half precision (momentum, moments) the bits may differ: left alone.
FOREACH_SAME_BITS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
                     torch.optim.Adagrad)
_FOREACH_DTYPES = (torch.float32, torch.float64)


def prefer_foreach(base: torch.optim.Optimizer) -> None:
    """Let `base` take its multi-tensor step in each param group where that gives the same bits:
    a group whose ``foreach`` is None (torch's "choose"; an explicit True/False is kept), of a
    class in `FOREACH_SAME_BITS` (not a subclass: it may change the step), whose parameters are
    dense float32/float64 CPU tensors. Where torch would choose foreach itself (CUDA) nothing
    changes."""
    if type(base) not in FOREACH_SAME_BITS:
        return
    for group in base.param_groups:
        if "foreach" not in group or group["foreach"] is not None:
            continue
        params = group["params"]
        if params and all(p.device.type == "cpu" and p.dtype in _FOREACH_DTYPES
                          and p.layout == torch.strided for p in params):
            group["foreach"] = True
