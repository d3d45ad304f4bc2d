"""accelerate: `SharpnessStep`, the sharpness-aware step of an accelerate training loop,
with ``accelerator.accumulate()``, mixed precision and DDP.

    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    step = SharpnessStep(accelerator, model, opt, lambda b: F.cross_entropy(model(b[0]), b[1]))
    for batch in loader:
        with accelerator.accumulate(model):
            step(batch)          # records the micro-batch; on the sync step runs the whole step
            sched.step()         # accelerate steps it on sync steps only

How it translates. accelerate marks the last micro-batch of each accumulation window with
``accelerator.sync_gradients`` (set by ``accumulate()``) and skips ``optimizer.step`` on the other
ones, which with a closure would drop those micro-batches. `SharpnessStep` reads that state: it
records the micro-batch while the state says "not yet", and on the sync step runs every pass
over all recorded micro-batches (each mean loss weighted by its share of the samples; under DDP
all but the last inside ``accelerator.no_sync(model)``, so one all-reduce per pass). AgnosticSAM
splits their union into B^t and B^v (`split_batch`'s draw from ``split_seed``). fp16 drives the
step with the accelerator's GradScaler (``scaler.step(opt, closure, val_closure)``); bf16 and fp32
need no scaling; ``max_grad_norm`` clips the final gradient. A skipped fp16 step is reported to
the prepared optimizer, so the prepared scheduler does not step either.

Checkpoints. A `SharpnessStep` registers itself with ``accelerator.register_for_checkpointing``:
``accelerator.save_state()`` writes the state of its B^t/B^v split generator next to the model,
optimizer and RNG states, and ``accelerator.load_state()`` restores it, so a resumed run draws the
same splits as an uninterrupted one (bit for bit). Build it in the resumed script in the same
order relative to other registered objects, before ``load_state()``. Saving in the middle of an
accumulation window is refused (the recorded micro-batches are not saved).

Refused with one line: ``step(batch)`` outside ``accumulate()`` while
``gradient_accumulation_steps > 1``; the guarded optimizer stepped directly (``opt.step(closure)``)
while accumulating; gradients already in p.grad (backward belongs to the step); DeepSpeed, FSDP
and Megatron. Without this helper, the optimizer itself refuses a closure step through the
prepared optimizer while accumulating (naming `SharpnessStep`): accelerate calls it on the sync
micro-batch only, so the other closures would never run.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from agnostic_sam.integrations._common import Batch, run_step
from agnostic_sam.optim import SharpnessOptimizer

__all__ = ["SharpnessStep"]

_GUARDS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _unregister(accelerator: Any, step: Any) -> None:
    """Drop a replaced SharpnessStep from accelerate's checkpointed objects."""
    objects = getattr(accelerator, "_custom_objects", None)
    if step is not None and objects is not None:
        objects[:] = [o for o in objects if o is not step]


class SharpnessStep:
    """The step of an accelerate loop for an `AgnosticSAM`, `SAM` or `Plain` optimizer.

    Args:
        accelerator: the `accelerate.Accelerator`.
        model: the prepared model (DDP-wrapped under multi-process).
        optimizer: the prepared optimizer (or the agnostic_sam optimizer itself).
        loss_fn: ``loss_fn(batch) -> mean loss`` of (a part of) a batch, running the prepared model.
        split_ratio: |B^t| / |B| for AgnosticSAM.
        split_seed: seed of ``self.generator`` (its state is saved by ``accelerator.save_state()``).
        max_grad_norm: clip the final gradient to this norm (or the optimizer's max_grad_norm).

    Calling ``step(batch)`` returns the loss at theta on sync steps, None on the others.
    """

    def __init__(
        self,
        accelerator: Any,
        model: torch.nn.Module,
        optimizer: Any,
        loss_fn: Callable[[Batch], Tensor],
        *,
        split_ratio: float = 0.7,
        split_seed: int = 0,
        max_grad_norm: float | None = None,
    ) -> None:
        from accelerate.utils import DistributedType

        if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU,
                                                DistributedType.MULTI_CPU,
                                                DistributedType.MULTI_XPU):
            raise RuntimeError(
                f"SharpnessStep does not support {accelerator.distributed_type}: the "
                "sharpness-aware step needs plain or DDP parameters"
            )
        inner = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(inner, SharpnessOptimizer):
            raise TypeError(
                "SharpnessStep needs an agnostic_sam optimizer (AgnosticSAM, SAM or Plain), got "
                f"{type(inner).__name__}"
            )
        self.accelerator = accelerator
        self.model = model
        self.optimizer = inner
        # accelerate's wrapper of it (the prepared schedulers ask it whether the step was skipped)
        self.prepared = next((o for o in getattr(accelerator, "_optimizers", [])
                              if getattr(o, "optimizer", None) is inner), None)
        self.loss_fn = loss_fn
        self.split_ratio = split_ratio
        self.generator = torch.Generator().manual_seed(int(split_seed))
        self.max_grad_norm = max_grad_norm
        self._pending: list[Batch] = []
        self._last_accumulate_step: int | None = None
        self._stepping = False
        # One guard per optimizer: a new SharpnessStep for it replaces the previous one's.
        previous = _GUARDS.pop(inner, None)
        if previous is not None:
            previous[0].remove()
            _unregister(accelerator, previous[1]())
        _GUARDS[inner] = (inner.register_step_pre_hook(self._guard), weakref.ref(self))
        accelerator.register_for_checkpointing(self)

    def state_dict(self) -> dict[str, Any]:
        """What ``accelerator.save_state()`` writes: the split generator's state."""
        if self._pending:
            raise RuntimeError(
                f"accelerator.save_state() with {len(self._pending)} micro-batch(es) of an "
                "unfinished accumulation window recorded by SharpnessStep: save after the sync "
                "step (when accelerator.sync_gradients is True)"
            )
        return {"generator": self.generator.get_state(), "split_ratio": self.split_ratio}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """What ``accelerator.load_state()`` restores (see `state_dict`)."""
        if not isinstance(state, dict) or not isinstance(state.get("generator"), Tensor):
            raise ValueError(
                "not a SharpnessStep state (a dict with the split generator's state): "
                "register the SharpnessStep in the same order as in the run that saved it"
            )
        saved = state.get("split_ratio", self.split_ratio)
        if saved != self.split_ratio:
            raise ValueError(
                f"the checkpoint's SharpnessStep split B^t/B^v with split_ratio={saved}, this one "
                f"has split_ratio={self.split_ratio}: pass split_ratio={saved} to resume it"
            )
        self.generator.set_state(state["generator"])
        self._pending = []

    def _guard(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Every step of the optimizer: one not taken by this helper while accumulate() is on
        would have skipped the closures of the non-sync micro-batches (accelerate does)."""
        if not self._stepping and self.accelerator.gradient_accumulation_steps > 1:
            raise RuntimeError(
                "with gradient_accumulation_steps > 1 accelerate skips optimizer.step(closure) on "
                "non-sync steps, dropping those micro-batches: call SharpnessStep(batch) instead"
            )

    def __call__(self, batch: Batch) -> Tensor | None:
        acc = self.accelerator
        if acc.gradient_accumulation_steps > 1:
            # accumulate() advances accelerator.step on every call; unchanged means it is missing.
            if self._last_accumulate_step is not None and acc.step == self._last_accumulate_step:
                raise RuntimeError(
                    "SharpnessStep(batch) with gradient_accumulation_steps > 1 must run inside "
                    "`with accelerator.accumulate(model):` (it reads which micro-batch ends the "
                    "window)"
                )
            self._last_accumulate_step = acc.step
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if any(p.grad is not None for p in params):
            raise RuntimeError(
                "SharpnessStep found gradients in p.grad: it runs forward and backward itself; "
                "remove accelerator.backward(...) from the loop and call optimizer.zero_grad()"
            )
        self._pending.append(batch)
        if not acc.sync_gradients:
            return None
        batches, self._pending = self._pending, []
        no_sync = (lambda: acc.no_sync(self.model)) if hasattr(self.model, "no_sync") else None
        self._stepping = True
        try:
            loss = run_step(
                self.optimizer,
                self.loss_fn,
                batches,
                split_ratio=self.split_ratio,
                generator=self.generator,
                grad_scaler=acc.scaler,
                max_grad_norm=self.max_grad_norm,
                no_sync=no_sync,
            )
        finally:
            self._stepping = False
        if self.prepared is not None and hasattr(self.prepared, "_is_overflow"):
            self.prepared._is_overflow = bool(self.optimizer.stats["skipped"])
            self.prepared._opt_called = True  # torch's scheduler-order check watches the wrapper
        return loss
