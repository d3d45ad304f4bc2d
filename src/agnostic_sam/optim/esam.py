"""ESAM (Du et al., "Efficient Sharpness-aware Minimization for Improved Training of Neural
Networks", ICLR 2022; github.com/dydjw9/Efficient_SAM)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim._base import SharpnessOptimizer
from agnostic_sam.optim._settings import Setting

__all__ = ["ESAM", "PerSampleClosure"]

# closure(index=None, backward=True) -> per-sample losses, shape (n,), detached: forward on the
# batch (or its samples `index`, a 1-D LongTensor), opt.backward(mean loss) when `backward`.
PerSampleClosure = Callable[..., Tensor]


class ESAM(SharpnessOptimizer):
    r"""Efficient SAM: stochastic weight perturbation and sharpness-sensitive data selection.

    The closure protocol is ``closure(index=None, backward=True)`` (the record's
    ``closure="per-sample"``): forward on the batch B (or its samples ``index``, a 1-D
    LongTensor), ``opt.backward(mean loss)`` when ``backward``, and return the per-sample losses
    l(x) (detached, shape (n,)). Each step, with g(.) the gradient of the mean loss:

    1. at theta, on B, only the tensors kept this step (set S) have a gradient:
       g_S = g(theta) restricted to S, and l_0(x) per sample
    2. e = rho g_S / (beta (||g_S|| + eps)) on S, 0 elsewhere (Algorithm 1: SWP)
    3. at theta + e, without gradient, on B: l_1(x); the sharpness of x is l_1(x) - l_0(x)
    4. at theta + e, on the m = max(1, floor(gamma n)) samples B+ of largest sharpness
       (Algorithm 1: SDS; all of B when m = n): g(theta + e) on B+

    then the base optimizer steps at theta (restored bit for bit) with g(theta + e) on B+.
    The set S is drawn for the next step, as the authors' ``second_step`` does: after the last
    pass, one u ~ U[0, 1) per parameter with a gradient in it (param-group order, from a CPU
    ``torch.Generator`` seeded with ``seed``; none when beta = 1); it is kept in S next step iff
    u < beta (a tensor without a gradient in that pass is left out). Every tensor is in S at
    the first step. Tensors outside S get no gradient in pass 1 (``requires_grad`` is off during
    it, as in the authors' code, which saves their backward work). A step with S empty runs pass
    1 without backward and perturbs nothing. S and the generator's state travel in
    ``state_dict()`` (``esam_keep``, ``esam_generator``). ``rho`` lives in the param groups.

    The authors select ``sharpness > (the m-th largest)``, m - 1 samples without ties; here it
    is the m largest exactly. The cost is 1 + 1 (no backward) + gamma passes over B. BatchNorm
    statistics move only in pass 1 with ``model=``. Under DDP with ``perturbation="synced"`` and
    beta < 1 the model needs ``find_unused_parameters=True`` (pass 1 leaves tensors out).
    One parameter-sized buffer (theta) lives during a step.
    """

    SETTINGS = (
        Setting("rho", float, 0.05, "radius of the ascent step", low=0.0,
                grid=(0.05, 0.1, 0.2, 0.4), per_group=True),
        Setting("beta", float, 0.6, "probability that a tensor is perturbed (SWP)", low=0.0,
                high=1.0, low_open=True),
        Setting("gamma", float, 0.5, "fraction of the batch in the final pass (SDS)", low=0.0,
                high=1.0, low_open=True),
    )
    # Reads of host data per step besides the finiteness check: the CPU generator's draws of
    # which tensors the next step perturbs (they decide requires_grad; no device sync).
    _host_reads_per_step = 1
    _radius_keys = ("rho",)
    _num_buffers = 1
    _pass_names = ("at theta", "at theta + e on the sharpest samples")

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        beta: float = 0.6,
        gamma: float = 0.5,
        seed: int = 0,
        perturb_eps: float = 1e-12,
        model: nn.Module | None = None,
        perturbation: str = "local",
        loss_scaler: LossScaler | None = None,
        check_finite: bool = True,
        perturb_foreach: bool | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.beta = self.SETTINGS[1].check(beta)
        self.gamma = self.SETTINGS[2].check(gamma)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"invalid seed={seed!r}: must be an int")
        super().__init__(
            params, base_optimizer, {"rho": rho}, adaptive=False, perturb_eps=perturb_eps,
            model=model, perturbation=perturbation, loss_scaler=loss_scaler,
            check_finite=check_finite, perturb_foreach=perturb_foreach,
            max_grad_norm=max_grad_norm, base_kwargs=base_kwargs,
        )
        self._generator = torch.Generator().manual_seed(seed)
        # Positions (in param-group order) of the tensors outside S for the next step: indices,
        # not ids, so that a deep copy or a loaded state dict means the same tensors.
        self._left_out: set[int] = set()

    # ---- state -------------------------------------------------------------------------

    def _state_dict(self) -> dict[str, Any]:
        state = super()._state_dict()
        params, _ = self._params()
        state["esam_keep"] = [i not in self._left_out for i in range(len(params))]
        state["esam_generator"] = self._generator.get_state()
        return state

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        keep = state_dict.pop("esam_keep", None)
        gen = state_dict.pop("esam_generator", None)
        super()._load_state_dict(state_dict)
        params, _ = self._params()
        if keep is not None:
            if len(keep) != len(params):
                raise ValueError(f"the saved ESAM state has {len(keep)} parameters, this "
                                 f"optimizer {len(params)}: load it into the same parameters")
            self._left_out = {i for i, k in enumerate(keep) if not k}
        if gen is not None:
            self._generator.set_state(gen.clone())

    # ---- the step ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _only_kept(self, params: list[Tensor]) -> Iterator[None]:
        """requires_grad off for the tensors outside S (and back on afterwards). Under DDP with
        a synchronized first pass, DDP's reducer needs every gradient: they are computed, all-
        reduced and then dropped, the same step at the cost of the authors' saving."""
        if getattr(self.model, "no_sync", None) is not None and self.perturbation == "synced":
            yield
            for i in self._left_out:
                params[i].grad = None
            return
        off = [p for i, p in enumerate(params) if i in self._left_out and p.requires_grad]
        try:
            for p in off:
                p.requires_grad_(False)
            yield
        finally:
            for p in off:
                p.requires_grad_(True)

    def _losses(self, out: Any, what: str) -> Tensor:
        if not isinstance(out, Tensor) or out.dim() != 1:
            raise ValueError(f"ESAM's closure must return the per-sample losses (shape (n,)) "
                             f"{what}, got {type(out).__name__} of shape "
                             f"{tuple(getattr(out, 'shape', ()))}: see ESAM's closure protocol")
        return out.detach()

    @torch.no_grad()
    def step(self, closure: PerSampleClosure | None = None, *, grad_scaler: Any = None) -> Tensor:  # type: ignore[override]
        """One ESAM step; returns the mean loss at theta over B, detached."""
        if not callable(closure):
            raise TypeError("ESAM.step(closure) needs a per-sample closure: closure(index=None, "
                            "backward=True) returning the per-sample losses (see ESAM)")
        with self._stepping(grad_scaler):
            params, groups = self._params()
            foreach = self._use_foreach(params)
            if self._present_gradients(params):
                raise RuntimeError("ESAM found gradients in p.grad at step entry: call "
                                   "opt.zero_grad() before, and backward only inside the closure")
            before, norm, theta = self._ascend(closure, params, groups, foreach)
            check = [norm]
            with self._restore_on_error(params, theta, foreach):
                index = self._sharpest(closure, before)
                self._final_pass(lambda: self._losses(closure(index=index), "at theta + e")
                                 .mean(), params, check, foreach)
                self._draw_kept(params)
            loss = before.mean()
            self.stats = {"loss_train": loss, "grad_norm_train": norm}
            self._finish(params, theta, check, self._pass_names, foreach)
        return loss

    def _ascend(self, closure: PerSampleClosure, params: list[Tensor],
                groups: list[dict[str, Any]], foreach: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Pass 1 at theta on S, then theta -> theta + e. Returns (l_0, ||g_S||, theta)."""
        box: dict[str, Tensor] = {}
        backward = any(p.requires_grad and i not in self._left_out for i, p in enumerate(params))

        def first() -> Tensor:
            box["l0"] = self._losses(closure(index=None, backward=backward), "at theta")
            return box["l0"].mean()

        with self._only_kept(params):
            self._run(first, params, at_theta=True, final=False)
        theta = self._snapshot(params, foreach)
        grads = self._grads(params, foreach, take=True)
        norm = self._norm(grads, theta, foreach)
        # e = rho g_S / (beta (||g_S|| + eps)): the tensors outside S have no gradient here.
        self._perturb(params, grads, theta, groups, "rho", 1.0 / self.beta, norm, foreach)
        return box["l0"], norm, theta

    def _sharpest(self, closure: PerSampleClosure, before: Tensor) -> Tensor | None:
        """The gradient-free pass at theta + e; the m samples of largest l_1 - l_0, in batch
        order (None: all of B)."""
        n = before.shape[0]
        m = max(1, math.floor(round(self.gamma * n, 9)))  # round: 0.29 * 100 is 28.999...
        with self._frozen_batchnorm(True), self._sync_context(False), torch.no_grad():
            after = self._losses(closure(index=None, backward=False), "without backward")
        if after.shape != before.shape:
            raise ValueError(f"ESAM's closure returned {after.shape[0]} losses at theta + e and "
                             f"{n} at theta: return one loss per sample of the batch")
        if m >= n:
            return None
        top = torch.topk(after - before.to(after.device), m, sorted=False).indices
        return torch.sort(top).values

    def _draw_kept(self, params: list[Tensor]) -> None:
        """S of the next step: each tensor with a gradient now is kept iff u < beta."""
        if self.beta >= 1.0:
            self._left_out = set()
            return
        drawn = [i for i, p in enumerate(params) if p.grad is not None]
        # A CPU generator: reading the draws is no device synchronization.
        u = torch.rand(len(drawn), generator=self._generator, dtype=torch.float64).tolist()
        # A tensor without a gradient now counts as left out (so pass 1 skips its backward
        # when no tensor that had a gradient is kept).
        self._left_out = set(range(len(params))) - {i for i, ui in zip(drawn, u)
                                                    if ui < self.beta}
