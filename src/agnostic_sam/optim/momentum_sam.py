"""Momentum-SAM (Becker et al., "Momentum-SAM: Sharpness Aware Minimization without Computational
Overhead", 2024)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import _functional as F
from agnostic_sam.optim._base import Closure, SharpnessOptimizer
from agnostic_sam.optim._settings import Setting

__all__ = ["MomentumSAM"]


def _momentum_key(base: torch.optim.Optimizer) -> str | None:
    """The base optimizer's state key holding its momentum: SGD's (and RMSprop's)
    ``momentum_buffer``, the first moment ``exp_avg`` of Adam-like optimizers; None without."""
    if "momentum" in base.defaults:
        return "momentum_buffer"
    if "betas" in base.defaults:
        return "exp_avg"
    return None


class MomentumSAM(SharpnessOptimizer):
    r"""Momentum-SAM: SAM's ascent replaced by a step against the base optimizer's momentum, so
    a step costs ONE pass.

    With v the base optimizer's momentum (SGD's ``momentum_buffer``, Adam's ``exp_avg``) as left
    by the previous step, each step runs the closure once on the mini-batch B at

        theta - rho v / (||v|| + eps)          (||v|| global over the parameters that have v)

    then restores theta bit for bit and lets the base optimizer step with the gradient there
    (its weight decay acting at theta). Before the first base step there is no v: the pass is
    at theta. A parameter without v (added later, never stepped) is not moved. ``rho`` lives in
    the param groups. A base optimizer without momentum state (SGD with momentum=0, Adagrad,
    ...) is refused at construction, and so is a param group with momentum=0.

    The one pass is the step's pass "at theta" for its consumers: with ``model=``, BatchNorm
    running statistics move in it (there is no other pass; freezing them would leave them at
    their initial values for good), so they are statistics of the perturbed weights, as in the
    authors' code (which keeps the model at the perturbed point); a trainer counts its
    predictions, and ``opt.stats["loss_train"]`` is its loss, L_B(theta - rho v / (||v|| +
    eps)). ``grad_norm_train`` is the norm of its gradient (before clipping). One
    parameter-sized buffer (theta) lives during a step; no state beyond the base optimizer's.
    Options act as in `SAM`.
    """

    SETTINGS = (
        Setting("rho", float, 3.0, "radius of the step against the momentum", low=0.0,
                grid=(0.3, 1.0, 3.0, 10.0), per_group=True),
    )
    _radius_keys = ("rho",)
    _num_buffers = 1
    _pass_names = ("at theta - rho v/||v||",)

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 3.0,
        perturb_eps: float = 1e-12,
        model: nn.Module | None = None,
        perturbation: str = "local",
        loss_scaler: LossScaler | None = None,
        check_finite: bool = True,
        perturb_foreach: bool | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params, base_optimizer, {"rho": rho}, adaptive=False, perturb_eps=perturb_eps,
            model=model, perturbation=perturbation, loss_scaler=loss_scaler,
            check_finite=check_finite, perturb_foreach=perturb_foreach,
            max_grad_norm=max_grad_norm, base_kwargs=base_kwargs,
        )
        key = _momentum_key(self.base_optimizer)
        if key is None:
            raise ValueError(
                f"MomentumSAM needs a base optimizer with momentum, got "
                f"{type(self.base_optimizer).__name__}: use torch.optim.SGD with momentum > 0, "
                "or an Adam-like optimizer (its exp_avg is the momentum)")
        self._key = key
        for group in self.param_groups:
            self._check_momentum(group)

    def _check_momentum(self, group: dict[str, Any]) -> None:
        if self._key == "momentum_buffer" and not group.get("momentum", 0):
            raise ValueError(
                f"MomentumSAM needs momentum > 0 in every param group (got momentum="
                f"{group.get('momentum')!r}): without it {type(self.base_optimizer).__name__} "
                "keeps no momentum buffer to perturb along")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "_key"):  # after construction: refuse a group without momentum
            momentum = param_group.get("momentum", self.base_optimizer.defaults.get("momentum"))
            self._check_momentum({"momentum": momentum})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, grad_scaler: Any = None) -> Tensor:  # type: ignore[override]
        """One pass at theta - rho v / (||v|| + eps) and the base step; returns its loss."""
        if not callable(closure):
            raise TypeError("MomentumSAM.step(closure) needs a closure that runs forward and "
                            "backward on the mini-batch and returns the loss")
        with self._stepping(grad_scaler):
            params, groups = self._params()
            foreach = self._use_foreach(params)
            if self._present_gradients(params):
                raise RuntimeError("MomentumSAM found gradients in p.grad at step entry: call "
                                   "opt.zero_grad() before, and backward only inside the closure")
            theta = self._descend_momentum(params, groups, foreach)
            check: list[Tensor] = []
            guard = (self._restore_on_error(params, theta, foreach) if theta is not None
                     else contextlib.nullcontext())
            with guard:
                loss = self._run(closure, params, at_theta=True, final=True)
                norm = self._final_gradients(params, check, foreach, want_norm=True)
            self.stats = {"loss_train": loss, "grad_norm_train": norm}  # type: ignore[dict-item]
            self._finish(params, theta, check, self._pass_names, foreach)
        return loss

    def _descend_momentum(self, params: list[Tensor], groups: list[dict[str, Any]],
                          foreach: bool) -> list[Tensor] | None:
        """Move the weights to theta - rho v / (||v|| + eps); returns theta (None when no
        parameter has v yet: the weights stay at theta)."""
        moms = [self.state[p].get(self._key) if p in self.state else None for p in params]
        idx = [i for i, v in enumerate(moms) if v is not None]
        if not idx:
            return None
        theta = self._snapshot(params, foreach)
        denom = F.global_norm([moms[i] for i in idx], foreach) + self.perturb_eps  # type: ignore[misc]
        scale = {id(g): (-g["rho"] / denom) for g in self.param_groups}  # 0-d, on the device
        for i in idx:
            v = moms[i]
            # p += (-rho / (||v|| + eps)) v, in place: no parameter-sized temporary
            params[i].addcmul_(v, scale[id(groups[i])].to(v.dtype))  # type: ignore[arg-type, union-attr]
        return theta
