"""Friendly-SAM (Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024).

Also home of two pieces its siblings with state or a kept gradient (VaSSO, WSAM) share:
`ascend_from_theta` (the ascent written into the parameters, which serve as scratch while theta
is kept) and `after_base_step` (state that changes only when the base optimizer really steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import _functional as F
from agnostic_sam.optim._base import Closure, SharpnessOptimizer
from agnostic_sam.optim._settings import Setting

__all__ = ["AveragedAscent", "FriendlySAM", "after_base_step", "ascend_from_theta", "keep_state"]

_M = "fsam_m"  # the moving average m, per parameter, in the base optimizer's state


def ascend_from_theta(
    params: list[Tensor],
    theta: list[Tensor],
    groups: list[dict[str, Any]],
    idx: list[int],
    denom: Tensor,
    foreach: bool,
) -> None:
    """params[i] <- theta[i] + rho_group params[i] / denom, for i in `idx`.

    The parameters hold the ascent direction v on entry (theta is kept in `theta` and restored
    from it bit for bit), so e = rho v / (||v|| + eps) needs no parameter-sized temporary.
    The arithmetic is SAM's (e = v * (rho / denom), then theta + e), so equal directions give
    equal perturbed weights. `denom` is the 0-d ||v|| + eps.
    """
    by_group: dict[int, tuple[dict[str, Any], list[int]]] = {}
    for i in idx:
        by_group.setdefault(id(groups[i]), (groups[i], []))[1].append(i)
    for group, members in by_group.values():
        ps = [params[i] for i in members]
        F.scale_(ps, group["rho"] / denom, foreach)
        F.add_(ps, [theta[i] for i in members], foreach)


@contextlib.contextmanager
def after_base_step(opt: SharpnessOptimizer, action: Callable[[], None]) -> Iterator[None]:
    """Inside the block, `action()` runs right after the base optimizer's step, and only if it
    steps: a step skipped for an overflow (loss scaling) or refused for a non-finite gradient
    leaves the method's state as it was, as it leaves the base optimizer's."""
    handle = opt.base_optimizer.register_step_post_hook(lambda *_: action())
    try:
        yield
    finally:
        handle.remove()


def keep_state(opt: SharpnessOptimizer, params: list[Tensor], values: list[Tensor | None],
               key: str) -> None:
    """opt.state[p][key] = value for the parameters the base optimizer just stepped (p.grad
    set); a parameter it skipped keeps its old value (and Adam's lazy state init still sees an
    empty state for it)."""
    for p, value in zip(params, values):
        if value is not None and p.grad is not None:
            opt.state[p][key] = value


class AveragedAscent(SharpnessOptimizer):
    """The step of the methods that ascend along a direction kept across steps (Friendly-SAM's
    g - sigma m, VaSSO's d): pass 1 at theta, `_ascend` (the method's direction, turning each
    kept g into the new state in place), the last pass at theta + e, then the base step; the
    new state is committed to ``self.state[p][_state_key]`` only if the base optimizer steps."""

    _state_key = ""  # the per-parameter state key of the kept direction
    _radius_keys = ("rho",)
    _sync_every_pass = True  # under DDP: its direction / state uses pass 1's gradient
    _num_buffers = 2
    _pass_names = ("at theta", "at theta + e")

    def _ascend(self, params: list[Tensor], grads: list[Tensor | None], theta: list[Tensor],
                groups: list[dict[str, Any]], foreach: bool) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, grad_scaler: Any = None) -> Tensor:  # type: ignore[override]
        """One step; returns the loss at theta, detached."""
        name = type(self).__name__
        if not callable(closure):
            raise TypeError(f"{name}.step(closure) needs a closure that runs forward and "
                            "backward on the mini-batch and returns the loss")
        with self._stepping(grad_scaler):
            params, groups = self._params()
            foreach = self._use_foreach(params)
            if self._present_gradients(params):
                raise RuntimeError(f"{name} found gradients in p.grad at step entry: call "
                                   "opt.zero_grad() before, and backward only inside the closure")
            loss = self._run(closure, params, at_theta=True, final=False)
            theta = self._snapshot(params, foreach)
            grads = self._grads(params, foreach, take=True)
            grad_norm = self._norm(grads, theta, foreach)
            check = [grad_norm]
            with self._restore_on_error(params, theta, foreach):
                self._ascend(params, grads, theta, groups, foreach)
                self._final_pass(closure, params, check, foreach)
            self.stats = {"loss_train": loss, "grad_norm_train": grad_norm}
            with after_base_step(self, lambda: keep_state(self, params, grads, self._state_key)):
                self._finish(params, theta, check, self._pass_names, foreach)
        return loss


class FriendlySAM(AveragedAscent):
    r"""Friendly-SAM, wrapping any `torch.optim` optimizer.

    Each step runs the closure twice on the same mini-batch B, with g(.) = grad L_B(.) and m the
    moving average of past gradients (per parameter, ``state[p]["fsam_m"]``):

    1. at theta:      g = g(theta)
                      d = g - sigma m,     then  m <- lmbda m + (1 - lmbda) g
                      (on a parameter's first step d = g and m = g)
    2. at theta + e:  e = rho d / (||d|| + eps)

    then restores theta bit for bit and lets the base optimizer step with g(theta + e).
    Subtracting sigma m removes the full-batch gradient component from the ascent, so e follows
    the batch-specific noise (the paper's "friendly" adversarial direction). m takes the raw g,
    as the authors' code does. m changes only when the base optimizer steps (a step skipped by
    loss scaling or refused for a non-finite gradient leaves it), so it travels in
    ``state_dict()`` with the base optimizer's state.

    ``rho`` lives in the param groups; ``sigma`` and ``lmbda`` are optimizer-wide, as in the
    authors' code. ``model``, ``perturbation``, ``loss_scaler``, ``check_finite``,
    ``perturb_eps``, ``perturb_foreach`` and ``max_grad_norm`` act as in `SAM`.
    ``opt.stats["grad_norm_train"]`` is ||g(theta)||. Two parameter-sized buffers live during a
    step: theta and g (which becomes the new m).
    """

    SETTINGS = (
        Setting("rho", float, 0.05, "radius of the ascent step", low=0.0,
                grid=(0.05, 0.1, 0.2, 0.4), per_group=True),
        Setting("sigma", float, 1.0, "weight of the moving average subtracted from g", low=0.0),
        Setting("lmbda", float, 0.9, "decay of the moving average of gradients", low=0.0,
                high=1.0),
    )
    _state_key = _M

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        perturb_eps: float = 1e-12,
        model: nn.Module | None = None,
        perturbation: str = "local",
        loss_scaler: LossScaler | None = None,
        check_finite: bool = True,
        perturb_foreach: bool | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.sigma = self.SETTINGS[1].check(sigma)
        self.lmbda = self.SETTINGS[2].check(lmbda)
        super().__init__(
            params, base_optimizer, {"rho": rho}, adaptive=False, perturb_eps=perturb_eps,
            model=model, perturbation=perturbation, loss_scaler=loss_scaler,
            check_finite=check_finite, perturb_foreach=perturb_foreach,
            max_grad_norm=max_grad_norm, base_kwargs=base_kwargs,
        )

    def _ascend(self, params: list[Tensor], grads: list[Tensor | None], theta: list[Tensor],
                groups: list[dict[str, Any]], foreach: bool) -> None:
        """Move to theta + rho d / (||d|| + eps) with d = g - sigma m, then turn each kept g into
        the new m in place (committed to the state only if the base optimizer steps)."""
        idx = [i for i, g in enumerate(grads) if g is not None]
        if not idx:
            return
        # The old m of the parameters that have one (.get: no empty state entry is created).
        old = {i: self.state.get(params[i], {}).get(_M) for i in idx}
        with_m = [i for i in idx if old[i] is not None]
        ps = [params[i] for i in idx]
        present = cast(list[Tensor], [grads[i] for i in idx])  # idx: those with a gradient
        F.copy_(ps, present, foreach)  # the parameters hold d from here on
        ms = [old[i] for i in with_m]
        _axpy_(ms, [params[i] for i in with_m], -self.sigma, 1.0, foreach)  # d = g - sigma m
        ascend_from_theta(params, theta, groups, idx, F.global_norm(ps, foreach)
                          + self.perturb_eps, foreach)
        # m_new = lmbda m + (1 - lmbda) g, written over g (a first step keeps m_new = g).
        _axpy_(ms, cast(list[Tensor], [grads[i] for i in with_m]), self.lmbda, 1.0 - self.lmbda,
               foreach)


def _axpy_(xs: list[Tensor], ys: list[Tensor], a: float, b: float, foreach: bool) -> None:
    """ys <- b ys + a xs, in place (b = 1 skips the multiply)."""
    if not xs:
        return
    if foreach:
        if b != 1.0:
            torch._foreach_mul_(ys, b)
        torch._foreach_add_(ys, xs, alpha=a)
    else:
        for x, y in zip(xs, ys):
            if b != 1.0:
                y.mul_(b)
            y.add_(x, alpha=a)
