"""GSAM (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022)."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import _functional as F
from agnostic_sam.optim._base import Closure, SharpnessOptimizer
from agnostic_sam.optim._settings import Setting

__all__ = ["GSAM"]


class GSAM(SharpnessOptimizer):
    r"""Surrogate-gap guided SAM, wrapping any `torch.optim` optimizer.

    Each step runs the closure twice on the same mini-batch B, with g(.) = grad L_B(.):

    1. at theta:        g = g(theta)
    2. at theta + e:    e = rho_t g / (||g|| + eps),  g_p = g(theta + e)

    then restores theta bit for bit and lets the base optimizer step with

        g_perp = g - <g, g_p> / (||g_p||^2 + eps) g_p     (the part of g orthogonal to g_p)
        d      = g_p - alpha g_perp                        (Algorithm 1 of the paper)

    so the step descends the perturbed loss and, through -alpha g_perp, the surrogate gap.
    ``rho_t = rho_min + (rho - rho_min) lr_t / lr_0`` follows each group's learning rate (lr_0:
    its lr at the first step, as the authors' scheduler ties rho to the lr schedule);
    ``rho_min=None`` keeps rho constant. ``rho`` lives in the param groups.

    Options (``model``, ``perturbation``, ``loss_scaler``, ``check_finite``, ``perturb_eps``,
    ``perturb_foreach``, ``max_grad_norm``) act as in `SAM`; clipping acts on d. Two
    parameter-sized buffers (theta and g) live during a step; with ``rho_min`` and no scheduler,
    each group's first lr (``gsam_lr0``, in the param groups, so in ``state_dict()``) is the only
    state kept across steps.
    """

    SETTINGS = (
        Setting("rho", float, 0.05, "maximum radius of the ascent step", low=0.0,
                grid=(0.05, 0.1, 0.2, 0.4), per_group=True),
        Setting("rho_min", float, None, "radius at lr = 0 (rho follows the lr); null: constant",
                low=0.0, optional=True),
        Setting("alpha", float, 0.4, "weight of the surrogate-gap (orthogonal) descent", low=0.0),
    )
    _radius_keys = ("rho",)
    _sync_every_pass = True  # under DDP: its direction / state uses pass 1's gradient
    _num_buffers = 2
    _pass_names = ("at theta", "at theta + e")

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        rho_min: float | None = None,
        alpha: float = 0.4,
        perturb_eps: float = 1e-12,
        model: nn.Module | None = None,
        perturbation: str = "local",
        loss_scaler: LossScaler | None = None,
        check_finite: bool = True,
        perturb_foreach: bool | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.rho_min = self.SETTINGS[1].check(rho_min)
        self.alpha = self.SETTINGS[2].check(alpha)
        super().__init__(
            params, base_optimizer, {"rho": rho}, adaptive=False, perturb_eps=perturb_eps,
            model=model, perturbation=perturbation, loss_scaler=loss_scaler,
            check_finite=check_finite, perturb_foreach=perturb_foreach,
            max_grad_norm=max_grad_norm, base_kwargs=base_kwargs,
        )
        self._g: list[Tensor | None] | None = None  # g(theta), during a step only

    def _rho_t(self, group: dict[str, Any]) -> float:
        """rho_t of a group: constant rho, or rho_min + (rho - rho_min) lr_t / lr_0, with lr_0
        the scheduler's ``initial_lr`` (else the lr of the first step, kept in the group)."""
        if self.rho_min is None:
            return group["rho"]
        lr_0 = group.get("initial_lr", group.setdefault("gsam_lr0", group["lr"]))
        ratio = float(group["lr"]) / float(lr_0) if lr_0 else 0.0
        return self.rho_min + (group["rho"] - self.rho_min) * ratio

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, grad_scaler: Any = None) -> Tensor:  # type: ignore[override]
        """One GSAM step; returns the loss at theta, detached."""
        if not callable(closure):
            raise TypeError("GSAM.step(closure) needs a closure that runs forward and backward on "
                            "the mini-batch and returns the loss")
        with self._stepping(grad_scaler):
            params, groups = self._params()
            foreach = self._use_foreach(params)
            if self._present_gradients(params):
                raise RuntimeError("GSAM found gradients in p.grad at step entry: call "
                                   "opt.zero_grad() before, and backward only inside the closure")
            loss = self._run(closure, params, at_theta=True, final=False)
            theta = self._snapshot(params, foreach)
            grads = self._grads(params, foreach, take=True)
            norm = self._norm(grads, theta, foreach)
            radii = {id(g): self._rho_t(g) for g in self.param_groups}
            for group in self.param_groups:  # the ascent reads the group's radius of this step
                group["_gsam_rho_t"] = radii[id(group)]
            check = [norm]
            try:
                self._g = self._perturb_keeping(params, theta, grads, groups, "_gsam_rho_t",
                                                norm, foreach)
                with self._restore_on_error(params, theta, foreach):
                    self._final_pass(closure, params, check, foreach)
            finally:
                for group in self.param_groups:
                    group.pop("_gsam_rho_t", None)
                self._g = None
            self.stats = {"loss_train": loss, "grad_norm_train": norm}
            self._finish(params, theta, check, self._pass_names, foreach)
        return loss

    def _transform_final(self, params: list[Tensor], foreach: bool) -> None:
        """p.grad = g_p  ->  d = g_p - alpha (g - <g, g_p> / (||g_p||^2 + eps) g_p)."""
        g = self._g
        if g is None:
            return
        alpha, eps = self.alpha, self.perturb_eps
        layout = self._layout()
        g_p = [p.grad for p in params]
        if layout.accepts(g) and layout.accepts(g_p):  # every gradient present: flat buffers
            fp, ft = layout.flat_of(g_p, 0), layout.flat_of(g, 1)  # type: ignore[arg-type]
            # <g, g_p> / ||g_p||^2 in float64 for the projection coefficient, on the device.
            coef = torch.dot(ft, fp).double() / (torch.dot(fp, fp).double() + eps)
            fp.mul_((1.0 + alpha * coef).to(fp.dtype)).add_(ft, alpha=-alpha)
            torch._foreach_copy_(g_p, list(layout.slot(0)))  # type: ignore[arg-type]
            return
        idx = [i for i, p in enumerate(params) if p.grad is not None and g[i] is not None]
        if not idx:
            return
        gp_ = cast(list[Tensor], [g_p[i] for i in idx])  # idx: both gradients present
        gt_ = cast(list[Tensor], [g[i] for i in idx])
        coef = F.dot(gt_, gp_).double() / (F.dot(gp_, gp_).double() + eps)
        factor = 1.0 + alpha * coef
        for gp, gt in zip(gp_, gt_):  # d = (1 + alpha coef) g_p - alpha g
            gp.mul_(factor.to(gp.dtype)).add_(gt, alpha=-alpha)
