"""What every analysis shares: a model left exactly as found, batches held fixed, the mean loss.

Every analysis (Hessian spectrum, trace, loss landscape) evaluates the model in **eval mode**, so
dropout is off and BatchNorm normalizes with its running statistics: the function being analysed
is then one deterministic function of the weights, which power iteration and the landscape grid
need. The training mode of every submodule, every `.grad` field and every buffer (BatchNorm
running mean/var and `num_batches_tracked`) are restored on exit, even after an exception.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import Tensor, nn

__all__ = [
    "MAX_SEED",
    "Batch",
    "LossFn",
    "check_count",
    "check_real",
    "check_seed",
    "evaluation_state",
    "materialize_batches",
    "mean_loss",
    "trainable_parameters",
]

# One batch: (inputs, targets); inputs of shape (B, ...), targets of shape (B, ...).
Batch = tuple[Tensor, Tensor]
# loss_fn(model(inputs), targets) -> 0-d tensor, the MEAN loss over the batch.
LossFn = Callable[[Tensor, Tensor], Tensor]


# Seeds in [0, 2**32): the range every run of the project uses (numpy's), and torch accepts.
MAX_SEED = 2**32


def check_count(name: str, value: object, low: int, high: int,
                error: type[Exception] = ValueError) -> int:
    """`value` as an int in [low, high]; else `error` naming `name`
    and the value (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not low <= cast(int, value) <= high:
        raise error(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def check_real(name: str, value: object, low: float, high: float = math.inf, *,
               low_open: bool = False, error: type[Exception] = ValueError) -> float:
    """`value` as a finite float with low <= value (< if low_open) and value <= high."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    real = cast(float, value)  # a numbers.Real, compared as it is
    ok = math.isfinite(real) and (real > low if low_open else real >= low) and real <= high
    if not ok:
        lower = f"> {low:g}" if low_open else f">= {low:g}"
        upper = f" and <= {high:g}" if math.isfinite(high) else ""
        raise error(f"{name} must be a finite number {lower}{upper}, got {value}")
    return float(value)


def check_seed(seed: object, name: str = "seed", error: type[Exception] = ValueError) -> int:
    return check_count(name, seed, 0, MAX_SEED - 1, error)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer would move (`requires_grad=True`),
    in `model.parameters()` order."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"model {type(model).__name__} has no parameter with requires_grad=True")
    return params


@contextmanager
def evaluation_state(model: nn.Module) -> Iterator[None]:
    """Put `model` in eval mode; restore modes, `.grad` fields and buffers exactly on exit.

    Modes are restored module by module (`m.training = mode`), not with `model.train()`, which
    would overwrite a submodule that was deliberately left in the other mode. Buffers are copied
    back in place, so the tensors other code holds stay the same objects.
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    model.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        for p, grad in grads:
            p.grad = grad
        for module, mode in modes:
            module.training = mode


def materialize_batches(model: nn.Module, batches: Iterable[Batch]) -> list[Batch]:
    """Read `batches` once and keep them, on the model's device, floating inputs in its dtype.

    A DataLoader with random augmentation yields different images on every pass; power
    iteration and the landscape grid need the *same* loss function at every evaluation, so the
    batches are drawn once here and reused.
    """
    first = next(iter(model.parameters()))
    device, dtype = first.device, first.dtype
    kept: list[Batch] = []
    for batch in batches:
        if not isinstance(batch, list | tuple) or len(batch) != 2:
            raise ValueError("each batch must be a pair (inputs, targets), got "
                             f"{type(batch).__name__}")
        inputs, targets = batch
        inputs = torch.as_tensor(inputs).to(device)
        if inputs.is_floating_point():
            inputs = inputs.to(dtype)
        targets = torch.as_tensor(targets).to(device)
        if targets.is_floating_point():
            targets = targets.to(dtype)
        if inputs.shape[0] == 0:
            continue
        kept.append((inputs, targets))
    if not kept:
        raise ValueError("batches is empty: the analysis needs at least one non-empty batch")
    return kept


def mean_loss(model: nn.Module, loss_fn: LossFn,
              batches: list[Batch]) -> Iterator[tuple[Tensor, float]]:
    """Yield `(loss_b, w_b)` per batch with w_b = n_b / N, so sum_b w_b * loss_b is the mean loss.

    Weighting each batch mean by its size makes the result the mean over all N examples, also
    when the last batch is smaller.
    """
    total = sum(int(x.shape[0]) for x, _ in batches)
    for inputs, targets in batches:
        yield loss_fn(model(inputs), targets), int(inputs.shape[0]) / total
