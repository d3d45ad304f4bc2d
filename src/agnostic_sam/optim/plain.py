"""The one-pass step with the same shape as SAM's: the base optimizer alone."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim._base import Closure, SharpnessOptimizer

__all__ = ["Plain"]


class Plain(SharpnessOptimizer):
    r"""The base optimizer behind the same step interface as `SAM`: ``step(closure)`` runs the
    closure once at theta, then the base optimizer steps with g(theta).

    In float32 without loss scaling this equals ``zero_grad(); closure(); base.step()`` bit for
    bit. ``loss_scaler`` (or a ``torch.amp.GradScaler`` through ``scaler.step(opt, closure)``),
    ``check_finite``, ``max_grad_norm`` and ``stats["skipped"]`` act as in `SAM`, so every method
    of a training loop has one step path; ``model`` and ``perturbation`` are accepted for the
    same reason (the one pass is at theta and synchronizes as usual under DDP).

    Gradients already in p.grad at step entry are kept and the closure adds to them, as
    ``torch.optim`` optimizers do (gradient accumulation by the caller is exact here); with a
    loss scaler they must come from ``opt.backward(loss)``. p.grad is empty after every step.
    ``opt.stats``: ``loss_train``, ``grad_norm_train`` (before clipping), ``skipped``.
    """

    SETTINGS = ()
    _pass_names = ("at theta",)

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        loss_scaler: LossScaler | None = None,
        check_finite: bool = True,
        max_grad_norm: float | None = None,
        model: nn.Module | None = None,
        perturbation: str = "local",
        perturb_foreach: bool | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base_optimizer,
            {},
            adaptive=False,
            perturb_eps=1e-12,
            model=model,
            perturbation=perturbation,
            loss_scaler=loss_scaler,
            check_finite=check_finite,
            perturb_foreach=perturb_foreach,
            max_grad_norm=max_grad_norm,
            base_kwargs=base_kwargs,
        )

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, grad_scaler: Any = None) -> Tensor:  # type: ignore[override]
        """One pass at theta and the base step; returns the loss, detached."""
        if not callable(closure):
            raise TypeError(
                "Plain.step(closure) needs a closure that runs forward and backward on the "
                "mini-batch and returns the loss (with a GradScaler: scaler.step(opt, closure))"
            )
        with self._stepping(grad_scaler):
            params, _ = self._params()
            foreach = self._use_foreach(params)
            keep = self._present_gradients(params) > 0
            loss = self._run(closure, params, at_theta=True, final=True, keep=keep)
            check: list[Tensor] = []
            norm = self._final_gradients(params, check, foreach, want_norm=True)
            self.stats = {"loss_train": loss, "grad_norm_train": cast(Tensor, norm)}  # asked for
            self._finish(params, None, check, self._pass_names, foreach)
        return loss
