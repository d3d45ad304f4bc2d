"""Model registry: ``factory(*, num_classes, in_channels, image_size) -> nn.Module`` per name.

Every full architecture also registers ``<name>_mini``: the same code with depth/width shrunk,
so that parametrized tests exercise each entry in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from agnostic_sam.errors import UsageError

__all__ = ["MODELS", "ModelSpec", "create_model", "list_models", "register_model"]

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry. ``image_size``/``in_channels``: the natural input (for tests, docs)."""

    name: str
    factory: Factory
    image_size: int
    in_channels: int = 3
    description: str = ""


MODELS: dict[str, ModelSpec] = {}


def register_model(
    name: str, *, image_size: int, in_channels: int = 3, description: str = ""
) -> Callable[[Factory], Factory]:
    """Decorator adding ``factory(*, num_classes, in_channels, image_size)`` under ``name``."""

    def add(factory: Factory) -> Factory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = ModelSpec(name, factory, image_size, in_channels, description)
        return factory

    return add


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS)


def create_model(
    name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32
) -> nn.Module:
    """Build model ``name`` for ``num_classes`` outputs on
    ``(in_channels, image_size, image_size)``."""
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels),
                       ("image_size", image_size)):
        if int(value) != value or value < 1:
            raise UsageError(f"{key} must be a positive integer, got {value!r}")
    return MODELS[name].factory(num_classes=int(num_classes), in_channels=int(in_channels),
                                image_size=int(image_size))
