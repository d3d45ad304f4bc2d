"""SAM (Foret et al. 2021) and Adaptive-SAM (Kwon et al. 2021), the baselines of the paper."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim._base import Closure, SharpnessOptimizer
from agnostic_sam.optim._settings import Setting

__all__ = ["SAM"]


class SAM(SharpnessOptimizer):
    r"""Sharpness-Aware Minimization, wrapping any `torch.optim` optimizer.

    Each step runs the closure twice on the same mini-batch B, with g(.) = grad L_B(.):

    1. at theta:        g(theta)
    2. at theta + e:    e = rho * g(theta) / (||g(theta)|| + perturb_eps)

    then restores theta bit for bit and lets the base optimizer step with g(theta + e); for SGD,
    theta <- theta - lr * g(theta + e). With ``adaptive=True`` (ASAM, T = |theta| element-wise),
    e = rho * T^2 g / (||T g|| + perturb_eps). ``rho`` lives in the param groups.

    ``model``, ``perturbation``, ``loss_scaler``, ``check_finite``, ``perturb_eps``,
    ``perturb_foreach`` and ``max_grad_norm`` act as in `AgnosticSAM` (BatchNorm statistics move
    only in the pass at theta when ``model`` is given; a ``local`` perturbation keeps pass 1 free
    of DDP communication). ``opt.stats`` holds ``loss_train``, ``grad_norm_train`` =
    ||g(theta)|| and ``skipped`` as 0-d tensors. One parameter-sized buffer (the copy of theta)
    lives during a step.

    The davda54/sam forms give the same weights as ``step(closure)``:

    - ``loss.backward(); opt.step(closure)``: the gradient found in p.grad (one backward pass
      since the last step) is g(theta), so pass 1 is not re-run (two passes, not three);
      ``loss_train`` is then NaN (the optimizer did not see the loss at theta). The gradient
      must be of the closure's own mini-batch, from a forward in the same mode (its BatchNorm
      statistics update is pass 1's). One backward on *another* batch before the step (a
      framework accumulating two micro-batches) looks the same and cannot be detected: keep
      accumulation inside the closure.
    - ``loss.backward(); opt.first_step(); loss2.backward(); opt.second_step()``: with
      ``model=`` given, BatchNorm statistics are frozen from ``first_step`` to ``second_step``.

    A gradient summed over several backward passes before the step cannot be re-evaluated at
    theta + e: the step raises; accumulate micro-batches inside the closure (`accumulate`).
    """

    SETTINGS = (
        Setting("rho", float, 0.05, "radius of the ascent step", low=0.0,
                grid=(0.05, 0.1, 0.2, 0.4), per_group=True),
        Setting("adaptive", bool, False, "ASAM's scale-invariant radius, T = |theta| (davda54)"),
    )
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
            params,
            base_optimizer,
            {"rho": rho},
            adaptive=adaptive,
            perturb_eps=perturb_eps,
            model=model,
            perturbation=perturbation,
            loss_scaler=loss_scaler,
            check_finite=check_finite,
            perturb_foreach=perturb_foreach,
            max_grad_norm=max_grad_norm,
            base_kwargs=base_kwargs,
        )
        self._pending: tuple[Any, ...] | None = None  # between first_step and second_step

    def _one_backward(self, params: list[Tensor], where: str) -> int:
        passes = self._present_gradients(params)
        if passes > 1:
            raise RuntimeError(
                f"SAM {where} found gradients summed over {passes} backward passes in p.grad; "
                "they cannot be re-evaluated at theta + e: accumulate micro-batches inside the "
                "closure (agnostic_sam.accumulate) and zero_grad() before"
            )
        return passes

    def _ascend(
        self, params: list[Tensor], groups: list[dict[str, Any]], foreach: bool
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """From g(theta) in p.grad: keep theta, move to theta + e. Returns (theta, check, ||g||)."""
        theta = self._snapshot(params, foreach)  # restored bit for bit
        grads = self._grads(params, foreach, take=True)
        # theta + e, e = rho g / ||g||; the base optimizer steps with g(theta + e).
        norm, grad_norm = self._ascend_from_theta(params, theta, grads, groups, "rho", foreach)
        return theta, [norm], grad_norm

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, grad_scaler: Any = None) -> Tensor:  # type: ignore[override]
        """One SAM step; returns the loss at theta, detached (NaN when p.grad held g(theta))."""
        if not callable(closure):
            raise TypeError(
                "SAM.step(closure) needs a closure that runs forward and backward on the "
                "mini-batch and returns the loss (with a GradScaler: scaler.step(opt, closure))"
            )
        if self._pending is not None:
            raise RuntimeError(
                "SAM.step() between first_step() and second_step(): call second_step()"
            )
        with self._stepping(grad_scaler):
            params, groups = self._params()
            foreach = self._use_foreach(params)
            if self._one_backward(params, "step"):  # davda54: loss.backward(); opt.step(closure)
                loss = torch.full((), float("nan"), device=params[0].device)
            else:
                loss = self._run(closure, params, at_theta=True, final=False)
            theta, check, grad_norm = self._ascend(params, groups, foreach)
            with self._restore_on_error(params, theta, foreach):
                self._final_pass(closure, params, check, foreach)
            self.stats = {"loss_train": loss, "grad_norm_train": grad_norm}
            self._finish(params, theta, check, self._pass_names, foreach)
        return loss

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """davda54's first phase: from g(theta) in p.grad (``loss.backward()`` before; with a loss
        scaler ``opt.backward(loss)``), move the weights to theta + e. The gradient is consumed,
        so p.grad is empty afterwards whatever ``zero_grad`` says."""
        del zero_grad  # p.grad is always left empty: a second backward must not add to it
        if self._pending is not None:
            raise RuntimeError("SAM.first_step() called twice: call second_step() in between")
        self._begin(None)
        params, groups = self._params()
        foreach = self._use_foreach(params)
        if not self._one_backward(params, "first_step()"):
            raise RuntimeError(
                "SAM.first_step() needs g(theta) in p.grad: call loss.backward() (or "
                "opt.backward(loss)) before it, or use opt.step(closure)"
            )
        theta, check, grad_norm = self._ascend(params, groups, foreach)
        frozen = contextlib.ExitStack()
        frozen.enter_context(self._frozen_batchnorm(True))  # until second_step
        self._pending = (theta, check, grad_norm, frozen)
        self._end()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """davda54's second phase: with g(theta + e) in p.grad, restore theta and let the base
        optimizer step. p.grad is empty afterwards whatever ``zero_grad`` says."""
        del zero_grad
        if self._pending is None:
            raise RuntimeError("SAM.second_step() without first_step(): call first_step() first")
        theta, check, grad_norm, frozen = self._pending
        self._pending = None
        frozen.close()
        params, _ = self._params()
        foreach = self._use_foreach(params)
        with self._stepping(None), self._restore_on_error(params, theta, foreach):
            if not self._one_backward(params, "second_step()"):
                raise RuntimeError(
                    "SAM.second_step() needs g(theta + e) in p.grad: call loss.backward() (or "
                    "opt.backward(loss)) at the perturbed weights before it"
                )
            self._final_gradients(params, check, foreach)
            self.stats = {"loss_train": torch.full((), float("nan"), device=params[0].device),
                          "grad_norm_train": grad_norm}
            self._finish(params, theta, check, self._pass_names, foreach)
