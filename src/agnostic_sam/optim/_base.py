"""Bookkeeping shared by SAM and AgnosticSAM: the wrapper around a base optimizer, closure passes,
BatchNorm statistics, DDP synchronization, loss scaling and the one host sync per step.

The arithmetic lives in `_functional.py`; the update rules in `sam.py` and `agnostic_sam.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import _functional as F

__all__ = ["SharpnessOptimizer"]

Closure = Callable[[], Any]
PERTURBATIONS = ("local", "synced")


def _check_radius(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0:
        raise ValueError(f"invalid perturbation radius {name}={value!r}: must be a number >= 0")


class SharpnessOptimizer(torch.optim.Optimizer):
    """A `torch.optim.Optimizer` that perturbs the weights with closure passes, then lets a base
    optimizer step with the gradient found at the perturbed point.

    The wrapper shares `param_groups` (and `state`) with `base_optimizer`, so schedulers and
    per-group settings act on both, and `state_dict()` is the base optimizer's (momentum, Adam
    moments, and the radii stored in the groups). It keeps no state of its own between steps.
    """

    _radius_keys: tuple[str, ...] = ()
    # Buffers of parameter size alive during a step, beyond the base optimizer's state.
    _num_buffers: int = 0

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        defaults: dict[str, Any],
        *,
        adaptive: bool,
        eps: float,
        model: nn.Module | None,
        perturbation: str,
        loss_scaler: LossScaler | None,
        check_finite: bool,
        foreach: bool | None,
        base_kwargs: dict[str, Any],
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer class such as torch.optim.SGD "
                f"(the class, not an instance), got {type(base_optimizer).__name__}"
            )
        for key in self._radius_keys:
            _check_radius(key, defaults[key])
        if not isinstance(eps, (int, float)) or not eps > 0.0:
            raise ValueError(f"invalid eps={eps!r}: must be > 0")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"invalid perturbation={perturbation!r}: expected one of {PERTURBATIONS}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        if loss_scaler is not None and not isinstance(loss_scaler, LossScaler):
            raise TypeError(f"loss_scaler must be an agnostic_sam.LossScaler, got {type(loss_scaler).__name__}")
        self.adaptive = bool(adaptive)
        self.eps = float(eps)
        self.model = model
        self.perturbation = perturbation
        self.loss_scaler = loss_scaler
        self.check_finite = bool(check_finite)
        self.foreach = foreach
        self.stats: dict[str, Tensor] = {}
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._share_base()
        self.defaults.update(self.base_optimizer.defaults)

    def _share_base(self) -> None:
        # One list of group dicts and one state for both: a scheduler attached to the wrapper
        # drives the base optimizer's lr, and opt.state[p] shows the momentum buffers.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in self._radius_keys:
            if key in param_group:
                _check_radius(key, param_group[key])
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key in self._radius_keys:
            param_group.setdefault(key, self.defaults[key])
        self.base_optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its param groups carry the radii too)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base()

    def backward(self, loss: Tensor) -> None:
        """`loss.backward()`, through the loss scaler when there is one: call it in closures."""
        if self.loss_scaler is not None:
            self.loss_scaler.scale(loss).backward()
        else:
            loss.backward()

    def buffer_bytes(self) -> int:
        """Bytes of the parameter-sized buffers a step allocates beyond the base optimizer's state."""
        return self._num_buffers * sum(
            p.numel() * p.element_size() for g in self.param_groups for p in g["params"]
        )

    # ---- pieces used by the step functions -------------------------------------------------

    def _params(self) -> tuple[list[Tensor], list[dict[str, Any]]]:
        """All parameters, and for each its group (the radii are per group)."""
        params, groups = [], []
        for group in self.param_groups:
            for p in group["params"]:
                params.append(p)
                groups.append(group)
        return params, groups

    def _use_foreach(self, params: list[Tensor]) -> bool:
        if self.foreach is not None:
            return bool(self.foreach)
        # As torch.optim does: the multi-tensor kernels pay off on accelerators.
        return bool(params) and all(p.device.type != "cpu" for p in params)

    @contextlib.contextmanager
    def _frozen_batchnorm(self, freeze: bool) -> Iterator[None]:
        """While `freeze`, BatchNorm layers of `model` normalize with batch statistics as usual
        but leave running_mean, running_var and num_batches_tracked alone."""
        if not freeze or self.model is None:
            yield
            return
        saved = [(m, m.track_running_stats) for m in self.model.modules() if isinstance(m, _BatchNorm)]
        try:
            for m, _ in saved:
                m.track_running_stats = False
            yield
        finally:
            for m, value in saved:
                m.track_running_stats = value

    def _sync_context(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        if sync or self.model is None or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _run(self, closure: Closure, params: list[Tensor], *, at_theta: bool, final: bool) -> Tensor:
        """One pass: zero the gradients, run the closure with grad enabled, return its loss.

        BatchNorm statistics move only in passes at theta; under DDP, a `local` perturbation keeps
        every pass but the final one free of communication (forward and backward in no_sync).
        """
        for p in params:
            p.grad = None
        sync = final or self.perturbation == "synced"
        with self._frozen_batchnorm(not at_theta), self._sync_context(sync), torch.enable_grad():
            loss = closure()
        if loss is None:
            raise TypeError("the closure must return the loss (a tensor) after calling backward")
        return torch.as_tensor(loss).detach()

    def _grads(self, params: list[Tensor], foreach: bool, *, take: bool) -> list[Tensor | None]:
        """The gradients of `params` (None where there is none), unscaled when loss scaling is on.

        With `take`, each gradient is detached from its parameter so that the next pass writes a
        fresh one while this one is kept: the kept list is a buffer, not a copy.
        """
        grads: list[Tensor | None] = [p.grad for p in params]
        if take:
            alias = bool(getattr(self.model, "gradient_as_bucket_view", False))
            for p in params:
                p.grad = None
            if alias:  # DDP would overwrite bucket views in the next pass
                grads = [g.clone() if g is not None else None for g in grads]
        if self.loss_scaler is not None:
            present = [g for g in grads if g is not None]
            if present:
                F.scale_(present, self.loss_scaler.inv_scale(present[0].dtype), foreach)
        return grads

    @staticmethod
    def _zero_like_norm(params: list[Tensor]) -> Tensor:
        if not params:
            return torch.zeros(())
        return torch.zeros((), device=params[0].device, dtype=params[0].dtype)

    def _norm(
        self, grads: list[Tensor | None], theta: list[Tensor], foreach: bool
    ) -> Tensor:
        """||T g|| over the parameters that have a gradient: T = |theta| when adaptive, else 1."""
        idx = [i for i, g in enumerate(grads) if g is not None]
        if not idx:
            return self._zero_like_norm(theta)
        weights = [theta[i] for i in idx] if self.adaptive else None
        return F.global_norm([grads[i] for i in idx], foreach, weights)

    def _plain_norm(self, grads: list[Tensor | None], norm: Tensor, foreach: bool) -> Tensor:
        """The plain 2-norm for the stats: the perturbation norm unless adaptive scaling is on."""
        present = [g for g in grads if g is not None]
        if not self.adaptive or not present:
            return norm
        return F.global_norm(present, foreach)

    def _perturb(
        self,
        params: list[Tensor],
        grads: list[Tensor | None],
        theta: list[Tensor],
        groups: list[dict[str, Any]],
        key: str,
        sign: float,
        norm: Tensor,
        foreach: bool,
    ) -> None:
        """params += sign * rho_group * T^2 g / (||T g|| + eps), consuming `grads` in place.

        Lists are aligned with `params`; parameters whose gradient is None are not touched.
        """
        denom = norm + self.eps
        # Group by group: the radius is a per-group hyper-parameter, the norm is global.
        by_group: dict[int, tuple[dict[str, Any], list[int]]] = {}
        for i, (g, group) in enumerate(zip(grads, groups)):
            if g is not None:
                by_group.setdefault(id(group), (group, []))[1].append(i)
        for group, idx in by_group.values():
            gs = [grads[i] for i in idx]
            if self.adaptive:
                F.scale_adaptive_(gs, [theta[i] for i in idx], foreach)
            F.scale_(gs, (sign * group[key]) / denom, foreach)
            F.add_([params[i] for i in idx], gs, foreach)

    @contextlib.contextmanager
    def _restore_on_error(self, params: list[Tensor], theta: list[Tensor], foreach: bool) -> Iterator[None]:
        """If a closure raises mid-step, put the parameters back at theta before re-raising."""
        try:
            yield
        except BaseException:
            F.copy_(params, theta, foreach)
            raise

    def _final_pass(self, closure: Closure, params: list[Tensor], check: list[Tensor], foreach: bool) -> None:
        """The last pass, at the fully perturbed point: its gradient stays in p.grad for the base
        optimizer (unscaled by `_grads` when loss scaling is on); its norm joins `check`."""
        self._run(closure, params, at_theta=False, final=True)
        if self.check_finite or self.loss_scaler is not None:
            final = [g for g in self._grads(params, foreach, take=False) if g is not None]
            check.append(F.global_norm(final, foreach) if final else torch.zeros_like(check[0]))

    def _finish(
        self,
        params: list[Tensor],
        theta: list[Tensor],
        check: list[Tensor],
        pass_names: tuple[str, ...],
        foreach: bool,
    ) -> None:
        """Restore theta bit for bit, then step the base optimizer unless a gradient was non-finite.

        `check` holds one 0-d norm per pass. Exactly one host sync reads them all (none when
        check_finite=False and there is no loss scaler).
        """
        F.copy_(params, theta, foreach)
        if self.loss_scaler is None and not self.check_finite:
            self.stats["skipped"] = torch.zeros((), device=check[0].device)
            self.base_optimizer.step()
            return
        # 1.0 where a pass's gradient norm is inf/NaN. Under DDP with local perturbations the
        # ranks still agree: a non-finite ascent gradient on one rank makes its perturbed
        # weights, hence its final gradient, non-finite, and the all-reduce spreads that.
        bad = (~torch.isfinite(torch.stack(check))).to(torch.float32)
        if self.loss_scaler is not None:
            found_inf = bad.amax() > 0
            self.loss_scaler.update(found_inf)
            self.stats["skipped"] = found_inf.to(torch.float32)
            if not bool(found_inf):  # the one sync: GradScaler makes the same one
                self.base_optimizer.step()
            return
        self.stats["skipped"] = torch.zeros((), device=check[0].device)
        flags = bad.tolist()  # the one sync
        if any(flags):
            name = pass_names[next(i for i, f in enumerate(flags) if f)]
            raise FloatingPointError(
                f"non-finite gradient in the pass {name}; the step was skipped, parameters are "
                f"back at theta and the base optimizer's state is untouched"
            )
        self.base_optimizer.step()
