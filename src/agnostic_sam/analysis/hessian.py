"""Curvature of the loss at the trained weights: top Hessian eigenvalues and the Hessian trace.

The paper (Sec. 5.3) reports the maximum Hessian eigenvalue ("on the log scale", i.e. its
natural logarithm) of the final model as evidence of a flat minimum. Both quantities here use
only Hessian-vector products, computed by double backward, never the dense Hessian:

    H v = d/dtheta ( grad_theta L(theta) . v ),     L(theta) = (1/N) sum_b n_b L_b(theta),

where L_b is the mean loss of batch b (n_b examples, N in all). The model is evaluated in eval
mode (dropout off, BatchNorm on running statistics) and left exactly as found; see
`agnostic_sam.analysis.common.evaluation_state`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from agnostic_sam.analysis.common import (
    Batch,
    LossFn,
    check_count,
    check_real,
    check_seed,
    evaluation_state,
    materialize_batches,
    mean_loss,
    trainable_parameters,
)

__all__ = ["MAX_EIGENVALUES", "MAX_ITERATIONS", "hessian_trace", "hessian_vector_product",
           "top_eigenvalues"]

# Bounds past any use (each iteration or sample is one Hessian-vector product over the batches):
# a larger value is a typo, refused before the first pass.
MAX_EIGENVALUES = 1_000
MAX_ITERATIONS = 10**6


def _hvp(model: nn.Module, loss_fn: LossFn, batches: list[Batch], params: list[nn.Parameter],
         vector: list[Tensor]) -> list[Tensor]:
    """H v of the mean loss, one double backward per batch, summed with weights n_b / N."""
    out = [torch.zeros_like(p) for p in params]
    for loss, weight in mean_loss(model, loss_fn, batches):
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        # g . v over the parameters that the loss depends on (a parameter the loss is linear in
        # has a gradient without a graph: it contributes nothing to H v).
        terms = [(g * v).sum() for g, v in zip(grads, vector) if g is not None and g.requires_grad]
        if not terms:
            continue
        hv = torch.autograd.grad(torch.stack(terms).sum(), params, allow_unused=True)
        for acc, h in zip(out, hv):
            if h is not None:
                acc.add_(h.detach(), alpha=weight)
    return out


def hessian_vector_product(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch],
                           vector: list[Tensor]) -> list[Tensor]:
    """H v for the mean loss over `batches`; `vector` is one tensor per trainable parameter."""
    params = trainable_parameters(model)
    if len(vector) != len(params) or any(v.shape != p.shape for v, p in zip(vector, params)):
        raise ValueError("vector must hold one tensor per trainable parameter, with its shape")
    with evaluation_state(model):
        kept = materialize_batches(model, batches)
        return _hvp(model, loss_fn, kept, params, [v.to(p) for v, p in zip(vector, params)])


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b)]).sum()


def _orthonormalize(v: list[Tensor], basis: list[list[Tensor]]) -> list[Tensor]:
    """Remove the components of v along the (orthonormal) basis, then scale v to unit norm."""
    for u in basis:
        c = _dot(u, v)
        v = [x - c * y for x, y in zip(v, u)]
    norm = _dot(v, v).sqrt()
    return [x / norm for x in v]


def top_eigenvalues(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], k: int = 1,
                    iters: int = 100, tol: float = 1e-4, seed: int = 0,
                    progress: bool = False) -> list[float]:
    """The k largest-MAGNITUDE eigenvalues of the Hessian of the mean loss, by power iteration.

    For i = 1..k, from a Gaussian start v (seeded), repeat at most `iters` times:

        w = H v - sum_{j<i} (u_j . H v) u_j        (deflation against found eigenvectors u_j)
        lambda = v . H v                           (Rayleigh quotient)
        v = w / ||w||

    stopping when |lambda - lambda_prev| <= tol * |lambda|. Power iteration converges to the
    eigenvalue of largest |lambda| (rate |lambda_2 / lambda_1| per step), so a result can be
    NEGATIVE when the Hessian has a large negative eigenvalue (away from a minimum), and two
    eigenvalues of equal magnitude and opposite sign do not separate. The list is in the order
    found, which is by decreasing magnitude. Computed in the model's dtype, on its device, over
    its trainable parameters, with the model in eval mode (restored afterwards).

    Args:
        batches: (inputs, targets) pairs, a list or a DataLoader; read once and kept in memory.
        loss_fn: `loss_fn(model(inputs), targets)` is the mean loss of the batch.
    """
    check_count("k", k, 1, MAX_EIGENVALUES)
    check_count("iters", iters, 1, MAX_ITERATIONS)
    check_real("tol", tol, 0.0)
    check_seed(seed)
    params = trainable_parameters(model)
    if k > sum(p.numel() for p in params):
        raise ValueError(f"k={k} exceeds the number of trainable parameters")
    generator = torch.Generator().manual_seed(seed)
    eigenvalues: list[float] = []
    eigenvectors: list[list[Tensor]] = []
    with evaluation_state(model):
        kept = materialize_batches(model, batches)
        bar = tqdm(total=k * iters, desc="hessian eigenvalues", disable=not progress, leave=False)
        for _ in range(k):
            # Drawn on the CPU so a seed gives the same start on every device.
            v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
                 for p in params]
            v = _orthonormalize(v, eigenvectors)
            value = None
            for _ in range(iters):
                hv = _hvp(model, loss_fn, kept, params, v)
                new_value = float(_dot(v, hv))
                bar.update(1)
                w = _orthonormalize(hv, eigenvectors)
                if not torch.isfinite(_dot(w, w)):
                    # H v vanished (H = 0 on the remaining subspace): v is an eigenvector of 0,
                    # and new_value = v . H v = 0 already.
                    break
                v = w
                converged = value is not None and abs(new_value - value) <= tol * abs(new_value)
                value = new_value
                if converged:
                    break
            eigenvalues.append(float(new_value))
            eigenvectors.append(v)
        bar.close()
    return eigenvalues


def hessian_trace(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], samples: int = 100,
                  seed: int = 0, progress: bool = False) -> float:
    """Hutchinson's estimate of tr(H) = E[z^T H z] with Rademacher z (entries +-1, prob. 1/2).

    Returns the mean of z^T H z over `samples` draws; its variance per draw is
    2 sum_{i != j} H_ij^2, so it is exact when H is diagonal. Same conventions as
    `top_eigenvalues` (eval mode, trainable parameters, model restored).
    """
    check_count("samples", samples, 1, MAX_ITERATIONS)
    check_seed(seed)
    params = trainable_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with evaluation_state(model):
        kept = materialize_batches(model, batches)
        for _ in tqdm(range(samples), desc="hessian trace", disable=not progress, leave=False):
            z = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p) for p in params]
            total += float(_dot(z, _hvp(model, loss_fn, kept, params, z)))
    return total / samples
