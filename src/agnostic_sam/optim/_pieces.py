"""The pieces a sharpness-aware step is made of, on lists aligned with the parameters: the
gradients of a pass, global norms, the dot product of two gradients, the copy of theta, the
perturbations. `SharpnessOptimizer` inherits them; the subclasses (`sam.py`, `agnostic_sam.py`,
...) compose their update rules from them. Each takes the flat fast path of `_flat.py` when it
applies and the per-tensor list path otherwise, with the same bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from agnostic_sam.optim import _flat, _scaling
from agnostic_sam.optim import _functional as F

__all__ = ["StepPieces"]


class StepPieces:
    """Mixed into `SharpnessOptimizer`: uses its `adaptive`, `perturb_eps`, `_layout()`."""

    adaptive: bool
    perturb_eps: float

    def _layout(self) -> Any:
        raise NotImplementedError

    def _grads(self, params: list[Tensor], foreach: bool, *, take: bool) -> list[Tensor | None]:
        """The gradients of `params` (None where there is none), unscaled when loss scaling is on.

        With `take`, each gradient is detached from its parameter so that the next pass writes a
        fresh one while this one is kept: the kept list is a buffer, not a copy.
        """
        return _scaling.gradients(self, params, foreach, take=take)

    @staticmethod
    def _zero_like_norm(params: list[Tensor]) -> Tensor:
        if not params:
            return torch.zeros(())
        return torch.zeros((), device=params[0].device, dtype=params[0].dtype)

    def _norm(
        self, grads: list[Tensor | None], theta: list[Tensor], foreach: bool
    ) -> Tensor:
        """||T g|| over the parameters that have a gradient: T = |theta| when adaptive, else 1."""
        return _flat.norm(self._layout(), grads, theta if self.adaptive else None, foreach)

    def _global_norm(
        self, tensors: list[Tensor], foreach: bool, weights: list[Tensor] | None = None
    ) -> Tensor:
        """`_functional.global_norm`, through the flat fast path when it applies (same bits)."""
        return _flat.global_norm(self._layout(), tensors, foreach, weights)

    def _dot(self, a: list[Tensor | None], b: list[Tensor | None], like: Tensor) -> Tensor:
        """<a, b> over the parameters where both have a gradient (0 like `like` where none)."""
        return _flat.dot(self._layout(), a, b, like)

    def _snapshot(self, params: list[Tensor], foreach: bool) -> list[Tensor]:
        """theta: a copy of `params` (one flat buffer when the fast path applies), restored
        bit for bit with `_functional.copy_`."""
        theta = _flat.snapshot(self._layout(), params)
        return theta if theta is not None else [p.detach().clone() for p in params]

    def _plain_norm(self, grads: list[Tensor | None], norm: Tensor, foreach: bool) -> Tensor:
        """The plain 2-norm for the stats: the perturbation norm unless adaptive scaling is on."""
        if not self.adaptive:
            return norm
        present = grads if isinstance(grads, _flat.Checked) else [g for g in grads if g is not None]
        return self._global_norm(present, foreach) if present else norm

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
        _flat.perturb(self._layout(), params, grads, theta if self.adaptive else None, groups,
                      key, sign, norm + self.perturb_eps, foreach)

    def _ascend_from_theta(
        self,
        params: list[Tensor],
        theta: list[Tensor],
        grads: list[Tensor | None],
        groups: list[dict[str, Any]],
        key: str,
        foreach: bool,
    ) -> tuple[Tensor, Tensor]:
        """`_norm`, `_plain_norm`, then `_perturb_from_theta` with sign +1, the parameters at
        theta: (||T g||, ||g||). One flat copy of the gradients serves all three on the fast
        path (same bits)."""
        fast = _flat.ascend(self._layout(), params, theta, grads, groups, key, self.perturb_eps,
                            (lambda flat: flat) if self.adaptive else None)
        if fast is not None:
            return fast
        norm = self._norm(grads, theta, foreach)
        plain = self._plain_norm(grads, norm, foreach)
        self._perturb_from_theta(params, theta, groups, [(grads, key, 1.0, norm)], foreach)
        return norm, plain

    def _perturb_from_theta(
        self,
        params: list[Tensor],
        theta: list[Tensor],
        groups: list[dict[str, Any]],
        terms: list[tuple[list[Tensor | None], str, float, Tensor]],
        foreach: bool,
    ) -> None:
        """`_perturb` for each (grads, key, sign, norm) of `terms` in order, when the parameters
        are at theta: the same bits, with one copy into the parameters on the fast path."""
        eps = self.perturb_eps
        fast = [(g, key, sign, norm + eps) for g, key, sign, norm in terms]
        if _flat.from_theta(self._layout(), params, theta, groups, fast, self.adaptive):
            return
        for grads, key, sign, norm in terms:
            self._perturb(params, grads, theta, groups, key, sign, norm, foreach)

    def _perturb_keeping(
        self,
        params: list[Tensor],
        theta: list[Tensor],
        grads: list[Tensor | None],
        groups: list[dict[str, Any]],
        key: str,
        norm: Tensor,
        foreach: bool,
    ) -> list[Tensor | None]:
        """`_perturb_from_theta` with sign +1 (the parameters at theta), returning the gradients
        as they were: `grads` itself on the fast path (it reads them), a copy made before the
        list path consumes them otherwise. Same bits either way."""
        terms = [(grads, key, 1.0, norm + self.perturb_eps)]
        if _flat.from_theta(self._layout(), params, theta, groups, terms, self.adaptive):
            return grads
        kept = [g.clone() if g is not None else None for g in grads]
        self._perturb(params, grads, theta, groups, key, 1.0, norm, foreach)
        return kept

    @contextlib.contextmanager
    def _restore_on_error(
        self, params: list[Tensor], theta: list[Tensor], foreach: bool
    ) -> Iterator[None]:
        """If a closure raises mid-step, put the parameters back at theta before re-raising."""
        try:
            yield
        except BaseException:
            F.copy_(params, theta, foreach)
            raise
