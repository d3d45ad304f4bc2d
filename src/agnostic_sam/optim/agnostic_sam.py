"""Agnostic-SAM (Nguyen et al., Algorithm 1) and its simpler variant (Sec. 5.1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import _functional as F
from agnostic_sam.optim._base import Closure, SharpnessOptimizer
from agnostic_sam.optim._settings import Setting

__all__ = ["AgnosticSAM"]

VARIANTS = ("full", "simpler")


class AgnosticSAM(SharpnessOptimizer):
    r"""Agnostic Sharpness-Aware Minimization, wrapping any `torch.optim` optimizer.

    Each step takes a mini-batch B split into B^t and B^v (see `split_batch`) as two closures.
    With g_t(.) = grad L_{B^t}(.), g_v(.) = grad L_{B^v}(.) and the paper's eqs. (4)-(6) in the
    practical form of Algorithm 1, ``variant="full"`` runs four passes in this order:

    1. B^v at theta:      g_v(theta)
    2. B^v at theta^v:    theta^v = theta + rho2 * g_v(theta) / (||g_v(theta)|| + eps)        (4)
    3. B^t at theta:      g_t(theta)
    4. B^t at theta^t:    theta^t = theta + rho1 * g_t(theta) / (||g_t(theta)|| + eps)
                                        - rho2 * g_v(theta^v) / (||g_v(theta^v)|| + eps)    (5)
    (``eps`` is the ``perturb_eps`` argument)

    then restores theta bit for bit and lets the base optimizer step with g_t(theta^t); for plain
    SGD that is theta <- theta - lr * g_t(theta^t) (6). ``variant="simpler"`` (Sec. 5.1) skips
    pass 2 and uses g_v(theta) in its place: three passes (B^v at theta, B^t at theta, B^t at
    theta^t).

    Norms are global 2-norms over every parameter that has a gradient in that pass, across all
    param groups; parameters without a gradient are not perturbed. ``rho1`` and ``rho2`` live in
    the param groups: per-group values, schedulable like ``lr``.

    ``adaptive=True`` applies Adaptive-SAM's element-wise scaling (Kwon et al. 2021) with
    T = |theta| (taken at the unperturbed theta) to both terms: each ``rho * g / (||g|| + eps)``
    above becomes ``rho * T^2 g / (||T g|| + eps)``.

    Args:
        params: parameters or param-group dicts (groups may set ``rho1``/``rho2``).
        base_optimizer: the optimizer *class* that takes the actual step (default SGD).
        rho1: radius of the ascent on B^t (>= 0).
        rho2: radius on B^v, used both for theta^v and for the descent term in theta^t (>= 0).
        variant: ``"full"`` (Algorithm 1) or ``"simpler"`` (Sec. 5.1).
        adaptive: Adaptive-SAM scaling, see above.
        perturb_eps: added to every norm in a denominator (> 0), so a zero gradient perturbs
            by zero. (``eps`` is the base optimizer's, e.g. Adam's, passed on unchanged.)
        model: the module the closures run (possibly DDP-wrapped). When given, BatchNorm running
            statistics are updated only by the passes at theta (B^v, then B^t), exactly as if the
            perturbed passes had not run, and every BatchNorm setting is restored even when a
            closure raises. Without it, every pass updates them, as in most SAM code.
            Under DDP, ``perturbation`` says which passes communicate.
        perturbation: ``"local"``: every pass but the last runs forward and backward inside
            ``model.no_sync()`` (each rank perturbs with its own shard, as SAM's m-sharpness);
            only g_t(theta^t) is all-reduced. ``"synced"``: every pass is all-reduced, so the step
            equals the single-process step on the global batch.
        loss_scaler: a `LossScaler` for float16: closures call ``opt.backward(loss)`` (a pass
            that does not raises `RuntimeError`); each pass's gradients are unscaled before their
            norm; a step with a non-finite gradient in any pass is skipped
            (``stats["skipped"] == 1``) and the scale lowered. Instead of it, a
            ``torch.amp.GradScaler`` may drive the step: ``scaler.step(opt, closure,
            val_closure)`` (closures positional) with closures calling
            ``scaler.scale(loss).backward()``, then ``scaler.update()``; the same steps result.
        check_finite: without a loss scaler, raise `FloatingPointError` naming the first pass
            with a non-finite gradient (one host sync per step); parameters are back at theta and
            the base optimizer's state is untouched. ``False`` removes that sync.
        perturb_foreach: multi-tensor kernels for the perturbation arithmetic (default: on when
            every parameter is on an accelerator). ``foreach`` is the base optimizer's.
        max_grad_norm: clip the final gradient g_t(theta^t), the one the base optimizer steps
            with (after unscaling), to this global 2-norm, as ``clip_grad_norm_`` does. Clipping
            an ascent gradient would change nothing: it is normalized.
        **base_kwargs: passed to ``base_optimizer`` unchanged (lr, momentum, weight_decay, eps,
            betas, foreach, fused, ...).

    ``opt.at_theta`` is True exactly while a closure runs at theta (passes 1 and 3), e.g. to
    count training accuracy only there. Gradients already in p.grad at step entry raise
    `RuntimeError` (forward and backward belong inside the closures; to accumulate micro-batches
    use `accumulate`); p.grad is empty after every step. Sparse gradients raise `ValueError`
    before any pass at a perturbed point.

    After each step ``opt.stats`` holds 0-d tensors (no host sync): ``loss_train`` (B^t at
    theta), ``loss_val`` (B^v at theta), ``grad_norm_train`` = ||g_t(theta)||,
    ``grad_norm_val`` = ||g_v(theta^v)|| (simpler: ||g_v(theta)||), ``cos_train_val``, the
    cosine between g_t(theta) and that validation gradient (the congruence that eq. (7) says the
    update increases), and ``skipped``.

    Memory: two parameter-sized buffers during a step (a copy of theta, and the kept validation
    gradient); nothing per step is kept in ``state_dict``.
    """

    SETTINGS = (
        Setting("rho1", float, 0.1, "radius of the ascent on B^t", low=0.0,
                grid=(0.05, 0.1, 0.2, 0.4), per_group=True),
        Setting("rho2", float, 0.05, "radius on B^v (theta^v and the descent term)", low=0.0,
                per_group=True),
        Setting("adaptive", bool, False, "Adaptive-SAM scaling of both terms, T = |theta|"),
        Setting("variant", str, "full", "Algorithm 1 (full) or Sec. 5.1 (simpler)",
                choices=VARIANTS),
    )
    _radius_keys = ("rho1", "rho2")
    _num_buffers = 2
    _supports_sparse = False

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho1: float = 0.1,
        rho2: float = 0.05,
        variant: str = "full",
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
        if variant not in VARIANTS:
            raise ValueError(f"invalid variant={variant!r}: expected one of {VARIANTS}")
        self.variant = variant
        super().__init__(
            params,
            base_optimizer,
            {"rho1": rho1, "rho2": rho2},
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

    @property  # the base's class attribute, here computed from the variant
    def _pass_names(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.variant == "full":
            return ("B^v at theta", "B^v at theta^v", "B^t at theta", "B^t at theta^t")
        return ("B^v at theta", "B^t at theta", "B^t at theta^t")

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Closure | None = None,
        val_closure: Closure | None = None,
        *,
        grad_scaler: Any = None,
    ) -> Tensor:
        """One Agnostic-SAM step; `closure` runs B^t, `val_closure` B^v. Returns the B^t loss at
        theta, detached."""
        if not callable(closure) or not callable(val_closure):
            raise TypeError(
                "AgnosticSAM.step(closure, val_closure) needs two closures, each running "
                "forward and backward on its part of the batch (B^t, B^v) and returning the loss "
                "(with a GradScaler: scaler.step(opt, closure, val_closure))"
            )
        with self._stepping(grad_scaler):
            return self._step(closure, val_closure)

    def _step(self, train_closure: Closure, val_closure: Closure) -> Tensor:
        params, groups = self._params()
        if self._present_gradients(params):
            raise RuntimeError(
                "AgnosticSAM.step found gradients already in p.grad: run forward and backward "
                "only inside the closures (accumulate micro-batches with agnostic_sam.accumulate) "
                "and call opt.zero_grad() before the step"
            )
        foreach = self._use_foreach(params)
        theta = self._snapshot(params, foreach)  # buffer 1: theta, restored bit for bit
        with self._restore_on_error(params, theta, foreach):
            # Pass 1: B^v at theta.
            loss_val = self._run(val_closure, params, at_theta=True, final=False)
            gv = self._grads(params, foreach, take=True)
            norm_v = self._norm(gv, theta, foreach)
            check = [norm_v]
            if self.variant == "full":
                # Pass 2: B^v at theta^v = theta + rho2 g_v(theta) / ||g_v(theta)||   (4)
                self._perturb_from_theta(params, theta, groups, [(gv, "rho2", 1.0, norm_v)],
                                         foreach)
                del gv
                self._run(val_closure, params, at_theta=False, final=False)
                F.copy_(params, theta, foreach)
                gv = self._grads(params, foreach, take=True)
                norm_v = self._norm(gv, theta, foreach)
                check.append(norm_v)
            # gv (buffer 2) is g_v(theta^v), or g_v(theta) for the simpler variant.
            grad_norm_val = self._plain_norm(gv, norm_v, foreach)

            # Pass 3: B^t at theta.
            loss_train = self._run(train_closure, params, at_theta=True, final=False)
            gt = self._grads(params, foreach, take=True)
            norm_t = self._norm(gt, theta, foreach)
            check.append(norm_t)
            grad_norm_train = self._plain_norm(gt, norm_t, foreach)
            dot = self._dot(gt, gv, norm_t)
            cos = dot / (grad_norm_train * grad_norm_val).clamp_min(torch.finfo(dot.dtype).tiny)

            # theta^t = theta + rho1 g_t / ||g_t|| - rho2 g_v / ||g_v||   (5); grads consumed.
            self._perturb_from_theta(
                params, theta, groups,
                [(gt, "rho1", 1.0, norm_t), (gv, "rho2", -1.0, norm_v)], foreach,
            )
            del gt, gv

            # Pass 4: B^t at theta^t; the base optimizer steps with g_t(theta^t)   (6)
            self._final_pass(train_closure, params, check, foreach)
        self.stats = {
            "loss_train": loss_train,
            "loss_val": loss_val,
            "grad_norm_train": grad_norm_train,
            "grad_norm_val": grad_norm_val,
            "cos_train_val": cos,
        }
        self._finish(params, theta, check, self._pass_names, foreach)
        return loss_train
