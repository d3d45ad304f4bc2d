"""Loss landscapes around the trained weights along filter-normalized random directions.

Li et al. (2018), "Visualizing the Loss Landscape of Neural Nets": plot

    f(alpha)       = L(theta + alpha d)                  (1-D, `loss_line`)
    f(alpha, beta) = L(theta + alpha d1 + beta d2)       (2-D, `loss_surface`)

for Gaussian directions d rescaled filter by filter, so that the picture does not depend on the
scale of the weights (a ReLU network with weights multiplied by 10 computes the same function,
but would look 10x flatter along raw Gaussian directions). With filter normalization, for every
weight tensor with dim > 1 and every filter i (slice along dim 0):

    d[i] <- d[i] * ||theta[i]|| / ||d[i]||,

and d = 0 on tensors with dim <= 1 (biases, BatchNorm/LayerNorm scales and shifts), which are
left at their trained values. The paper's Figures 2-3 are such 2-D surfaces of SGD, SAM and
Agnostic-SAM models.

The model is evaluated in eval mode (dropout off, BatchNorm on running statistics). Its weights
are saved and copied back in place afterwards (bit-exact), and its modes, `.grad` fields and
buffers are restored: see `agnostic_sam.analysis.common.evaluation_state`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

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

__all__ = ["MAX_STEPS", "grid", "loss_line", "loss_surface", "random_direction"]

# Grid points per axis: a surface costs MAX_STEPS**2 passes over the batches at most.
MAX_STEPS = 1_001


def random_direction(model: nn.Module, generator: torch.Generator,
                     filter_normalize: bool = True) -> list[Tensor]:
    """One Gaussian direction, one tensor per trainable parameter, filter-normalized by default.

    Drawn on the CPU from `generator` (so a seed gives the same draw on any device and for any
    two models of the same architecture: side-by-side plots share their directions up to the
    per-filter scaling), then moved to each parameter's device and dtype. Without
    `filter_normalize` the raw N(0, 1) direction is returned, biases included.
    """
    direction = []
    for p in trainable_parameters(model):
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        weight = p.detach().to("cpu", torch.float64)
        if filter_normalize:
            if p.dim() <= 1:
                d.zero_()
            else:
                # Norms per filter, shape (out, 1, 1, ...) so they broadcast over the filter.
                shape = (p.shape[0],) + (1,) * (p.dim() - 1)
                w_norm = weight.flatten(1).norm(dim=1).view(shape)
                d_norm = d.flatten(1).norm(dim=1).view(shape)
                d = d * (w_norm / d_norm.clamp_min(1e-30))
        direction.append(d.to(device=p.device, dtype=p.dtype))
    return direction


def grid(steps: int, span: float) -> list[float]:
    """`steps` evenly spaced points in [-span, span]; with odd
    `steps` the middle one is exactly 0."""
    check_count("steps", steps, 2, MAX_STEPS)
    check_real("span", span, 0.0, low_open=True)
    # 2 i / (steps - 1) - 1 is exactly 0.0 at i = (steps - 1) / 2, unlike torch.linspace.
    return [span * (2.0 * i / (steps - 1) - 1.0) for i in range(steps)]


def _evaluate(model: nn.Module, loss_fn: LossFn, batches: list[Batch]) -> float:
    with torch.no_grad():
        return float(sum(float(loss) * weight
                         for loss, weight in mean_loss(model, loss_fn, batches)))


def _scan(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], directions: int,
          coordinates: Sequence[tuple[float, ...]], seed: int, filter_normalize: bool,
          progress: bool) -> list[float]:
    """The mean loss at theta + sum_k c_k d_k for every coordinate tuple c, model restored."""
    check_seed(seed)
    params = trainable_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    dirs = [random_direction(model, generator, filter_normalize) for _ in range(directions)]
    saved = [p.detach().clone() for p in params]
    losses = []
    with evaluation_state(model):
        kept = materialize_batches(model, batches)
        try:
            for coords in tqdm(coordinates, desc="loss landscape", disable=not progress,
                               leave=False):
                with torch.no_grad():
                    # From the saved copy each time: no drift from repeated add/subtract.
                    for i, p in enumerate(params):
                        point = saved[i].clone()
                        for c, d in zip(coords, dirs):
                            point.add_(d[i], alpha=c)
                        p.copy_(point)
                losses.append(_evaluate(model, loss_fn, kept))
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
    return losses


def loss_line(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], *, steps: int = 21,
              span: float = 1.0, seed: int = 0, filter_normalize: bool = True,
              progress: bool = False) -> dict[str, Any]:
    """Mean loss along one random direction: {"alphas": [steps], "loss": [steps], settings...}.

    `loss[i]` = L(theta + alphas[i] d); `batches` is read once (a list or a DataLoader).
    """
    alphas = grid(steps, span)
    loss = _scan(model, loss_fn, batches, 1, [(a,) for a in alphas], seed, filter_normalize,
                 progress)
    return {"alphas": alphas, "loss": loss, "steps": steps, "span": span, "seed": seed,
            "filter_normalize": filter_normalize}


def loss_surface(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], *, steps: int = 21,
                 span: float = 1.0, seed: int = 0, filter_normalize: bool = True,
                 progress: bool = False) -> dict[str, Any]:
    """Mean loss on a steps x steps grid spanned by two random directions.

    Returns {"alphas": [steps], "betas": [steps], "loss": steps x steps nested list, settings...}
    with `loss[i][j]` = L(theta + alphas[i] d1 + betas[j] d2). With odd `steps` the centre
    `loss[steps // 2][steps // 2]` is the loss at theta itself (eval mode). Costs steps^2 passes
    over `batches`.
    """
    alphas = grid(steps, span)
    betas = list(alphas)
    coordinates = [(a, b) for a in alphas for b in betas]
    flat = _scan(model, loss_fn, batches, 2, coordinates, seed, filter_normalize, progress)
    loss = [flat[i * steps:(i + 1) * steps] for i in range(steps)]
    return {"alphas": alphas, "betas": betas, "loss": loss, "steps": steps, "span": span,
            "seed": seed, "filter_normalize": filter_normalize}
