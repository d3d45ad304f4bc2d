"""ASAM as its authors wrote it (Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for
Scale-Invariant Learning of Deep Neural Networks", ICML 2021; github.com/SamsungLabs/ASAM)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import _flat
from agnostic_sam.optim._settings import Setting
from agnostic_sam.optim.sam import SAM

__all__ = ["KwonASAM"]


class KwonASAM(SAM):
    r"""Adaptive SAM with the authors' normalization operator, wrapping any `torch.optim` optimizer.

    Each step runs the closure twice on the same mini-batch B, with g(.) = grad L_B(.):

    1. at theta:        g = g(theta)
    2. at theta + e:    e = rho T^2 g / (||T g|| + eps)   (Eq. 11 of the paper, with p = 2)

    with the element-wise operator T = |w| + eta for parameters whose name contains ``"weight"``
    and T = 1 for the others (biases), as in the authors' ``ascent_step``. The base optimizer then
    steps at theta (restored bit for bit) with g(theta + e). ``rho`` (default 0.5, the authors'
    ASAM default) lives in the param groups; ``eta`` (default 0.01) is one value.

    The names come from the param groups (``model.named_parameters()`` passed as ``params``) or
    from ``model=``; a parameter without a name is refused. ``SAM(adaptive=True)`` stays the
    davda54 form (T = |w| for every parameter, no eta). Other options act as in `SAM`, including
    its ``first_step`` / ``second_step`` forms. One parameter-sized buffer (theta) lives during a
    step; T is formed one tensor at a time.
    """

    SETTINGS = (
        Setting("rho", float, 0.5, "radius of the ascent step in the T-scaled norm", low=0.0,
                grid=(0.25, 0.5, 1.0, 2.0), per_group=True),
        Setting("eta", float, 0.01, "T = |w| + eta for weights (keeps T > 0 where w = 0)",
                low=0.0),
    )
    _pass_names = ("at theta", "at theta + e")

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.5,
        eta: float = 0.01,
        perturb_eps: float = 1e-12,
        model: nn.Module | None = None,
        perturbation: str = "local",
        loss_scaler: LossScaler | None = None,
        check_finite: bool = True,
        perturb_foreach: bool | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.eta = self.SETTINGS[1].check(eta)
        super().__init__(
            params, base_optimizer, rho=rho, adaptive=False, perturb_eps=perturb_eps,
            model=model, perturbation=perturbation, loss_scaler=loss_scaler,
            check_finite=check_finite, perturb_foreach=perturb_foreach,
            max_grad_norm=max_grad_norm, **base_kwargs,
        )
        self._is_weight: dict[int, bool] = {}  # id(p) -> whether its name contains "weight"
        # (layout, flat mask of the elements of parameters that are not weights: T = 1 there)
        self._not_weight: tuple[Any, Tensor] | None = None
        self._weight_flags(self._params()[0])  # refuse unnamed parameters now, in one line

    def _weight_flags(self, params: list[Tensor]) -> list[bool]:
        """For each parameter: True where its name contains "weight" (T = |w| + eta)."""
        missing = [p for p in params if id(p) not in self._is_weight]
        if missing:
            names: dict[int, str] = {}
            if self.model is not None:
                names.update((id(p), n) for n, p in self.model.named_parameters())
            for group in self.param_groups:
                names.update(zip(map(id, group["params"]), group.get("param_names", ())))
            unnamed = [p for p in missing if id(p) not in names]
            if unnamed:
                raise ValueError(
                    f"KwonASAM needs each parameter's name (T = |w| + eta where it contains "
                    f"'weight'), {len(unnamed)} have none: pass model=, or "
                    "model.named_parameters() as params"
                )
            self._is_weight.update((id(p), "weight" in names[id(p)]) for p in missing)
        return [self._is_weight[id(p)] for p in params]

    def _ascend(
        self, params: list[Tensor], groups: list[dict[str, Any]], foreach: bool
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """From g(theta) in p.grad: keep theta, move to theta + rho T^2 g / (||T g|| + eps).
        Returns (theta, check, ||g||)."""
        theta = self._snapshot(params, foreach)  # restored bit for bit
        grads = self._grads(params, foreach, take=True)
        flags = self._weight_flags(params)
        fast = _flat.ascend(self._layout(), params, theta, grads, groups, "rho",
                            self.perturb_eps, lambda flat: self._t_flat(flat, params, flags))
        if fast is not None:
            return theta, [fast[0]], fast[1]
        present = [(i, g) for i, g in enumerate(grads) if g is not None]
        if not present:
            zero = self._zero_like_norm(theta)
            return theta, [zero], zero
        eta = self.eta

        def t_of(i: int) -> Tensor | None:  # T of parameter i, one tensor at a time (None: 1)
            return theta[i].abs().add_(eta) if flags[i] else None

        parts, plain = [], []
        for i, g in present:
            t = t_of(i)
            parts.append((g * t).norm() if t is not None else g.norm())
            plain.append(g.norm())
        norm = torch.linalg.vector_norm(torch.stack(parts))  # ||T g||
        grad_norm = torch.linalg.vector_norm(torch.stack(plain))  # ||g||, for the stats
        for i, g in present:
            t = t_of(i)
            if t is not None:
                g.mul_(t).mul_(t)
            # e = rho_group T^2 g / (||T g|| + eps); the weights move to theta + e
            params[i].add_(g.mul_(groups[i]["rho"] / (norm + self.perturb_eps)))
        return theta, [norm], grad_norm

    def _t_flat(self, theta: Tensor, params: list[Tensor], flags: list[bool]) -> Tensor:
        """T on the flat buffers (`_flat.ascend`): |theta| + eta for weights, 1 for the others
        (g * 1 = g exactly: the bits of the loop, which multiplies those by nothing)."""
        layout = self._layout()
        if self._not_weight is None or self._not_weight[0] is not layout:
            mask = torch.empty(layout.total, dtype=torch.bool)
            offset = 0
            for i in layout.order:  # the packed order: tensor after tensor
                n = params[i].numel()
                mask[offset:offset + n] = not flags[i]
                offset += n
            self._not_weight = (layout, mask)
        t = layout.slot(2).flat
        torch.abs(theta, out=t)
        return t.add_(self.eta).masked_fill_(self._not_weight[1], 1.0)
