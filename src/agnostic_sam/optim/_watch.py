"""Which backward passes produced the gradients found in p.grad at step entry, at no cost to a
backward pass.

A post-accumulate-grad hook on every parameter would count the backward passes summed into
each p.grad, but it costs one call into Python per parameter on every backward pass, the
optimizer's own included. `BackwardWatch` hooks two sentinel parameters instead (the first and
the last trainable one: a backward through the model reaches both ends), so a backward pass pays
two calls whatever the number of parameters. Each sentinel hook counts the passes and notes
which gradient tensor it left and that tensor's version counter, so that a change made in place
afterwards (``zero_grad(set_to_none=False)`` of the model or of another optimizer, clipping,
DDP's all-reduce) is seen at step entry.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = ["BackwardWatch", "all_zero"]


class _Tally:
    """The hooks' shared record (kept apart from the optimizer: a parameter's hook must not keep
    its optimizer alive). counts[k]: backward passes through sentinel k since the last reset;
    left[k]: (weak reference to the gradient it left, that gradient's version)."""

    def __init__(self, n: int) -> None:
        self.counts = [0] * n
        self.left: list[tuple[Any, int] | None] = [None] * n


def _hook(tally: _Tally, k: int) -> Any:
    def hook(p: Tensor) -> None:
        tally.counts[k] += 1
        g = p.grad
        tally.left[k] = (weakref.ref(g), g._version) if g is not None else None

    return hook


class BackwardWatch:
    """Counts the backward passes through the sentinels of a list of parameters."""

    def __init__(self) -> None:
        self.sentinels: list[Tensor] = []
        self.tally = _Tally(0)
        self.handles: list[Any] = []

    def attach(self, params: list[Tensor]) -> None:
        """Watch `params` (re-hooks only when the sentinels change)."""
        trainable = [p for p in params if p.requires_grad]
        sentinels = [] if not trainable else [trainable[0], trainable[-1]]
        if trainable and trainable[0] is trainable[-1]:
            sentinels = sentinels[:1]
        if len(sentinels) == len(self.sentinels) and all(
            a is b for a, b in zip(sentinels, self.sentinels)
        ):
            return
        self.detach()
        self.sentinels = sentinels
        self.tally = _Tally(len(sentinels))
        self.handles = [
            p.register_post_accumulate_grad_hook(_hook(self.tally, k))
            for k, p in enumerate(sentinels)
        ]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def reset(self) -> None:
        """After the optimizer emptied (or zeroed) p.grad: no backward pass since."""
        n = len(self.sentinels)
        self.tally.counts[:] = [0] * n
        self.tally.left[:] = [None] * n

    def passes(self) -> int:
        """Backward passes through the parameters since the last reset."""
        return max(self.tally.counts, default=0)

    def untouched(self) -> bool:
        """Whether each sentinel's p.grad is still the tensor its last backward pass left there,
        unchanged since."""
        for p, left in zip(self.sentinels, self.tally.left):
            g = p.grad
            if left is None:
                if g is not None:
                    return False  # a gradient no backward pass left (set by hand)
                continue
            ref, version = left
            if g is None or ref() is not g or g._version != version:
                return False
        return True


def all_zero(tensors: list[Tensor]) -> bool:
    """Whether every element of `tensors` is 0: one host sync (only on the misuse path that
    needs it, never in a step of the documented forms)."""
    dense = [t.to_dense() if t.is_sparse else t for t in tensors]
    return not bool(torch.stack([t.abs().amax() if t.numel() else t.new_zeros(()) for t in dense])
                    .any())
