"""WSAM (Yue et al., "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
Regularization Term", KDD 2023)."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import _functional as F
from agnostic_sam.optim._base import Closure, SharpnessOptimizer
from agnostic_sam.optim._settings import Setting
from agnostic_sam.optim.friendly_sam import after_base_step, ascend_from_theta

__all__ = ["WSAM"]


class WSAM(SharpnessOptimizer):
    r"""Weighted SAM, wrapping any `torch.optim` optimizer.

    The loss L + a (L(theta + e) - L) weighs the sharpness term by a = gamma / (1 - gamma).
    Each step runs the closure twice on the same mini-batch B, with g(.) = grad L_B(.):

    1. at theta:        g_c = g(theta)
    2. at theta + e:    e = rho g_c / (||g_c|| + eps),  g_s = g(theta + e)

    then restores theta bit for bit and, with s = g_s - g_c (the sharpness gradient):

    - ``decouple=False``: the base optimizer steps with g_c + a s;
    - ``decouple=True`` (the default, as in the authors' code): the base optimizer steps with
      g_c, then theta <- theta - lr a s, with the group's lr: the sharpness term bypasses the
      base optimizer's momentum, adaptive scaling and weight decay, as weight decay does in
      AdamW.

    gamma = 1/2 (a = 1) with ``decouple=False`` is SAM. The sharpness move happens only when the
    base optimizer steps (not in a step skipped by loss scaling or refused as non-finite), and a
    non-finite s refuses the step like a non-finite gradient. ``max_grad_norm`` clips what the
    base optimizer steps with (g_c + a s, or g_c), not s.

    ``rho`` lives in the param groups; ``gamma`` and ``decouple`` are optimizer-wide.
    ``model``, ``perturbation``, ``loss_scaler``, ``check_finite``, ``perturb_eps`` and
    ``perturb_foreach`` act as in `SAM`. ``opt.stats["grad_norm_train"]`` is ||g_c||. Two
    parameter-sized buffers live during a step: theta and g_c (s takes the storage of g_s).
    """

    SETTINGS = (
        Setting("rho", float, 0.05, "radius of the ascent step", low=0.0,
                grid=(0.05, 0.1, 0.2, 0.4), per_group=True),
        Setting("gamma", float, 0.9, "weight of the sharpness term, as a = gamma / (1 - gamma)",
                low=0.0, high=1.0, high_open=True),
        Setting("decouple", bool, True, "step the sharpness term apart from the base optimizer "
                "(theta -= lr a s after its step)"),
    )
    _radius_keys = ("rho",)
    _sync_every_pass = True  # under DDP: its direction / state uses pass 1's gradient
    _num_buffers = 2
    # The third check is ||s|| (decouple=True), which comes from the second pass's gradient.
    _pass_names = ("at theta", "at theta + e", "at theta + e")

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        gamma: float = 0.9,
        decouple: bool = True,
        perturb_eps: float = 1e-12,
        model: nn.Module | None = None,
        perturbation: str = "local",
        loss_scaler: LossScaler | None = None,
        check_finite: bool = True,
        perturb_foreach: bool | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.gamma = self.SETTINGS[1].check(gamma)
        self.decouple = self.SETTINGS[2].check(decouple)
        self.alpha = self.gamma / (1.0 - self.gamma)  # a, the weight of the sharpness term
        super().__init__(
            params, base_optimizer, {"rho": rho}, adaptive=False, perturb_eps=perturb_eps,
            model=model, perturbation=perturbation, loss_scaler=loss_scaler,
            check_finite=check_finite, perturb_foreach=perturb_foreach,
            max_grad_norm=max_grad_norm, base_kwargs=base_kwargs,
        )
        self._g: list[Tensor | None] | None = None  # g_c, during a step only
        self._sharp: list[Tensor | None] | None = None  # s (decouple=True), during a step only
        self._sharp_norm: Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, grad_scaler: Any = None) -> Tensor:  # type: ignore[override]
        """One WSAM step; returns the loss at theta, detached."""
        if not callable(closure):
            raise TypeError("WSAM.step(closure) needs a closure that runs forward and backward "
                            "on the mini-batch and returns the loss")
        with self._stepping(grad_scaler):
            params, groups = self._params()
            foreach = self._use_foreach(params)
            if self._present_gradients(params):
                raise RuntimeError("WSAM found gradients in p.grad at step entry: call "
                                   "opt.zero_grad() before, and backward only inside the closure")
            loss = self._run(closure, params, at_theta=True, final=False)
            theta = self._snapshot(params, foreach)
            grads = self._grads(params, foreach, take=True)
            norm = self._norm(grads, theta, foreach)
            check = [norm]
            self._g = grads
            try:
                with self._restore_on_error(params, theta, foreach):
                    idx = [i for i, g in enumerate(grads) if g is not None]
                    present = cast(list[Tensor], [grads[i] for i in idx])  # with a gradient
                    F.copy_([params[i] for i in idx], present, foreach)
                    ascend_from_theta(params, theta, groups, idx, norm + self.perturb_eps,
                                      foreach)
                    self._final_pass(closure, params, check, foreach)
                if self._sharp_norm is not None:
                    check.append(self._sharp_norm)
                self.stats = {"loss_train": loss, "grad_norm_train": norm}
                sharp = self._sharp
                with after_base_step(self, lambda: self._move(params, groups, sharp, foreach)):
                    self._finish(params, theta, check, self._pass_names, foreach)
            finally:
                self._g, self._sharp, self._sharp_norm = None, None, None
        return loss

    def _transform_final(self, params: list[Tensor], foreach: bool) -> None:
        """p.grad = g_s  ->  g_c + a s (decouple=False), or g_c with s kept for `_move`."""
        g = self._g
        if g is None:
            return
        idx = [i for i, p in enumerate(params) if p.grad is not None and g[i] is not None]
        if not idx:
            return
        g_s = cast(list[Tensor], [params[i].grad for i in idx])  # idx: both gradients present
        g_c = cast(list[Tensor], [g[i] for i in idx])
        if foreach:
            torch._foreach_sub_(g_s, g_c)  # s = g_s - g_c, in g_s's storage
        else:
            for s, c in zip(g_s, g_c):
                s.sub_(c)
        if not self.decouple:
            if foreach:
                torch._foreach_mul_(g_s, self.alpha)
            else:
                for s in g_s:
                    s.mul_(self.alpha)
            F.add_(g_s, g_c, foreach)  # g_c + a s: exactly g_c where s = 0 (rho = 0)
            return
        sharp: list[Tensor | None] = [None] * len(params)
        for i, s in zip(idx, g_s):
            sharp[i] = s
            params[i].grad = g[i]  # the base optimizer steps with g_c
        self._sharp = sharp
        self._sharp_norm = F.global_norm(g_s, foreach)

    def _move(self, params: list[Tensor], groups: list[dict[str, Any]],
              sharp: list[Tensor | None] | None, foreach: bool) -> None:
        """After the base optimizer's step: theta <- theta - lr a s, per group (decouple)."""
        if sharp is None:
            return
        by_group: dict[int, tuple[dict[str, Any], list[int]]] = {}
        for i, s in enumerate(sharp):
            if s is not None:
                by_group.setdefault(id(groups[i]), (groups[i], []))[1].append(i)
        for group, idx in by_group.values():
            ss: list[Tensor] = [sharp[i] for i in idx]  # type: ignore[misc]
            ps = [params[i] for i in idx]
            lr = group["lr"]
            if isinstance(lr, Tensor):  # a tensor lr stays on the device: no host sync
                F.scale_(ss, (lr * -self.alpha).to(ss[0].device, ss[0].dtype), foreach)
                F.add_(ps, ss, foreach)
            elif foreach:
                torch._foreach_add_(ps, ss, alpha=-lr * self.alpha)
            else:
                for p, s in zip(ps, ss):
                    p.add_(s, alpha=-lr * self.alpha)
