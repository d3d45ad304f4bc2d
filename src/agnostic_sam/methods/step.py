"""The one step helper: which closures ``opt.step`` takes for a batch, from the method record.

Every consumer (the trainer, the benchmark, the Lightning / Hugging Face / accelerate / timm
adapters) builds its closures through `step_closures`: a method on B takes one closure on the
whole batch, a method on B^t / B^v two, ``(train_closure, val_closure)``. No consumer asks an
optimizer's class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agnostic_sam.methods.record import MethodInfo

__all__ = ["step_closures"]

Closure = Callable[..., Any]


def step_closures(
    info: MethodInfo,
    closure_of: Callable[[Any], Closure],
    batch: Any = None,
    *,
    split: Callable[[Any], tuple[Any, Any]] | None = None,
    parts: tuple[Any, Any] | None = None,
) -> tuple[Closure, ...]:
    """The closures of one step of method ``info``: ``(closure_of(batch),)``, or for a method that
    splits the batch ``(closure_of(B^t), closure_of(B^v))`` with ``(B^t, B^v)`` = ``parts`` when
    given (a fixed split), else ``split(batch)``. ``closure_of(part)`` returns a closure of the
    record's protocol (``info.closure``)."""
    if not info.splits_batch:
        return (closure_of(batch),)
    if parts is None:
        if split is None:
            raise ValueError(f"method '{info.name}' splits each batch into B^t and B^v: give "
                             "split= or parts=")
        parts = split(batch)
    b_t, b_v = parts
    return closure_of(b_t), closure_of(b_v)
