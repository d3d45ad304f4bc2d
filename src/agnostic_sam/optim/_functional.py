"""The arithmetic of the sharpness-aware steps, apart from the bookkeeping.

Every function takes plain lists of tensors and comes in two equal forms: a multi-tensor path
(`torch._foreach_*`, one kernel launch per op for the whole list) and a per-tensor loop. A
float64 parity test keeps them equal. Scalars that depend on gradient norms stay 0-d tensors on
the device, so nothing here synchronizes with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["global_norm", "scale_", "scale_adaptive_", "add_", "copy_", "dot", "perturb_"]


def global_norm(
    tensors: list[Tensor], foreach: bool, weights: list[Tensor] | None = None
) -> Tensor:
    """The 2-norm of the concatenation of `tensors` (each multiplied by |weights| when given).

    With weights this is Adaptive-SAM's ||T_theta g|| with T_theta = |theta| element-wise.
    Returns a 0-d tensor on the first tensor's device, in its dtype.
    """
    if not tensors:
        raise ValueError("global_norm of an empty list")
    device = tensors[0].device
    if weights is not None:
        # ||T g|| = ||theta * g||: the sign of theta does not change the norm. One tensor at a time
        # so the temporary is one tensor, never a parameter-sized list.
        norms = [(w * t).norm() for w, t in zip(weights, tensors)]
    elif foreach:
        norms = list(torch._foreach_norm(tensors))
    else:
        norms = [t.norm() for t in tensors]
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def scale_(tensors: list[Tensor], factor: Tensor, foreach: bool) -> None:
    """tensors <- factor * tensors, in place (`factor` a 0-d tensor)."""
    if foreach:
        torch._foreach_mul_(tensors, factor)
    else:
        for t in tensors:
            t.mul_(factor)


def scale_adaptive_(tensors: list[Tensor], theta: list[Tensor], foreach: bool) -> None:
    """tensors <- T_theta^2 * tensors with T_theta = |theta|, i.e. multiplied by theta twice."""
    if foreach:
        torch._foreach_mul_(tensors, theta)
        torch._foreach_mul_(tensors, theta)
    else:
        for t, w in zip(tensors, theta):
            t.mul_(w).mul_(w)


def add_(params: list[Tensor], deltas: list[Tensor], foreach: bool) -> None:
    """params <- params + deltas, in place."""
    if foreach:
        torch._foreach_add_(params, deltas)
    else:
        for p, d in zip(params, deltas):
            p.add_(d)


def perturb_(
    params: list[Tensor],
    grads: list[Tensor],
    theta: list[Tensor] | None,
    radius: float,
    denom: Tensor,
    foreach: bool,
) -> None:
    """params <- params + radius * T^2 g / denom, consuming `grads` in place.

    `denom` is the 0-d ||T g|| + eps; T = |theta| element-wise when `theta` is given
    (Adaptive-SAM), else 1. `radius` carries the sign (rho, or -rho for a descent term).
    """
    if theta is not None:
        scale_adaptive_(grads, theta, foreach)
    scale_(grads, radius / denom, foreach)
    add_(params, grads, foreach)


def copy_(dst: list[Tensor], src: list[Tensor], foreach: bool) -> None:
    """dst <- src bit for bit, in place (the restore to theta)."""
    if foreach:
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Sum over the lists of the element-wise products: <a, b> as one 0-d tensor.

    One `torch.dot` per tensor pair: no parameter-sized temporary (a foreach multiply would
    allocate one, a third buffer beyond the two the optimizers are allowed).
    """
    if not a:
        raise ValueError("dot of empty lists")
    device = a[0].device
    parts = [torch.dot(x.reshape(-1), y.reshape(-1)).to(device) for x, y in zip(a, b)]
    return torch.stack(parts).sum()
