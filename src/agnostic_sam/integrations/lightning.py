"""Lightning: train a LightningModule with AgnosticSAM, SAM or Plain in automatic optimization.

    class Model(SharpnessAwareMixin, L.LightningModule):   # the mixin first
        split_ratio = 0.7                                    # |B^t| / |B| (AgnosticSAM)
        def training_step(self, batch, batch_idx):           # unchanged: returns the mean loss
            x, y = batch
            return F.cross_entropy(self(x), y)
        def configure_optimizers(self):
            return AgnosticSAM(self.parameters(), torch.optim.SGD, lr=0.1, rho1=0.1, rho2=0.05)

How it translates. Lightning calls `training_step` once per batch; the mixin records the batch
there (returning None, so Lightning runs no backward) and runs the whole sharpness-aware step in
`optimizer_step`, which Lightning calls once per optimizer step (after `accumulate_grad_batches`
batches). Every pass calls the original `training_step` through the strategy (so the precision
plugin's autocast applies) on the recorded batches: AgnosticSAM splits their union into B^t and
B^v with `split_batch`'s draw from a generator seeded by `split_seed`, and runs each part in as
many micro-batches as were accumulated (each loss weighted by its share), SAM and Plain run the
union. Lightning's loop keeps counting: `global_step`, `max_steps` and the schedulers see one
step per optimizer step. `Trainer(gradient_clip_val=v)` (algorithm "norm") clips the final
gradient, the one the base optimizer steps with. `precision="16-mixed"` drives the step with the
plugin's GradScaler (`scaler.step(opt, closure, val_closure)`); "bf16-mixed", "32-true",
"64-true", "16-true" and "bf16-true" need no scaling.

Under DDP (``strategy="ddp"``/``"ddp_spawn"``) every pass all-reduces once, after its last
micro-batch (each rank splits its own batch with the same generator). Refused with one line
(they cannot be made exact here): other strategies (FSDP, DeepSpeed, ...) or precision plugins,
DDP with ``find_unused_parameters=True``, ``gradient_clip_algorithm="value"``, an overridden
`optimizer_step` or `configure_gradient_clipping`, manual optimization, and a non-agnostic_sam
optimizer.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from agnostic_sam.integrations._common import run_step
from agnostic_sam.optim import SharpnessOptimizer

__all__ = ["SharpnessAwareMixin"]


def _loss_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise TypeError(
        "with SharpnessAwareMixin, training_step must return the mean loss (a tensor) or a dict "
        f"with a 'loss' tensor, got {type(output).__name__}"
    )


def _wrap_training_step(step: Any) -> Any:
    @functools.wraps(step)
    def training_step(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        if self._sharpness_inner:
            return step(self, batch, *args, **kwargs)
        # Called by Lightning's loop: record the batch; the step runs in optimizer_step.
        self._sharpness_check()
        self._sharpness_pending.append(batch)
        if self.trainer.world_size > 1:
            # Lightning refuses a None step under DDP: hand it a loss whose backward the mixin's
            # backward hook skips (it touches no parameter, so DDP's reducer never starts).
            self.__dict__["_sharpness_skip_backward"] = True
            return torch.zeros((), device=self.device, requires_grad=True)
        return None

    training_step._sharpness_wrapped = True  # type: ignore[attr-defined]
    return training_step


def _check_hooks(module: SharpnessAwareMixin) -> None:
    """The LightningModule's hooks: training_step and configure_gradient_clipping mixed in,
    optimizer_step the mixin's, automatic optimization."""
    import lightning.pytorch as pl

    cls = type(module)
    # training_step and configure_gradient_clipping: the LightningModule's, mixed in
    if not getattr(cls.training_step, "_sharpness_wrapped", False):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} must define training_step for SharpnessAwareMixin")
    if cls.optimizer_step is not SharpnessAwareMixin.optimizer_step:
        raise TypeError(
            f"{cls.__name__} overrides optimizer_step (or lists LightningModule before "
            "SharpnessAwareMixin): put SharpnessAwareMixin first and do not override "
            "optimizer_step"
        )
    if cls.configure_gradient_clipping is not pl.LightningModule.configure_gradient_clipping:  # type: ignore[attr-defined]  # noqa: E501
        raise TypeError(
            f"{cls.__name__} overrides configure_gradient_clipping, which a sharpness-aware "
            "step cannot call: use Trainer(gradient_clip_val=...) or the optimizer's "
            "max_grad_norm="
        )
    if not module.automatic_optimization:  # type: ignore[attr-defined]
        raise TypeError(
            "SharpnessAwareMixin runs the step in automatic optimization: remove "
            "automatic_optimization = False (the mixin builds the closures)"
        )


def _check_trainer(trainer: Any) -> None:
    """The Trainer's strategy (single device or DDP without unused parameters), its precision
    plugin, and its clipping algorithm ("norm" only)."""
    from lightning.pytorch.plugins.precision import (
        DoublePrecision,
        HalfPrecision,
        MixedPrecision,
        Precision,
    )
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    if (not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy))
            or strategy.handles_gradient_accumulation):
        raise RuntimeError(
            f"SharpnessAwareMixin supports the single-device and DDP strategies, got "
            f"{type(strategy).__name__}: use strategy='ddp' (or 'auto' on one device)"
        )
    if (isinstance(strategy, DDPStrategy)
            and strategy._ddp_kwargs.get("find_unused_parameters", False)):
        raise RuntimeError(
            "SharpnessAwareMixin cannot run with DDP find_unused_parameters=True (Lightning's "
            "own backward is skipped, which that reducer mode does not allow): use "
            "strategy='ddp'"
        )
    plugin = trainer.precision_plugin
    if type(plugin) not in (Precision, MixedPrecision, HalfPrecision, DoublePrecision):
        raise RuntimeError(
            "SharpnessAwareMixin does not support the precision plugin "
            f"{type(plugin).__name__}: "
            "use precision='32-true', 'bf16-mixed', '16-mixed', 'bf16-true' or '16-true'"
        )
    clip = trainer.gradient_clip_val
    algorithm = getattr(trainer.gradient_clip_algorithm, "value",
                        trainer.gradient_clip_algorithm)
    if clip is not None and clip > 0 and algorithm not in (None, "norm"):
        raise ValueError(
            "gradient_clip_algorithm='value' cannot be applied to the final gradient of a "
            "sharpness-aware step: use gradient_clip_algorithm='norm'"
        )


class SharpnessAwareMixin:
    """Mixin for a `LightningModule` (put it first among the bases) whose `configure_optimizers`
    returns an `AgnosticSAM`, `SAM` or `Plain` optimizer. `training_step` stays as it is: it is
    called once per pass on (a part of) the batch and returns the mean loss.

    Class attributes: ``split_ratio`` (|B^t|/|B|, AgnosticSAM only, default 0.7) and
    ``split_seed`` (seed of the split generator, default 0; its state is saved in checkpoints).
    Inside `training_step`, ``self.sharpness_at_theta`` is True in the passes at theta (log
    there to log the loss at the weights being trained).
    """

    split_ratio: float = 0.7
    split_seed: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_sharpness_wrapped", False):
            cls.training_step = _wrap_training_step(step)  # type: ignore[attr-defined]

    # ---- state ---------------------------------------------------------------------------

    @property
    def _sharpness_inner(self) -> bool:
        return self.__dict__.get("_sharpness_inner_flag", False)

    @property
    def _sharpness_pending(self) -> list[Any]:
        return self.__dict__.setdefault("_sharpness_pending_list", [])

    @property
    def sharpness_generator(self) -> torch.Generator:
        """The generator of the B^t/B^v split (CPU, seeded with ``split_seed`` on first use)."""
        gen = self.__dict__.get("_sharpness_gen")
        if gen is None:
            gen = torch.Generator().manual_seed(int(self.split_seed))
            self.__dict__["_sharpness_gen"] = gen
        return gen

    @property
    def sharpness_at_theta(self) -> bool:
        """True while `training_step` runs at the unperturbed weights."""
        opt = self.__dict__.get("_sharpness_opt")
        return bool(opt is not None and opt.at_theta)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["agnostic_sam_split_generator"] = self.sharpness_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("agnostic_sam_split_generator")
        if state is not None:
            self.sharpness_generator.set_state(state)

    # ---- checks: everything that would make the step differ from the plain loop ------------

    def _sharpness_check(self) -> None:
        """Refuse (one line naming what to change) a module or trainer the step cannot run
        exactly for: the module's own hooks first, then the trainer's settings."""
        _check_hooks(self)
        _check_trainer(self.trainer)  # type: ignore[attr-defined]

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward hook: skipped for the placeholder loss of a recording call."""
        if self.__dict__.pop("_sharpness_skip_backward", False):
            return
        super().backward(loss, *args, **kwargs)  # type: ignore[misc]

    # ---- the step ------------------------------------------------------------------------

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Any = None) -> None:
        """Lightning's hook, once per optimizer step: run the sharpness-aware step on the recorded
        batches. (Lightning's own closure only records the current batch.)"""
        if optimizer_closure is not None:
            optimizer_closure()  # Lightning's closure: training_step records the batch
        opt = getattr(optimizer, "optimizer", optimizer)  # unwrap LightningOptimizer
        if not isinstance(opt, SharpnessOptimizer):
            raise TypeError(
                "SharpnessAwareMixin needs configure_optimizers to return an optimizer of a "
                f"registered method (agnostic_sam.methods.list_methods()), got "
                f"{type(opt).__name__}"
            )
        trainer = self.trainer  # type: ignore[attr-defined]
        batches = list(self._sharpness_pending)
        self._sharpness_pending.clear()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        clip = trainer.gradient_clip_val

        def loss_fn(part: Any) -> Tensor:
            return _loss_of(trainer.strategy.training_step(part, batch_idx))

        ddp = trainer.strategy.model
        no_sync = ddp.no_sync if hasattr(ddp, "no_sync") else None  # one all-reduce per pass

        self.__dict__["_sharpness_inner_flag"] = True
        self.__dict__["_sharpness_opt"] = opt
        try:
            run_step(
                opt,
                loss_fn,
                batches,
                split_ratio=self.split_ratio,
                generator=self.sharpness_generator,
                grad_scaler=scaler,
                max_grad_norm=clip if clip else None,
                no_sync=no_sync,
            )
        finally:
            self.__dict__["_sharpness_inner_flag"] = False
