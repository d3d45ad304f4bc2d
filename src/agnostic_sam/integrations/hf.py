"""Hugging Face transformers: `SharpnessTrainer`, a `Trainer` whose optimizer step is
AgnosticSAM's, SAM's or the plain base optimizer's (`Plain`).

    trainer = SharpnessTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                               sharpness="agnostic-sam", rho1=0.1, rho2=0.05, split_ratio=0.7)
    trainer.train()

How it translates. The Trainer calls `training_step` once per micro-batch and marks the last of
each accumulation window with ``accelerator.sync_gradients``. `SharpnessTrainer.training_step`
records the micro-batches and, on the last one, runs the whole step: every pass re-runs all of
them through `compute_loss` (the Trainer's autocast applies), each mean loss weighted by its
share of the samples; AgnosticSAM first splits their union into B^t and B^v (`split_batch`'s draw
from a generator seeded by ``split_seed``). The Trainer then counts the step as usual
(``global_step`` = optimizer steps), steps its own lr scheduler (not after a step skipped for an
fp16 overflow), and its later ``optimizer.step()`` is a no-op that checks the step was taken.
``args.max_grad_norm`` clips the final gradient before the base step (the gradient norm the
Trainer logs is ||g(theta)||, before clipping). ``fp16`` drives the step with the accelerator's
GradScaler (``scaler.step(opt, closure, val_closure)``); ``bf16`` needs no scaling.

The optimizer is built from the Trainer's own choice (``args.optim``: its class, lr, betas, eps,
and the decay / no-decay parameter groups) wrapped by the sharpness-aware method; or pass an
`agnostic_sam` optimizer through ``optimizers=(opt, scheduler)``.

Refused with one line: a base optimizer that is not a `torch.optim.Optimizer` class,
DeepSpeed / FSDP / Megatron, and micro-batches of different shapes (pad to one length: every pass
re-runs them all). Losses are weighted by samples, not by ``num_items_in_batch`` tokens.
"""

from __future__ import annotations

import os
from typing import Any, cast

import torch
from torch import Tensor

from agnostic_sam.integrations._common import run_step
from agnostic_sam.methods import create_optimizer, get_method, list_methods
from agnostic_sam.optim import SharpnessOptimizer

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        "agnostic_sam.integrations.hf needs transformers: pip install 'agnostic-sam[transformers]'"
    ) from exc

__all__ = ["SharpnessTrainer"]

SPLIT_STATE = "agnostic_sam_split.pt"


class _StepTaken:
    """Stands in for the Trainer's optimizer: the step already ran in `training_step`, so the
    Trainer's ``optimizer.step()`` only checks that it did. Everything else is delegated."""

    def __init__(self, optimizer: Any) -> None:
        self.__dict__["_wrapped"] = optimizer
        self.__dict__["_taken"] = False

    def step(self, closure: Any = None) -> None:
        if closure is not None or not self.__dict__["_taken"]:
            raise RuntimeError(
                "SharpnessTrainer runs the optimizer step inside training_step; optimizer.step() "
                "was called without one (call trainer.training_step on the last micro-batch)"
            )
        self.__dict__["_taken"] = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_wrapped"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["_wrapped"], name, value)


class SharpnessTrainer(Trainer):
    """A `transformers.Trainer` with a sharpness-aware step.

    Args:
        sharpness: a method of the registry (`agnostic_sam.methods`): ``"agnostic-sam"``
            (Algorithm 1), ``"agnostic-sam-simpler"`` (Sec. 5.1), ``"sam"`` (ASAM with
            ``sharpness_kwargs={"adaptive": True}``), ``"sgd"`` (the base optimizer alone, the
            one-pass `Plain`, whatever the Trainer's base optimizer is) or one of your own.
        method_args: the method's own settings (its registry record lists them, e.g.
            ``{"alpha": 0.4}`` for GSAM); checked against the record.
        rho, rho1, rho2: shorthands for the radius settings of the methods that have them
            (None: the method's default).
        split_ratio: |B^t| / |B| for AgnosticSAM.
        split_seed: seed of the split generator ``self.split_generator``; its state is saved
            in each checkpoint folder (``agnostic_sam_split.pt``) and restored on resume.
        sharpness_kwargs: more keyword arguments for the optimizer (e.g. ``adaptive=True``,
            ``model=...``, ``perturb_eps=...``).
        The other arguments are the Trainer's.
    """

    def __init__(
        self,
        *args: Any,
        sharpness: str = "agnostic-sam",
        method_args: dict[str, Any] | None = None,
        rho: float | None = None,
        rho1: float | None = None,
        rho2: float | None = None,
        split_ratio: float = 0.7,
        split_seed: int = 0,
        sharpness_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            info = get_method(sharpness)
        except ValueError:
            raise ValueError(f"invalid sharpness={sharpness!r}: expected one of "
                             f"{', '.join(list_methods())}") from None
        shorthands = {k: v for k, v in (("rho", rho), ("rho1", rho1), ("rho2", rho2))
                      if v is not None and k in info.setting_names}
        self.method_args = {**shorthands, **(method_args or {})}
        info.resolve(self.method_args)  # a bad name or value fails here, in one line
        for name in ("_clip_grad_norm", "_get_grad_norm"):
            if not hasattr(Trainer, name):
                raise ImportError(
                    f"SharpnessTrainer needs a transformers Trainer with {name} "
                    "(transformers >= 5): upgrade transformers"
                )
        self.sharpness = sharpness
        self.split_ratio = split_ratio
        self.split_generator = torch.Generator().manual_seed(int(split_seed))
        self.sharpness_kwargs = dict(sharpness_kwargs or {})
        self._micro_batches: list[Any] = []
        super().__init__(*args, **kwargs)

    # ---- the optimizer ---------------------------------------------------------------------

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer choice (class, kwargs, decay groups) wrapped by the method."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model: Any = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        # parameter names travel in the groups (torch's "param_names"): the authors' ASAM needs them
        groups = [
            {"params": [p for n, p in named if n in decay],
             "param_names": [n for n, _ in named if n in decay],
             "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay],
             "param_names": [n for n, _ in named if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if self.optimizer_cls_and_kwargs is not None:
            base, base_kwargs = self.optimizer_cls_and_kwargs
        else:
            base, base_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        base_kwargs = dict(base_kwargs)
        if not (isinstance(base, type) and issubclass(base, torch.optim.Optimizer)) or any(
            k in base_kwargs for k in ("params", "model", "optimizer_dict")
        ):
            raise ValueError(
                "SharpnessTrainer wraps a torch.optim.Optimizer class, but "
                f"args.optim={self.args.optim!r} gives {getattr(base, '__name__', base)!r}: use "
                "e.g. optim='adamw_torch' or 'sgd'"
            )
        self.optimizer = create_optimizer(self.sharpness, groups, base, base_kwargs,
                                          settings=self.method_args, **self.sharpness_kwargs)
        return self.optimizer

    def _sharpness_optimizer(self) -> tuple[SharpnessOptimizer, Any]:
        """(the agnostic_sam optimizer, accelerate's wrapper of it or None)."""
        outer = self.optimizer
        if isinstance(outer, _StepTaken):
            outer = outer.__dict__["_wrapped"]
        inner = getattr(outer, "optimizer", outer)
        if not isinstance(inner, SharpnessOptimizer):
            raise TypeError(
                "SharpnessTrainer needs an agnostic_sam optimizer (AgnosticSAM, SAM or Plain), got "
                f"{type(inner).__name__}: drop optimizers=(...) or pass one of them"
            )
        return inner, (outer if outer is not inner else None)

    # ---- checkpoints: the split generator resumes where it was ------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.split_generator.get_state(), os.path.join(output_dir, SPLIT_STATE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, SPLIT_STATE)):
            self.split_generator.set_state(torch.load(os.path.join(checkpoint, SPLIT_STATE),
                                                      weights_only=True))

    # ---- the step --------------------------------------------------------------------------

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Tensor:
        """Record the micro-batch; on the last of the accumulation window run the whole step and
        return the loss at theta (the Trainer sums what it gets per micro-batch: zeros before)."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU,
                                                     DistributedType.MULTI_CPU,
                                                     DistributedType.MULTI_XPU):
            raise RuntimeError(
                f"SharpnessTrainer does not support {self.accelerator.distributed_type}: its "
                "sharpness-aware step needs plain (or DDP) parameters"
            )
        opt, accelerated = self._sharpness_optimizer()
        self._micro_batches.append(inputs)
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        batches, self._micro_batches = self._micro_batches, []
        model.train()

        def loss_fn(part: Any) -> Tensor:
            part = self._prepare_inputs(part)
            with self.compute_loss_context_manager():
                loss = cast(Tensor, self.compute_loss(model, part))  # no outputs asked
            return loss.mean() if loss.dim() > 0 else loss  # DataParallel returns one per device

        loss = run_step(
            opt,
            loss_fn,
            batches,
            split_ratio=self.split_ratio,
            generator=self.split_generator,
            grad_scaler=self.accelerator.scaler,
            max_grad_norm=self.args.max_grad_norm if self.args.max_grad_norm > 0 else None,
            # DDP: one all-reduce per pass, after its last micro-batch
            no_sync=((lambda: self.accelerator.no_sync(model)) if hasattr(model, "no_sync")
                     else None),
        )
        skipped = bool(opt.stats["skipped"])
        if accelerated is not None and hasattr(accelerated, "_is_overflow"):
            accelerated._is_overflow = skipped  # the Trainer then skips the scheduler step
            # torch's "lr_scheduler.step() before optimizer.step()" check on the wrapper it watches
            accelerated._opt_called = True
        if not isinstance(self.optimizer, _StepTaken):
            self.optimizer = _StepTaken(self.optimizer)  # type: ignore[assignment]  # a proxy
        self.optimizer.__dict__["_taken"] = True
        return loss.detach().to(self.args.device)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:  # hand the Trainer its own optimizer back (a later train() prepares it again)
            if isinstance(self.optimizer, _StepTaken):
                self.optimizer = self.optimizer.__dict__["_wrapped"]
            self._micro_batches = []

    def _clip_grad_norm(self, model: Any) -> Any:
        """Clipping already happened on the final gradient (max_grad_norm); the norm before it."""
        return self._sharpness_grad_norm()

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        norm = self._sharpness_grad_norm() if grad_norm is None else grad_norm
        return float(norm) if norm is not None else None

    def _sharpness_grad_norm(self) -> Any:
        opt, _ = self._sharpness_optimizer()
        return opt.stats.get("grad_norm_train")
