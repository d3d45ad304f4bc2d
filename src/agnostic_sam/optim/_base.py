"""Bookkeeping shared by the optimizers: the wrapper around a base optimizer, closure passes,
BatchNorm statistics, DDP synchronization, clipping and the one host sync per step.

The arithmetic lives in `_functional.py`, loss scaling inside the step in `_scaling.py`, the
misuse checks (arguments, gradients present at step entry, the closure's scaling) in
`_checks.py`; the update rules in `plain.py`, `sam.py`, `agnostic_sam.py` and their siblings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import _checks, _contract, _flat, _passes, _scaling
from agnostic_sam.optim import _functional as F
from agnostic_sam.optim._checks import PERTURBATIONS, Closure
from agnostic_sam.optim._flat import Layout
from agnostic_sam.optim._pieces import StepPieces
from agnostic_sam.optim._watch import BackwardWatch

__all__ = ["PERTURBATIONS", "Closure", "SharpnessOptimizer"]


class SharpnessOptimizer(StepPieces, torch.optim.Optimizer):
    """A `torch.optim.Optimizer` that runs closure passes, possibly at perturbed weights, then
    lets a base optimizer step with the gradient of the last pass.

    The wrapper shares `param_groups` (and `state`) with `base_optimizer`, so schedulers and
    per-group settings act on both, and `state_dict()` is the base optimizer's (momentum, Adam
    moments, the radii stored in the groups) plus the `LossScaler` state under ``"loss_scaler"``.
    Between steps it keeps no state of its own, and p.grad is left empty after every step.
    """

    _radius_keys: tuple[str, ...] = ()
    # Under DDP, all-reduce every pass whatever `perturbation` says: for methods whose step
    # direction (GSAM, WSAM) or state kept across steps (Friendly-SAM, VaSSO) is made from the
    # gradient of a pass before the last, so that every rank steps alike and holds the same state.
    _sync_every_pass: bool = False
    # Buffers of parameter size alive during a step, beyond the base optimizer's state.
    _num_buffers: int = 0
    _pass_names: tuple[str, ...] = ()
    _supports_sparse: bool = True
    # torch.amp.GradScaler protocol: `scaler.step(opt, closure)` calls
    # `opt.step(closure, grad_scaler=scaler)`; the step unscales every pass itself.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        defaults: dict[str, Any],
        *,
        adaptive: bool,
        perturb_eps: float,
        model: nn.Module | None,
        perturbation: str,
        loss_scaler: LossScaler | None,
        check_finite: bool,
        perturb_foreach: bool | None,
        max_grad_norm: float | None,
        base_kwargs: dict[str, Any],
    ) -> None:
        _checks.check_options(
            base_optimizer,
            {key: defaults[key] for key in self._radius_keys},
            perturb_eps=perturb_eps,
            max_grad_norm=max_grad_norm,
            perturbation=perturbation,
            model=model,
            loss_scaler=loss_scaler,
        )
        self.adaptive = bool(adaptive)
        self.perturb_eps = float(perturb_eps)
        self.model = model
        self.perturbation = perturbation
        self.loss_scaler = loss_scaler
        self.check_finite = bool(check_finite)
        self.perturb_foreach = perturb_foreach
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.stats: dict[str, Tensor] = {}
        # True exactly while a closure runs at the unperturbed weights theta.
        self.at_theta = False
        self._grad_scaler: Any = None  # the torch.amp.GradScaler driving the current step
        self._watch = BackwardWatch()  # backward passes since the optimizer emptied p.grad
        self._layout_cache: Layout | None = None  # the param lists, cached per group structure
        self._grads_zeroed = False  # zero_grad(set_to_none=False) left zeros in p.grad
        self._scale_calls = 0  # loss_scaler.calls when the optimizer last cleared p.grad
        # Whether a GradScaler drove the step in which the closure's scaling was last checked.
        self._checked_driven: bool | None = None
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        _contract.without_global_step_hooks(self.base_optimizer)  # they fire for this step
        _contract.prefer_foreach(self.base_optimizer)  # same bits, half the base step's time
        self._share_base()
        self.defaults.update(self.base_optimizer.defaults)
        self._hook_params()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:  # GradScaler picks its protocol by step's signature
            _contract.step_signature(cls.__dict__["step"])

    def _patch_step_function(self) -> None:
        super()._patch_step_function()  # torch: the class's step runs the step hooks
        _contract.hooks_once_per_step(type(self))  # not again in super().step()

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and ``pickle``: everything but the per-parameter gradient hooks
        (rebuilt on the copy's parameters) and, as torch.optim does, the registered hooks."""
        if getattr(self, "_pending", None) is not None:
            raise RuntimeError(
                f"{type(self).__name__} cannot be copied between first_step() and "
                "second_step() (the weights are perturbed): call second_step() first"
            )
        skip = {"_watch", "_layout_cache", "_grad_scaler", "_in_step"}
        skip.update(k for k in self.__dict__ if k.startswith("_optimizer_") and k.endswith("hooks"))
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # torch.optim: empty hook dicts, the hooked step
        self._grad_scaler = None
        self._watch = BackwardWatch()
        self._layout_cache = None
        _contract.without_global_step_hooks(self.base_optimizer)
        self._share_base()
        self._hook_params()

    def _share_base(self) -> None:
        # One list of group dicts and one state for both: a scheduler attached to the wrapper
        # drives the base optimizer's lr, and opt.state[p] shows the momentum buffers.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def _hook_params(self) -> None:
        self._watch.attach(self._layout().params)

    def _layout(self) -> Layout:
        """The cached parameter lists (rebuilt when a group or a group's parameter list
        changes)."""
        cache = self._layout_cache
        if cache is None or cache.key != _flat.layout_key(self.param_groups):
            cache = self._layout_cache = Layout(self.param_groups)
            self._watch.attach(cache.params)
        return cache

    def __del__(self) -> None:
        watch = getattr(self, "_watch", None)
        if watch is not None:
            watch.detach()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in self._radius_keys:
            if key in param_group:
                _checks.check_radius(key, param_group[key])
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key in self._radius_keys:
            param_group.setdefault(key, self.defaults[key])
        self.base_optimizer.add_param_group(param_group)
        _contract.prefer_foreach(self.base_optimizer)
        self._hook_params()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._watch.reset()
        self._grads_zeroed = not set_to_none

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its param groups carry the radii too), plus
        ``"loss_scaler"``: the `LossScaler` state when there is one. Hooks registered with
        ``register_state_dict_pre_hook`` / ``_post_hook`` run as in torch.optim."""
        return _contract.run_state_dict_hooks(self, self._state_dict)

    def _state_dict(self) -> dict[str, Any]:
        state = self.base_optimizer.state_dict()
        if self.loss_scaler is not None:
            state["loss_scaler"] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this wrapper or of a plain base optimizer: radii missing from the
        saved groups keep this optimizer's values; a saved LossScaler state is restored when
        this optimizer has a loss scaler (a state dict without one loads too). Hooks registered
        with ``register_load_state_dict_pre_hook`` / ``_post_hook`` run as in torch.optim."""
        _contract.run_load_state_dict_hooks(self, state_dict, self._load_state_dict)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        scaler_state = state_dict.pop("loss_scaler", None)
        radii = [{k: g[k] for k in self._radius_keys if k in g} for g in self.param_groups]
        self.base_optimizer.load_state_dict(state_dict)
        _contract.prefer_foreach(self.base_optimizer)  # a plain optimizer's saved None
        self._share_base()
        for group, old in zip(self.param_groups, radii):
            for key in self._radius_keys:
                group.setdefault(key, old.get(key, self.defaults[key]))
        if scaler_state is not None and self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(scaler_state)

    def backward(self, loss: Tensor) -> None:
        """`loss.backward()`, through the loss scaler when there is one: call it in closures."""
        if self.loss_scaler is not None:
            self.loss_scaler.scale(loss).backward()
        else:
            loss.backward()

    def buffer_bytes(self) -> int:
        """Bytes of the parameter-sized buffers a step allocates beyond the base optimizer's
        state."""
        return self._num_buffers * sum(
            p.numel() * p.element_size() for g in self.param_groups for p in g["params"]
        )

    # ---- pieces used by the step functions -------------------------------------------------

    def _params(self) -> tuple[list[Tensor], list[dict[str, Any]]]:
        """All parameters, and for each its group (the radii are per group). The lists are
        cached (rebuilt when the groups change): read them, do not modify them."""
        layout = self._layout()
        return layout.params, layout.groups

    def _use_foreach(self, params: list[Tensor]) -> bool:
        if self.perturb_foreach is not None:
            return bool(self.perturb_foreach)
        # The multi-tensor ops run the same per-tensor kernels on the CPU (same bits), looped in
        # C++ instead of Python: faster everywhere.
        return bool(params)

    def _check_groups(self) -> None:
        _checks.check_groups(self.param_groups, self._radius_keys)

    def _begin(self, grad_scaler: Any) -> None:
        self._check_groups()
        _contract.check_not_skipped_by_wrapper(self)
        if grad_scaler is None and "grad_scale" in self.__dict__:
            grad_scaler = _contract.driving_grad_scaler(self)  # GradScaler's attribute protocol
        _checks.check_entry_scaler(self, grad_scaler)
        self._grad_scaler = grad_scaler
        self._layout().begin()  # also re-hooks the sentinels when the parameters changed

    def _end(self) -> None:
        """After every step (taken, skipped or failed): p.grad is left empty, so the next step
        never mistakes this step's gradients for gradients present at its entry."""
        self._grad_scaler = None
        self.at_theta = False
        for p in self._layout().params:
            p.grad = None
        self._watch.reset()
        self._grads_zeroed = False
        if self.loss_scaler is not None:
            self._scale_calls = self.loss_scaler.calls

    @contextlib.contextmanager
    def _stepping(self, grad_scaler: Any) -> Iterator[None]:
        self._begin(grad_scaler)
        try:
            yield
            # every pass of this step was watched
            self._checked_driven = self._grad_scaler is not None
        except BaseException:
            # GradScaler's attribute protocol deletes grad_scale / found_inf only after a step
            # that returns: a later direct step must not take them for this one's.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise
        finally:
            self._end()

    def _present_gradients(self, params: list[Tensor]) -> int:
        """The number of backward passes summed into the gradients found in p.grad at step entry
        (0: none). Zeros left by `zero_grad(set_to_none=False)` count as none."""
        return _checks.present_gradients(self, params)

    @contextlib.contextmanager
    def _frozen_batchnorm(self, freeze: bool) -> Iterator[None]:
        """While `freeze`, BatchNorm layers of `model` normalize with batch statistics as usual
        but leave running_mean, running_var and num_batches_tracked alone."""
        if not freeze or self.model is None:
            yield
            return
        with _passes.frozen_batchnorm(_passes.batchnorm_layers(self._layout(), self.model)):
            yield

    def _sync_context(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        return _passes.sync_context(self.model, sync)

    @staticmethod
    def _as_loss(loss: Any) -> Tensor:
        return _checks.as_loss(loss)

    def _run(
        self,
        closure: Closure,
        params: list[Tensor],
        *,
        at_theta: bool,
        final: bool,
        keep: bool = False,
    ) -> Tensor:
        """One pass: zero the gradients (unless `keep`), run the closure with grad enabled,
        return its loss.

        BatchNorm statistics move only in passes at theta; under DDP, a `local` perturbation keeps
        every pass but the final one free of communication (forward and backward in no_sync).
        """
        return _passes.run_pass(self, closure, params, at_theta=at_theta, final=final, keep=keep)

    @property
    def _scaled(self) -> bool:
        return self.loss_scaler is not None or self._grad_scaler is not None

    def _inv_scale(self, dtype: torch.dtype) -> Tensor | None:
        """1 / loss scale for this step (float64 reciprocal, then cast), None without scaling."""
        return _scaling.inv_scale(self.loss_scaler, self._grad_scaler, dtype)

    def _final_pass(
        self, closure: Closure, params: list[Tensor], check: list[Tensor], foreach: bool
    ) -> Tensor:
        """The last pass, at the fully perturbed point: its gradient stays in p.grad for the base
        optimizer; see `_final_gradients`."""
        loss = self._run(closure, params, at_theta=False, final=True)
        self._final_gradients(params, check, foreach)
        return loss

    def _transform_final(self, params: list[Tensor], foreach: bool) -> None:
        """Hook: turn the last pass's unscaled gradient in p.grad into the gradient the base
        optimizer steps with (before its norm check and clipping). The default keeps it."""

    def _final_gradients(
        self, params: list[Tensor], check: list[Tensor], foreach: bool, *, want_norm: bool = False
    ) -> Tensor | None:
        """Make p.grad the gradient the base optimizer steps with: unscaled (by a GradScaler's
        `unscale_`, which records its inf check for `scaler.update()`), its norm appended to
        `check`, then clipped to `max_grad_norm`. Returns the norm before clipping, if computed."""
        return _scaling.final_gradients(self, params, check, foreach, want_norm=want_norm)

    def _finish(
        self,
        params: list[Tensor],
        theta: list[Tensor] | None,
        check: list[Tensor],
        pass_names: tuple[str, ...],
        foreach: bool,
    ) -> None:
        """Restore theta bit for bit, then step the base optimizer unless a gradient was non-finite.

        `check` holds one 0-d norm per pass. Exactly one host sync reads them all (none when
        check_finite=False and there is no loss scaling).
        """
        if theta is not None:
            F.copy_(params, theta, foreach)
        _scaling.step_or_skip(self, params, check, pass_names)
