r"""How the benchmark runs a step of each method: the method and its sample count come from the
method registry (`agnostic_sam.methods`); this module only turns a registered method into a
timed ``step(x, y)`` on one fixed batch.

``METHODS[name].samples(B, n_t)`` is the number of images through forward + backward per step
(see the formulas in :mod:`agnostic_sam.bench`): SGD ``B``, SAM and Agnostic-SAM ``2B``, simpler
``B + n_t``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.methods import create_optimizer, get_method
from agnostic_sam.methods.step import step_closures
from agnostic_sam.optim import split_batch

__all__ = ["StepFn", "build_step", "make_loss"]

# step(x, y) runs one full optimizer step on the batch x: (B, C, H, W), y: (B,).
StepFn = Callable[[Tensor, Tensor], None]


def _autocast(cfg: Any, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_loss(net: Callable[[Tensor], Tensor], cfg: Any, device: torch.device):
    """loss(x, y): mean cross-entropy of ``net(x)``, the forward pass under ``cfg.amp``."""

    def loss(x: Tensor, y: Tensor) -> Tensor:
        with _autocast(cfg, device):
            return F.cross_entropy(net(x), y)

    return loss


def build_step(name: str, model: nn.Module, net: Callable[[Tensor], Tensor],
               cfg: Any) -> tuple[Any, StepFn]:
    """(optimizer, step) of method ``name`` over ``model``'s parameters (``cfg``: the
    `BenchConfig`, whose module imports this one); ``net`` is the callable
    used for forward passes (the compiled module or ``model``). Methods that split the batch
    split it on every step with a seeded generator: the split is part of a real step, so it is
    timed too."""
    info = get_method(name)
    device = next(model.parameters()).device
    scaler = LossScaler(device=device.type) if cfg.amp == "fp16" else None
    opt: Any = create_optimizer(  # a registered method's: it has backward(loss)
        name, model.parameters(), torch.optim.SGD,
        dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
        radii={"rho": cfg.rho, "rho1": cfg.rho1, "rho2": cfg.rho2},
        model=model, loss_scaler=scaler,
    )
    loss_fn = make_loss(net, cfg, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def closure_for(x: Tensor, y: Tensor) -> Callable[..., Tensor]:
        def closure() -> Tensor:
            loss = loss_fn(x, y)
            opt.backward(loss)  # type: ignore[attr-defined]
            return loss

        # closure="per-sample" (its record): closure(index=None, backward=True) on the rows
        # `index`, returning the per-sample losses
        def per_sample(index: Tensor | None = None, backward: bool = True) -> Tensor:
            xs, ys = (x, y) if index is None else (x[index], y[index])
            with _autocast(cfg, device):
                losses = F.cross_entropy(net(xs), ys, reduction="none")
            if backward:
                opt.backward(losses.mean())  # type: ignore[attr-defined]
            return losses.detach()

        return per_sample if info.closure == "per-sample" else closure

    def split(batch: tuple[Tensor, Tensor]) -> tuple[Any, Any]:
        x_t, y_t, x_v, y_v = split_batch(*batch, cfg.split_ratio, generator=gen)
        return (x_t, y_t), (x_v, y_v)

    def step(x: Tensor, y: Tensor) -> None:
        opt.step(*step_closures(info, lambda b: closure_for(*b), (x, y), split=split))

    return opt, step
