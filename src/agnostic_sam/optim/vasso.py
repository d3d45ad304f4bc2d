"""VaSSO (Li & Giannakis, "Enhancing Sharpness-Aware Optimization Through Variance
Suppression", NeurIPS 2023)."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import _functional as F
from agnostic_sam.optim._settings import Setting
from agnostic_sam.optim.friendly_sam import AveragedAscent, ascend_from_theta

__all__ = ["VaSSO"]

_D = "vasso_d"  # the averaged ascent direction d, per parameter, in the base optimizer's state


class VaSSO(AveragedAscent):
    r"""Variance-suppressed sharpness-aware optimization, wrapping any `torch.optim` optimizer.

    Each step runs the closure twice on the same mini-batch B, with g(.) = grad L_B(.) and d an
    exponential average of past gradients (per parameter, ``state[p]["vasso_d"]``):

    1. at theta:      g = g(theta)
                      d <- (1 - theta) d + theta g      (d = g on a parameter's first
                      step)
    2. at theta + e:  e = rho d / (||d|| + eps)

    then restores theta bit for bit and lets the base optimizer step with g(theta + e). Averaging
    suppresses the variance of the stochastic ascent direction, so e tracks the full-batch
    adversarial direction more stably than SAM's g / ||g|| (theta = 1 is SAM). d changes only
    when the base optimizer steps (a step skipped by loss scaling or refused for a non-finite
    gradient leaves it), and travels in ``state_dict()`` with the base optimizer's state.

    ``rho`` lives in the param groups; ``theta`` is optimizer-wide, as in the authors' code.
    ``model``, ``perturbation``, ``loss_scaler``, ``check_finite``, ``perturb_eps``,
    ``perturb_foreach`` and ``max_grad_norm`` act as in `SAM`. ``opt.stats["grad_norm_train"]``
    is ||g(theta)||. Two parameter-sized buffers live during a step: theta and g (which becomes
    the new d).
    """

    SETTINGS = (
        Setting("rho", float, 0.05, "radius of the ascent step", low=0.0,
                grid=(0.05, 0.1, 0.2, 0.4), per_group=True),
        Setting("theta", float, 0.9, "weight of the new gradient in the averaged direction d "
                "(1: SAM)", low=0.0, high=1.0),
    )
    _state_key = _D

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        theta: float = 0.9,
        perturb_eps: float = 1e-12,
        model: nn.Module | None = None,
        perturbation: str = "local",
        loss_scaler: LossScaler | None = None,
        check_finite: bool = True,
        perturb_foreach: bool | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.theta = self.SETTINGS[1].check(theta)
        super().__init__(
            params, base_optimizer, {"rho": rho}, adaptive=False, perturb_eps=perturb_eps,
            model=model, perturbation=perturbation, loss_scaler=loss_scaler,
            check_finite=check_finite, perturb_foreach=perturb_foreach,
            max_grad_norm=max_grad_norm, base_kwargs=base_kwargs,
        )

    def _ascend(self, params: list[Tensor], grads: list[Tensor | None], theta: list[Tensor],
                groups: list[dict[str, Any]], foreach: bool) -> None:
        """Turn each kept g into the new d in place (committed to the state only if the base
        optimizer steps), then move to theta + rho d / (||d|| + eps)."""
        idx = [i for i, g in enumerate(grads) if g is not None]
        if not idx:
            return
        old = {i: self.state.get(params[i], {}).get(_D) for i in idx}  # .get: no empty entry
        with_d = [i for i in idx if old[i] is not None]
        new = cast(list[Tensor], [grads[i] for i in with_d])  # with_d: those with a gradient
        prev = [old[i] for i in with_d]
        if new:  # d_new = theta g + (1 - theta) d, written over g
            if foreach:
                torch._foreach_mul_(new, self.theta)
                torch._foreach_add_(new, prev, alpha=1.0 - self.theta)
            else:
                for g, d in zip(new, prev):
                    g.mul_(self.theta).add_(d, alpha=1.0 - self.theta)
        ps = [params[i] for i in idx]
        F.copy_(ps, cast(list[Tensor], [grads[i] for i in idx]), foreach)  # now d (theta kept)
        ascend_from_theta(params, theta, groups, idx, F.global_norm(ps, foreach)
                          + self.perturb_eps, foreach)
