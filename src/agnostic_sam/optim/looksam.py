"""LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization",
CVPR 2022)."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import _functional as F
from agnostic_sam.optim._base import Closure, SharpnessOptimizer
from agnostic_sam.optim._settings import Setting

__all__ = ["LookSAM"]

_V = "looksam_v"  # per-parameter state: this parameter's slice of the unit vector v
_STEPS = "looksam_step"  # optimizer-wide state in state_dict(): steps taken so far


class LookSAM(SharpnessOptimizer):
    r"""LookSAM: SAM's gradient every k steps, its sharpness part reused in between.

    With g(.) = grad L_B(.) on the step's mini-batch B and n = the number of earlier steps,

    - steps with n % k == 0 (steps 1, k+1, 2k+1, ...) are SAM steps, two passes on B:
      g = g(theta), g_s = g(theta + rho g / (||g|| + eps)); the base optimizer steps with g_s,
      and the step stores the unit direction of g_s's part orthogonal to g (Algorithm 1):

          u = g_s - <g_s, g> / (||g||^2 + eps) g,      v = u / (||u|| + eps)

    - the other steps take ONE pass at theta and the base optimizer steps with

          d = g + alpha ||g|| v,      g = g(theta).

    Norms and the projection are global over every parameter with a gradient (the paper's
    vectors), not per layer. ``rho`` lives in the param groups (a per-group radius); ``k`` and
    ``alpha`` are optimizer-wide. A parameter without v (added later, or without a gradient in the
    last SAM step) reuses nothing: its d is its g. A SAM step whose g or g_s is non-finite keeps
    the previous v (zero before the first), so a step skipped by loss scaling does not poison the
    reuse steps after it; the step still counts.

    State across steps, in ``state_dict()``: v per parameter (``looksam_v``, beside the base
    optimizer's state) and the step count (``looksam_step``). Two parameter-sized buffers (theta
    and g) live during a SAM step, none during a reuse step. With ``rho = 0`` the reuse steps
    are not the base optimizer's: eps makes u a tiny multiple of g, which v normalizes (a
    projection without eps leaves rounding noise, normalized the same way); ``rho = 0,
    alpha = 0`` is the base optimizer, bit for bit.

    Options (``model``, ``loss_scaler``, ``check_finite``, ``perturb_eps``, ``perturb_foreach``,
    ``max_grad_norm``) act as in `SAM`; clipping acts on the stepped gradient (g_s or d). Under
    DDP every pass synchronizes (``perturbation`` has no effect): v is state, and must be the
    same on every rank. ``opt.stats``: ``loss_train`` (at theta), ``grad_norm_train`` = ||g||,
    ``skipped``.
    """

    SETTINGS = (
        Setting("rho", float, 0.05, "radius of the ascent step of the SAM steps", low=0.0,
                grid=(0.05, 0.1, 0.2, 0.4), per_group=True),
        Setting("k", int, 5, "a SAM step every k steps (the others: one pass)", low=1),
        Setting("alpha", float, 0.7, "weight of the reused sharpness direction v", low=0.0),
    )
    _radius_keys = ("rho",)
    _num_buffers = 2
    _pass_names = ("at theta", "at theta + e")

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        perturb_eps: float = 1e-12,
        model: nn.Module | None = None,
        perturbation: str = "local",
        loss_scaler: LossScaler | None = None,
        check_finite: bool = True,
        perturb_foreach: bool | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.k = self.SETTINGS[1].check(k)
        self.alpha = self.SETTINGS[2].check(alpha)
        super().__init__(
            params, base_optimizer, {"rho": rho}, adaptive=False, perturb_eps=perturb_eps,
            model=model, perturbation=perturbation, loss_scaler=loss_scaler,
            check_finite=check_finite, perturb_foreach=perturb_foreach,
            max_grad_norm=max_grad_norm, base_kwargs=base_kwargs,
        )
        self.looksam_step = 0  # steps taken (host int: which kind of step needs no sync)
        self._g: list[Tensor | None] | None = None  # g(theta) during a SAM step only
        # (finite?, [(p, v_p)]): the new v of a SAM step, until the base optimizer has stepped
        self._v: tuple[Tensor, list[tuple[Tensor, Tensor]]] | None = None
        self._sam_step = False

    def _state_dict(self) -> dict[str, Any]:
        state = super()._state_dict()
        state[_STEPS] = self.looksam_step
        return state

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A state dict without the count (a base optimizer's) starts with a SAM step.
        steps = state_dict.pop(_STEPS, 0)
        super()._load_state_dict(state_dict)
        self.looksam_step = int(steps)

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, grad_scaler: Any = None) -> Tensor:  # type: ignore[override]
        """One LookSAM step (a SAM step or a one-pass reuse step); returns the loss at theta."""
        if not callable(closure):
            raise TypeError("LookSAM.step(closure) needs a closure that runs forward and backward "
                            "on the mini-batch and returns the loss")
        with self._stepping(grad_scaler):
            params, groups = self._params()
            foreach = self._use_foreach(params)
            if self._present_gradients(params):
                raise RuntimeError("LookSAM found gradients in p.grad at step entry: call "
                                   "opt.zero_grad() before, and backward only inside the closure")
            self._sam_step = self.looksam_step % self.k == 0
            try:
                if self._sam_step:
                    self._step_sam(closure, params, groups, foreach)
                else:
                    self._step_reuse(closure, params, foreach)
            finally:
                self._g = self._v = None
        self.looksam_step += 1  # only after a step that returned (taken or skipped)
        return self.stats["loss_train"]

    def _step_sam(self, closure: Closure, params: list[Tensor], groups: list[dict[str, Any]],
                  foreach: bool) -> None:
        # final=True: under DDP this pass synchronizes too (whatever `perturbation` says), so g,
        # hence v, is the same on every rank: the reuse steps then step every replica alike,
        # and rank 0's checkpoint holds every rank's v.
        loss = self._run(closure, params, at_theta=True, final=True)
        theta = self._snapshot(params, foreach)
        grads = self._grads(params, foreach, take=True)
        norm = self._norm(grads, theta, foreach)
        check = [norm]
        self._g = self._perturb_keeping(params, theta, grads, groups, "rho", norm, foreach)
        with self._restore_on_error(params, theta, foreach):
            self._final_pass(closure, params, check, foreach)  # makes v (_transform_final)
        self.stats = {"loss_train": loss, "grad_norm_train": norm}
        self._finish(params, theta, check, self._pass_names, foreach)
        # Stored after the base step: the state dict is shared, and Adam initializes a
        # parameter's state only while it is empty.
        if self._v is not None:
            ok, items = self._v
            for p, v in items:
                old = self.state[p].get(_V)
                self.state[p][_V] = torch.where(ok, v, old if old is not None else v.new_zeros(()))

    def _step_reuse(self, closure: Closure, params: list[Tensor], foreach: bool) -> None:
        loss = self._run(closure, params, at_theta=True, final=True)
        check: list[Tensor] = []
        # the norm of g(theta) is taken in _transform_final, before d replaces it
        self.stats = {"loss_train": loss}
        self._final_gradients(params, check, foreach)
        self._finish(params, None, check, ("at theta",), foreach)

    def _transform_final(self, params: list[Tensor], foreach: bool) -> None:
        if self._sam_step:
            self._store_v(params, foreach)
            return
        # reuse step: p.grad = g  ->  d = g + alpha ||g|| v
        idx = [i for i, p in enumerate(params) if p.grad is not None]
        if not idx:
            self.stats["grad_norm_train"] = self._zero_like_norm(params)
            return
        norm = F.global_norm([params[i].grad for i in idx], foreach)  # type: ignore[misc]
        self.stats["grad_norm_train"] = norm
        scale = self.alpha * norm  # 0-d, on the device
        for i in idx:
            v = self.state[params[i]].get(_V)
            if v is not None:  # d = g + (alpha ||g||) v, in place, no parameter-sized temporary
                params[i].grad.addcmul_(v, scale.to(v.dtype))  # type: ignore[union-attr]

    def _store_v(self, params: list[Tensor], foreach: bool) -> None:
        """From g (kept) and g_s (in p.grad): v = u / (||u|| + eps), u = g_s - c g,
        c = <g_s, g> / (||g||^2 + eps), made in g's buffer; stored (where ||u|| is finite)
        after the base step."""
        g = self._g
        if g is None:
            return
        idx = [i for i, p in enumerate(params) if p.grad is not None and g[i] is not None]
        if not idx:
            return
        g_s = cast(list[Tensor], [params[i].grad for i in idx])  # idx: both gradients present
        u = cast(list[Tensor], [g[i] for i in idx])  # the buffer of g becomes u, then v
        # the projection coefficient in float64, on the device (no host sync)
        coef = F.dot(g_s, u).double() / (F.dot(u, u).double() + self.perturb_eps)  # type: ignore[arg-type]
        for ui, gs in zip(u, g_s):
            ui.mul_((-coef).to(ui.dtype)).add_(gs)  # type: ignore[arg-type]
        norm_u = F.global_norm(u, foreach)  # type: ignore[arg-type]
        F.scale_(u, (norm_u + self.perturb_eps).reciprocal(), foreach)  # type: ignore[arg-type]
        self._v = (torch.isfinite(norm_u), [(params[i], vi) for i, vi in zip(idx, u)])
