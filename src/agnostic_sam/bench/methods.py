r"""The benchmarked methods: a registry of how to build each optimizer and its step.

``samples(B, n_t)`` is the number of images through forward + backward per step (see the
formulas in :mod:`agnostic_sam.bench`): SGD ``B``, SAM and Agnostic-SAM ``2B``, simpler ``B + n_t``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from agnostic_sam.bench.timing import BenchConfig

__all__ = ["METHODS", "BuildFn", "Method", "StepFn", "make_loss", "register_method"]

StepFn = Callable[[Tensor, Tensor], None]
# build(model, net, cfg) -> (optimizer, step): `model` is the nn.Module whose parameters are
# optimised, `net` the callable used for forward passes (the compiled module or `model`), and
# step(x, y) runs one full optimizer step on the batch x: (B, C, H, W), y: (B,).
BuildFn = Callable[[nn.Module, Callable[[Tensor], Tensor], "BenchConfig"], tuple[Any, StepFn]]


@dataclass(frozen=True)
class Method:
    """A benchmarked optimizer: how to build it, and images through fwd+bwd per step."""

    name: str
    build: BuildFn
    samples: Callable[[int, int], int]  # (B, n_t) -> images through forward+backward per step


METHODS: dict[str, Method] = {}


def register_method(name: str, samples: Callable[[int, int], int]) -> Callable[[BuildFn], BuildFn]:
    """Decorator adding ``build`` to :data:`METHODS` under ``name``."""

    def deco(build: BuildFn) -> BuildFn:
        METHODS[name] = Method(name, build, samples)
        return build

    return deco


# --- the methods -----------------------------------------------------------------------------

def _autocast(cfg: BenchConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_loss(net: Callable[[Tensor], Tensor], cfg: BenchConfig, device: torch.device):
    """loss(x, y): mean cross-entropy of ``net(x)``, the forward pass under ``cfg.amp``."""

    def loss(x: Tensor, y: Tensor) -> Tensor:
        with _autocast(cfg, device):
            return F.cross_entropy(net(x), y)

    return loss


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _scaler(cfg: BenchConfig, device: torch.device):
    if cfg.amp != "fp16":
        return None
    from agnostic_sam.amp import LossScaler

    return LossScaler(device=device.type)


@register_method("sgd", samples=lambda b, n_t: b)
def _build_sgd(model, net, cfg):
    device = _device_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    loss_fn = make_loss(net, cfg, device)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None

    def step(x: Tensor, y: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x, y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    return opt, step


@register_method("sam", samples=lambda b, n_t: 2 * b)
def _build_sam(model, net, cfg):
    from agnostic_sam import SAM

    device = _device_of(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=cfg.rho, model=model,
              loss_scaler=_scaler(cfg, device), lr=cfg.lr, momentum=cfg.momentum,
              weight_decay=cfg.weight_decay)
    loss_fn = make_loss(net, cfg, device)

    def step(x: Tensor, y: Tensor) -> None:
        def closure() -> Tensor:
            loss = loss_fn(x, y)
            opt.backward(loss)
            return loss

        opt.step(closure)

    return opt, step


def _build_agnostic(variant: str) -> BuildFn:
    def build(model, net, cfg):
        from agnostic_sam import AgnosticSAM, split_batch

        device = _device_of(model)
        opt = AgnosticSAM(model.parameters(), torch.optim.SGD, rho1=cfg.rho1, rho2=cfg.rho2,
                          variant=variant, model=model, loss_scaler=_scaler(cfg, device),
                          lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        loss_fn = make_loss(net, cfg, device)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)

        def closure_for(x: Tensor, y: Tensor) -> Callable[[], Tensor]:
            def closure() -> Tensor:
                loss = loss_fn(x, y)
                opt.backward(loss)
                return loss

            return closure

        def step(x: Tensor, y: Tensor) -> None:
            # The random split is part of every real training step, so it is timed too.
            x_t, y_t, x_v, y_v = split_batch(x, y, cfg.split_ratio, generator=gen)
            opt.step(closure_for(x_t, y_t), closure_for(x_v, y_v))

        return opt, step

    return build


register_method("agnostic-sam", samples=lambda b, n_t: 2 * b)(_build_agnostic("full"))
register_method("agnostic-sam-simpler", samples=lambda b, n_t: b + n_t)(_build_agnostic("simpler"))

