"""A float64 problem for checking a method against a reference written from its paper's equations.

`run_method` trains a small model with a registered method (through `create_optimizer`, the way
every consumer builds it); `run_reference` trains the same model from the same start with an
independent update rule: ``direction(step, grad_at, theta, rho_of) -> list of gradients`` gives
the vector the base optimizer steps with, computed from gradients taken with `torch.autograd.grad`
at explicit weights (nothing of the package is used), and a fresh `torch.optim` base optimizer
steps with it. Both use two param groups with their own lr and weight decay, 20 steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from agnostic_sam.methods import create_optimizer

STEPS = 20
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.01}),
}

GradAt = Callable[[list[Tensor], int], list[Tensor]]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batches(seed: int = 1, steps: int = STEPS, size: int = 16) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 5, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (size,), generator=gen)) for _ in range(steps)]


def groups(model: nn.Module, per_group: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Two groups: the first layer (lr 0.05, no weight decay, `per_group` settings), the rest."""
    params = list(model.parameters())
    first = {"params": params[:2], "lr": 0.05, "weight_decay": 0.0, **(per_group or {})}
    return [first, {"params": params[2:]}]


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


def run_method(name: str, base: str, settings: dict[str, Any] | None = None,
               per_group: dict[str, Any] | None = None, seed: int = 0,
               **options: Any) -> list[Tensor]:
    """The weights after `STEPS` steps of method `name` over base optimizer `base`."""
    model = make_model(seed)
    cls, kwargs = BASES[base]
    opt = create_optimizer(name, groups(model, per_group), cls, kwargs, settings=settings or {},
                           **options)
    for x, y in batches():
        def closure(x=x, y=y) -> Tensor:
            loss = loss_of(model, x, y)
            opt.backward(loss)
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def run_reference(direction: Callable[..., list[Tensor]], base: str,
                  per_group: dict[str, Any] | None = None, seed: int = 0) -> list[Tensor]:
    """The weights after `STEPS` steps where the base optimizer steps with `direction(step,
    grad_at, theta, group_of)`: ``grad_at(weights, step)`` is the batch gradient at explicit
    weights, ``theta`` the current weights, ``group_of[i]`` the param group of parameter i."""
    model = make_model(seed)
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    cls, kwargs = BASES[base]
    opt = cls(groups(ref, per_group), **kwargs)
    group_of = [g for g in opt.param_groups for _ in g["params"]]
    data = batches()

    def grad_at(weights: list[Tensor], step: int) -> list[Tensor]:
        probe = copy.deepcopy(ref)
        with torch.no_grad():
            for p, w in zip(probe.parameters(), weights):
                p.copy_(w)
        x, y = data[step]
        return list(torch.autograd.grad(loss_of(probe, x, y), list(probe.parameters())))

    for step in range(len(data)):
        theta = [p.detach().clone() for p in params]
        d = direction(step, grad_at, theta, group_of)
        for p, g in zip(params, d):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def norm(v: list[Tensor]) -> Tensor:
    return torch.sqrt(sum((t * t).sum() for t in v))


def dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))
