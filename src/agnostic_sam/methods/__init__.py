r"""The method registry: one record per training method, read by every consumer.

A method is how a step turns closures into an update: plain (one pass, the base optimizer
alone), SAM (two passes on B), Agnostic-SAM (four passes on B^t / B^v) or its simpler variant
(three). Each `MethodInfo` says how it is built from a base optimizer class and its settings,
whether it splits the batch, which radius settings it takes and how many batch-equivalents of
forward + backward one step costs. The trainer, `compare`, `reproduce`, `bench`, the benchmarks
and the command line's ``--optimizer`` choices all ask the record; none compares a name::

    from agnostic_sam.methods import create_optimizer, get_method

    info = get_method("agnostic-sam")
    opt = create_optimizer("agnostic-sam", model.parameters(), torch.optim.SGD,
                           {"lr": 0.1, "momentum": 0.9}, radii={"rho1": 0.1, "rho2": 0.05})
    info.splits_batch        # True: step(train_closure, val_closure)

A method of your own joins with `register_method` (a decorator on its builder); `train` and
`compare` then accept its name. For the command line (and `compare --jobs` worker processes),
register it from a module named in the ``AGNOSTIC_SAM_PLUGINS`` environment variable
(comma-separated module names) or under the ``agnostic_sam.methods`` entry-point group.

Base optimizers (``TrainConfig.base_optimizer``) have their own small table, `BASE_OPTIMIZERS`:
which `torch.optim` class, and which settings it takes.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from agnostic_sam.optim import SAM, AgnosticSAM, Plain

__all__ = [
    "BASE_OPTIMIZERS",
    "METHODS",
    "REFERENCES",
    "BaseOptimizerInfo",
    "Builder",
    "MethodInfo",
    "create_optimizer",
    "get_base_optimizer",
    "get_method",
    "list_methods",
    "load_plugins",
    "register_method",
]

# build(params, base_optimizer, base_kwargs, radii, **options) -> optimizer.
# `radii` holds exactly the method's `radius_keys`; `options` are the sharpness-aware settings
# the trainer passes to every method (model, perturbation, loss_scaler, check_finite,
# max_grad_norm, adaptive): a builder passes on what its optimizer takes.
Builder = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class MethodInfo:
    """A registry entry: what consumers ask instead of comparing the method's name."""

    name: str
    build: Builder
    description: str
    # Radius settings it reads (TrainConfig fields). The first is the one `--tune` searches; the
    # others follow it as ``r * rho2_ratio`` (the paper keeps rho1 = 2 rho2).
    radius_keys: tuple[str, ...] = ()
    # The forward + backward passes of one step, in order, each on "B" (the whole batch), "B^t"
    # or "B^v". A method with B^t / B^v passes splits each batch and its step takes two
    # closures, step(train_closure, val_closure); the others take one, step(closure).
    passes: tuple[str, ...] = ("B",)
    # True: it takes `adaptive` (ASAM's scale-invariant radius).
    adaptive: bool = False

    @property
    def splits_batch(self) -> bool:
        return any(part != "B" for part in self.passes)

    def samples(self, batch_size: int, n_t: int) -> int:
        """Images through forward + backward in one step, with |B^t| = n_t."""
        size = {"B": batch_size, "B^t": n_t, "B^v": batch_size - n_t}
        return sum(size[part] for part in self.passes)

    def batch_equivalents(self, ratio: float) -> float:
        """Forward + backward work of one step in units of |B|, for r = |B^t| / |B|."""
        size = {"B": 1.0, "B^t": ratio, "B^v": 1.0 - ratio}
        return sum(size[part] for part in self.passes)

    @property
    def tunable(self) -> bool:
        """Has a radius for `--tune` to search."""
        return bool(self.radius_keys)

    def tuned_radii(self, radius: float, rho2_ratio: float) -> dict[str, float]:
        """The radius settings for candidate ``radius``: the first key takes it, the rest
        ``radius * rho2_ratio``."""
        if not self.radius_keys:
            return {}
        first, *rest = self.radius_keys
        return {first: radius, **{key: radius * rho2_ratio for key in rest}}

    def radius_text(self, values: Mapping[str, Any] | Any) -> str:
        """``"rho1=0.1, rho2=0.05"`` from a mapping or an object with those attributes; ``"-"``
        for a method without a radius."""
        get = values.get if isinstance(values, Mapping) else lambda k: getattr(values, k)
        return ", ".join(f"{k}={float(get(k)):g}" for k in self.radius_keys) or "-"


METHODS: dict[str, MethodInfo] = {}
# The baselines every other method is paired against in reports, in this order.
REFERENCES = ("sgd", "sam")


def register_method(
    name: str,
    *,
    description: str,
    radius_keys: Iterable[str] = (),
    passes: Iterable[str] = ("B",),
    adaptive: bool = False,
) -> Callable[[Builder], Builder]:
    """Decorator adding a builder to `METHODS` under ``name`` (a new name; lower case, no spaces).

    Radius keys must be `TrainConfig` fields (``rho``, ``rho1``, ``rho2``) so that runs can set
    them from flags and YAML.
    """
    if not isinstance(name, str) or not name or name != name.strip().lower() or " " in name:
        raise ValueError(f"invalid method name {name!r}: use a lower-case name without spaces")
    passes = tuple(passes)
    if not passes or any(part not in ("B", "B^t", "B^v") for part in passes):
        raise ValueError(f"invalid passes {passes!r}: each must be 'B', 'B^t' or 'B^v'")
    if "B" in passes and len(set(passes)) > 1:
        raise ValueError(f"invalid passes {passes!r}: a step either splits the batch or does not")

    def add(build: Builder) -> Builder:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = MethodInfo(name, build, description, tuple(radius_keys), passes, adaptive)
        return build

    return add


def list_methods(filter: Callable[[MethodInfo], bool] | None = None) -> list[str]:
    """Registered method names in registration order, optionally only those ``filter`` keeps."""
    load_plugins()
    return [name for name, info in METHODS.items() if filter is None or filter(info)]


def get_method(name: str) -> MethodInfo:
    """The record of ``name``; ValueError listing the registered names when unknown."""
    load_plugins()
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown optimizer '{name}'; choose from {', '.join(METHODS)}") from None


def create_optimizer(
    name: str,
    params: Any,
    base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
    base_kwargs: Mapping[str, Any] | None = None,
    *,
    radii: Mapping[str, float] | None = None,
    **options: Any,
) -> torch.optim.Optimizer:
    """Build method ``name`` over ``params``: ``base_optimizer(**base_kwargs)`` takes the step.

    ``radii`` must hold the method's radius keys (missing ones -> ValueError; extra ones are
    ignored, so a whole config's radii can be passed). ``options`` go to every method alike:
    ``model``, ``perturbation``, ``loss_scaler``, ``check_finite``, ``max_grad_norm``,
    ``adaptive`` (dropped for methods that take no radius).
    """
    info = get_method(name)
    radii = dict(radii or {})
    missing = [k for k in info.radius_keys if k not in radii]
    if missing:
        raise ValueError(f"method {name!r} needs the radius setting(s) {', '.join(missing)}")
    if not info.adaptive:
        options.pop("adaptive", None)
    return info.build(params, base_optimizer, dict(base_kwargs or {}),
                      {k: radii[k] for k in info.radius_keys}, **options)


# ---- the methods ------------------------------------------------------------------------------

@register_method("sgd", description="the base optimizer alone: one pass per step (SGD by default)")
def _build_plain(params, base_optimizer, base_kwargs, radii, **options):
    return Plain(params, base_optimizer, **options, **base_kwargs)


@register_method("sam", description="SAM (Foret et al. 2021): two passes on B; ASAM with adaptive",
                 radius_keys=("rho",), passes=("B", "B"), adaptive=True)
def _build_sam(params, base_optimizer, base_kwargs, radii, **options):
    return SAM(params, base_optimizer, rho=radii["rho"], **options, **base_kwargs)


def _agnostic(variant: str) -> Builder:
    def build(params, base_optimizer, base_kwargs, radii, **options):
        return AgnosticSAM(params, base_optimizer, rho1=radii["rho1"], rho2=radii["rho2"],
                           variant=variant, **options, **base_kwargs)

    return build


# Passes in the order the optimizers run them: full = B^v at theta, B^v at theta^v, B^t at
# theta, B^t at theta^t (2 |B| samples); simpler skips the second (|B| + |B^t|).
register_method("agnostic-sam", description="Agnostic-SAM, Algorithm 1: four passes on B^t / B^v",
                radius_keys=("rho1", "rho2"), passes=("B^v", "B^v", "B^t", "B^t"),
                adaptive=True)(_agnostic("full"))
register_method("agnostic-sam-simpler",
                description="Agnostic-SAM's simpler variant (Sec. 5.1): three passes",
                radius_keys=("rho1", "rho2"), passes=("B^v", "B^t", "B^t"),
                adaptive=True)(_agnostic("simpler"))


# ---- base optimizers --------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseOptimizerInfo:
    """A base optimizer: its class, and its settings as a function of a run's config."""

    name: str
    cls: type[torch.optim.Optimizer]
    kwargs: Callable[[Any], dict[str, Any]]  # config (TrainConfig-like) -> constructor kwargs


BASE_OPTIMIZERS: dict[str, BaseOptimizerInfo] = {
    "sgd": BaseOptimizerInfo(
        "sgd", torch.optim.SGD,
        lambda c: dict(lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                       nesterov=c.nesterov),
    ),
    # Decoupled weight decay; `momentum` and `nesterov` do not apply.
    "adamw": BaseOptimizerInfo(
        "adamw", torch.optim.AdamW,
        lambda c: dict(lr=c.lr, betas=tuple(c.betas), eps=c.adam_eps,
                       weight_decay=c.weight_decay),
    ),
}


def get_base_optimizer(name: str) -> BaseOptimizerInfo:
    try:
        return BASE_OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown base optimizer '{name}'; choose from {', '.join(BASE_OPTIMIZERS)}"
        ) from None


# ---- plugins ----------------------------------------------------------------------------------

_PLUGINS_LOADED: set[str] = set()


def load_plugins() -> None:
    """Import the modules that register methods of their own: ``$AGNOSTIC_SAM_PLUGINS``
    (comma-separated module names) and the ``agnostic_sam.methods`` entry points. Each once."""
    names = [n.strip() for n in os.environ.get("AGNOSTIC_SAM_PLUGINS", "").split(",") if n.strip()]
    for name in names:
        if name not in _PLUGINS_LOADED:
            _PLUGINS_LOADED.add(name)
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ValueError(f"AGNOSTIC_SAM_PLUGINS: cannot import {name!r} ({exc})") from None
    if "<entry points>" not in _PLUGINS_LOADED:
        _PLUGINS_LOADED.add("<entry points>")
        from importlib.metadata import entry_points

        for ep in entry_points(group="agnostic_sam.methods"):
            ep.load()
