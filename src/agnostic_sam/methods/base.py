"""Base optimizers (``TrainConfig.base_optimizer``): which `torch.optim` class takes the step of
every method, and which of a run's settings it takes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BASE_OPTIMIZERS", "BaseOptimizerInfo", "get_base_optimizer"]


@dataclass(frozen=True)
class BaseOptimizerInfo:
    """A base optimizer: its class, and its settings as a function of a run's config."""

    name: str
    cls: type[torch.optim.Optimizer]
    kwargs: Callable[[Any], dict[str, Any]]  # config (TrainConfig-like) -> constructor kwargs
    # The state key of its first-moment buffer (momentum), for methods that read it.
    momentum_key: str | None = None


BASE_OPTIMIZERS: dict[str, BaseOptimizerInfo] = {
    "sgd": BaseOptimizerInfo(
        "sgd", torch.optim.SGD,
        lambda c: dict(lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                       nesterov=c.nesterov),
        momentum_key="momentum_buffer",
    ),
    # Decoupled weight decay; `momentum` and `nesterov` do not apply.
    "adamw": BaseOptimizerInfo(
        "adamw", torch.optim.AdamW,
        lambda c: dict(lr=c.lr, betas=tuple(c.betas), eps=c.adam_eps,
                       weight_decay=c.weight_decay),
        momentum_key="exp_avg",
    ),
}


def get_base_optimizer(name: str) -> BaseOptimizerInfo:
    try:
        return BASE_OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown base optimizer '{name}'; choose from {', '.join(BASE_OPTIMIZERS)}"
        ) from None
