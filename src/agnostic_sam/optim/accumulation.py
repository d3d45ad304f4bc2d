"""Gradient accumulation inside a closure: K micro-batches per pass, equal to one big batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, cast

from torch import Tensor, nn

__all__ = ["accumulate"]


def accumulate(
    loss_fn: Callable[..., Tensor],
    batch: Sequence[Tensor],
    micro_batches: int,
    backward: Callable[[Tensor], None],
    *,
    model: nn.Module | None = None,
) -> Callable[[], Tensor]:
    r"""A closure that runs `loss_fn` on `micro_batches` slices of `batch` and backpropagates
    each, so that the summed gradient is the gradient of the whole batch's mean loss.

    With |B| samples split into micro-batches B_k (``tensor_split`` along dim 0) and `loss_fn`
    returning the *mean* loss of its micro-batch, the closure calls
    ``backward(loss_fn(*B_k) * |B_k| / |B|)`` for each k: sum_k |B_k|/|B| grad L_{B_k} = grad L_B.
    It returns the summed weighted losses, L_B. Every pass of a SAM-family step re-runs all
    micro-batches, so the step equals the step on the big batch (models without BatchNorm:
    BatchNorm normalizes per micro-batch). ``model`` with ``no_sync`` (DDP) skips the all-reduce
    for all but the last micro-batch.

    Example::

        f = lambda x, y: criterion(model(x), y)
        opt.step(accumulate(f, (x, y), 4, opt.backward))                  # SAM, Plain
        opt.step(accumulate(f, (x_t, y_t), 4, opt.backward),
                 accumulate(f, (x_v, y_v), 4, opt.backward))              # AgnosticSAM
        backward=lambda loss: scaler.scale(loss).backward()               # with a GradScaler
    """
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"invalid micro_batches={micro_batches!r}: must be an int >= 1")
    tensors = list(batch)
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError("batch must be a non-empty sequence of tensors, e.g. (inputs, targets)")
    n = len(tensors[0])
    if any(len(t) != n for t in tensors):
        raise ValueError(f"the tensors of batch differ in length: {[len(t) for t in tensors]}")
    if micro_batches > n:
        raise ValueError(f"micro_batches={micro_batches} is more than the {n} samples of the batch")

    def closure() -> Tensor:
        parts = [t.tensor_split(micro_batches) for t in tensors]
        total = tensors[0].new_zeros(())  # replaced by the first weighted loss
        for k, micro in enumerate(zip(*parts)):
            last = k == micro_batches - 1
            sync = last or model is None or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else cast(Any, model).no_sync():  # DDP's
                loss = loss_fn(*micro)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ValueError("loss_fn must return the scalar mean loss of its micro-batch")
                weighted = loss * (len(micro[0]) / n)
                backward(weighted)
            total = weighted.detach() if k == 0 else total + weighted.detach()
        return total

    return closure

