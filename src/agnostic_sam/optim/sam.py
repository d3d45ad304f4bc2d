"""SAM (Foret et al. 2021) and Adaptive-SAM (Kwon et al. 2021), the baselines of the paper."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim._base import Closure, SharpnessOptimizer

__all__ = ["SAM"]


class SAM(SharpnessOptimizer):
    r"""Sharpness-Aware Minimization, wrapping any `torch.optim` optimizer.

    Each step runs the closure twice on the same mini-batch B, with g(.) = grad L_B(.):

    1. at theta:        g(theta)
    2. at theta + e:    e = rho * g(theta) / (||g(theta)|| + eps)

    then restores theta bit for bit and lets the base optimizer step with g(theta + e); for SGD,
    theta <- theta - lr * g(theta + e). With ``adaptive=True`` (ASAM, T = |theta| element-wise),
    e = rho * T^2 g / (||T g|| + eps). ``rho`` lives in the param groups.

    ``model``, ``perturbation``, ``loss_scaler``, ``check_finite``, ``eps`` and ``foreach`` act as
    in `AgnosticSAM` (BatchNorm statistics move only in the pass at theta when ``model`` is given;
    a ``local`` perturbation keeps pass 1 free of DDP communication). ``opt.stats`` holds
    ``loss_train``, ``grad_norm_train`` = ||g(theta)|| and ``skipped`` as 0-d tensors. One
    parameter-sized buffer (the copy of theta) lives during a step.
    """

    _radius_keys = ("rho",)
    _num_buffers = 1
    _pass_names = ("at theta", "at theta + e")

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        eps: float = 1e-12,
        model: nn.Module | None = None,
        perturbation: str = "local",
        loss_scaler: LossScaler | None = None,
        check_finite: bool = True,
        foreach: bool | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base_optimizer,
            {"rho": rho},
            adaptive=adaptive,
            eps=eps,
            model=model,
            perturbation=perturbation,
            loss_scaler=loss_scaler,
            check_finite=check_finite,
            foreach=foreach,
            base_kwargs=base_kwargs,
        )

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One SAM step; returns the loss at theta, detached."""
        if not callable(closure):
            raise TypeError(
                "SAM.step(closure) needs a closure that runs forward and backward on the "
                "mini-batch and returns the loss"
            )
        params, groups = self._params()
        foreach = self._use_foreach(params)
        theta = [p.detach().clone() for p in params]  # restored bit for bit
        with self._restore_on_error(params, theta, foreach):
            loss = self._run(closure, params, at_theta=True, final=False)
            grads = self._grads(params, foreach, take=True)
            norm = self._norm(grads, theta, foreach)
            check = [norm]
            grad_norm = self._plain_norm(grads, norm, foreach)
            # theta + e, e = rho g / ||g||; the base optimizer steps with g(theta + e).
            self._perturb(params, grads, theta, groups, "rho", 1.0, norm, foreach)
            del grads
            self._final_pass(closure, params, check, foreach)
        self.stats = {"loss_train": loss, "grad_norm_train": grad_norm}
        self._finish(params, theta, check, self._pass_names, foreach)
        return loss
