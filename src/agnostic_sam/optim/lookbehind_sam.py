"""Lookbehind-SAM (Mordido et al., "Lookbehind-SAM: k steps back, 1 step forward", ICML 2024)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import _functional as F
from agnostic_sam.optim._base import Closure, SharpnessOptimizer
from agnostic_sam.optim._settings import Setting

__all__ = ["LookbehindSAM"]

# Per-parameter state during a cycle (none between cycles; missing means "= phi"):
_FAST = "lookbehind_fast"  # the fast weights
_POINT = "lookbehind_point"  # p = phi + the cycle's ascents so far
_FIRST = "lookbehind_first"  # the fast weights after the cycle's first inner step (alpha=None)
_STEPS = "lookbehind_step"  # optimizer-wide, in state_dict(): inner steps taken so far
_COS_EPS = 1e-8  # torch.nn.CosineSimilarity's eps, as the authors' adaptive alpha uses


class LookbehindSAM(SharpnessOptimizer):
    r"""Lookbehind-SAM: k SAM-like inner steps whose ascents accumulate, then the slow weights
    move a fraction alpha towards the fast ones (Algorithm 1 of the paper).

    The model holds the slow weights phi between steps. A cycle is k calls of ``step``; each is
    ONE inner step j = 1..k on its own mini-batch B, two passes (g(.) = grad L_B(.)):

    1. at p_{j-1} (p_0 = phi):  g_a = g(p_{j-1})
    2. at p_j = p_{j-1} + rho g_a / (||g_a|| + eps):  g_d = g(p_j)

    then the base optimizer steps the fast weights f (f_0 = phi) with g_d: f_j = base(f_{j-1},
    g_d), its momentum and weight decay acting on f. After the k-th inner step

        phi <- phi + alpha (f_k - phi),     f, p <- phi

    (at alpha = 1 phi takes f_k itself). ``alpha=None`` is the authors' adaptive alpha, per
    parameter tensor: alpha = (1 + cos(f_1 - phi, f_k - phi)) / 2, cos = <a, b> /
    (max(||a||, 1e-8) max(||b||, 1e-8)). The weights return to phi after every step. The
    authors run a cycle's k inner steps on one batch; here each inner step is one ``step`` on
    the batch it is given (give the same batch k times to run theirs).

    Pass 1 is the step's pass "at theta" (``opt.at_theta``: BatchNorm statistics move, a
    trainer counts its predictions): its point p_{j-1} is where the inner step starts, phi itself
    at j = 1. Pass 2 is at a perturbed point (BatchNorm statistics frozen). ``rho`` lives in the
    param groups; ``k`` and ``alpha`` are optimizer-wide. A step skipped by loss scaling moves
    neither f nor p but counts as an inner step.

    State in ``state_dict()``: f, p (and f_1 for ``alpha=None``) per parameter while a cycle
    runs (``lookbehind_fast``, ``lookbehind_point``, ``lookbehind_first``; dropped when phi
    moves), and the inner-step count (``lookbehind_step``). Two parameter-sized buffers (phi and
    the ascent) live during a step. Options act as in `SAM`, but under DDP both passes
    synchronize (``perturbation`` has no effect: p is state, the same on every rank); clipping
    acts on g_d.
    ``opt.stats``: ``loss_train`` = L_B(p_{j-1}), ``grad_norm_train`` = ||g_a||, ``skipped``.
    """

    SETTINGS = (
        Setting("rho", float, 0.05, "radius of each ascent step", low=0.0,
                grid=(0.05, 0.1, 0.2, 0.4), per_group=True),
        Setting("k", int, 2, "inner steps per cycle (ascents accumulated, then phi moves)",
                low=1),
        Setting("alpha", float, 0.5, "slow-weight step size; null: the authors' adaptive alpha",
                low=0.0, high=1.0, optional=True),
    )
    _radius_keys = ("rho",)
    _num_buffers = 2
    _pass_names = ("at p_{j-1}", "at p_j")

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        k: int = 2,
        alpha: float | None = 0.5,
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
        self.lookbehind_step = 0  # inner steps taken (host int: j needs no sync)

    def _state_dict(self) -> dict[str, Any]:
        state = super()._state_dict()
        state[_STEPS] = self.lookbehind_step
        return state

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A state dict without the count (a base optimizer's) starts a cycle.
        steps = state_dict.pop(_STEPS, 0)
        super()._load_state_dict(state_dict)
        self.lookbehind_step = int(steps)

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, grad_scaler: Any = None) -> Tensor:  # type: ignore[override]
        """One inner step (two passes); after the k-th of a cycle phi moves. Returns the loss at
        p_{j-1}, detached."""
        if not callable(closure):
            raise TypeError("LookbehindSAM.step(closure) needs a closure that runs forward and "
                            "backward on the mini-batch and returns the loss")
        with self._stepping(grad_scaler):
            params, groups = self._params()
            foreach = self._use_foreach(params)
            if self._present_gradients(params):
                raise RuntimeError("LookbehindSAM found gradients in p.grad at step entry: call "
                                   "opt.zero_grad() before, and backward only inside the closure")
            first = self.lookbehind_step % self.k == 0
            phi = [p.detach().clone() for p in params]
            # f_{j-1} and p_{j-1}: the cycle's state, phi where there is none (or at j = 1)
            states = [self.state[p] for p in params]
            fast = [phi[i] if first else s.get(_FAST, phi[i]) for i, s in enumerate(states)]
            point = [None if first else s.get(_POINT) for s in states]
            with self._restore_on_error(params, phi, foreach):
                for p, q in zip(params, point):
                    if q is not None:
                        p.copy_(q)
                ascent = self._inner_step(closure, params, groups, phi, fast, foreach)
            self._after(params, states, phi, ascent, first, foreach)
        self.lookbehind_step += 1  # only after a step that returned (taken or skipped)
        return self.stats["loss_train"]

    def _inner_step(self, closure: Closure, params: list[Tensor], groups: list[dict[str, Any]],
                    phi: list[Tensor], fast: list[Tensor], foreach: bool) -> list[Tensor | None]:
        """Passes at p_{j-1} and p_j, then the base step on the fast weights: the weights are
        f_j afterwards. Returns the ascent rho g_a / (||g_a|| + eps) (None: no gradient)."""
        # final=True: under DDP this pass synchronizes too (whatever `perturbation` says), so
        # p is the same on every rank and rank 0's checkpoint holds every rank's p.
        loss = self._run(closure, params, at_theta=True, final=True)
        grads = self._grads(params, foreach, take=True)
        norm = self._norm(grads, phi, foreach)
        check = [norm]
        self._perturb(params, grads, phi, groups, "rho", 1.0, norm, foreach)  # grads: ascents
        self._final_pass(closure, params, check, foreach)
        self.stats = {"loss_train": loss, "grad_norm_train": norm}
        self._finish(params, fast, check, self._pass_names, foreach)  # f_j = base(f_{j-1}, g_d)
        return grads

    def _after(self, params: list[Tensor], states: list[dict[str, Any]], phi: list[Tensor],
               ascent: list[Tensor | None], first: bool, foreach: bool) -> None:
        """Keep f_j and p_j, or at the cycle's end move phi; the weights hold phi afterwards.
        Written after the base step: the state is shared, and Adam initializes a parameter's
        state only while it is empty."""
        if (self.lookbehind_step + 1) % self.k == 0:
            self._move_slow(params, states, phi, first)
            return
        skipped = self.stats["skipped"] > 0 if self._scaled else None
        for p, s, phi_i, e in zip(params, states, phi, ascent):
            if p.grad is not None:  # the base optimizer moved p: keep f_j
                if first or _FAST not in s:
                    s[_FAST] = p.detach().clone()
                else:
                    s[_FAST].copy_(p)
                if first and self.alpha is None:
                    s[_FIRST] = p.detach().clone()
            if e is not None:  # p_j = p_{j-1} + e, unless the step was skipped
                if skipped is not None:
                    e.masked_fill_(skipped, 0.0)
                if first or _POINT not in s:  # a tensor of its own: e may view a step buffer
                    s[_POINT] = phi_i + e
                else:
                    s[_POINT].add_(e)
        F.copy_(params, phi, foreach)

    def _move_slow(self, params: list[Tensor], states: list[dict[str, Any]], phi: list[Tensor],
                   first: bool) -> None:
        """The weights hold f_k: phi <- phi + alpha (f_k - phi) per tensor; the cycle's state
        goes."""
        for p, s, phi_i in zip(params, states, phi):
            if self.alpha is None:
                f_1 = p if first else s.get(_FIRST, phi_i)  # k = 1: f_1 = f_k
                p.sub_(phi_i)  # f_k - phi, in place
                a = f_1 - phi_i if f_1 is not p else p
                cos = torch.dot(a.reshape(-1), p.reshape(-1)) / (
                    a.norm().clamp_min(_COS_EPS) * p.norm().clamp_min(_COS_EPS))
                p.mul_((1.0 + cos) / 2.0).add_(phi_i)
            elif self.alpha != 1.0:  # alpha = 1: phi takes f_k as it is
                p.sub_(phi_i).mul_(self.alpha).add_(phi_i)
            for key in (_FAST, _POINT, _FIRST):
                s.pop(key, None)
