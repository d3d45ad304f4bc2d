r"""The method registry: one record per training method, read by every consumer.

A method is how a step turns closures into an update: plain (one pass, the base optimizer
alone), SAM (two passes on B), Agnostic-SAM (four passes on B^t / B^v), its simpler variant
(three), and the rest of the sharpness-aware family. Each `MethodInfo` (see `record.py`) says how
it is built, its settings (type, default, range, help), which one ``--tune`` searches, its step
shape, buffers, cost and state. The trainer, `compare`, `reproduce`, `bench`, the command line
and the framework adapters all ask the record; none compares a name::

    from agnostic_sam.methods import create_optimizer, get_method

    info = get_method("agnostic-sam")
    opt = create_optimizer("agnostic-sam", model.parameters(), torch.optim.SGD,
                           {"lr": 0.1, "momentum": 0.9}, settings={"rho1": 0.1, "rho2": 0.05})
    info.splits_batch        # True: step(train_closure, val_closure)

A method of your own joins with one call, ``register_method(name, MyOptimizer, description=...,
passes=("B", "B"), tune="rho")`` (its settings come from ``MyOptimizer.SETTINGS``), or with
`register_method` as a decorator on a builder. For the command line (and ``compare --jobs``
worker processes), register it from a module named in ``$AGNOSTIC_SAM_PLUGINS`` (comma-separated
module names) or under the ``agnostic_sam.methods`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from agnostic_sam.methods.base import BASE_OPTIMIZERS, BaseOptimizerInfo, get_base_optimizer
from agnostic_sam.methods.plugins import load_plugins
from agnostic_sam.methods.record import (
    CLOSURE_KINDS,
    PASS_PARTS,
    SHORTHANDS,
    Builder,
    MethodInfo,
    Setting,
    default_builder,
)

__all__ = [
    "BASE_OPTIMIZERS",
    "METHODS",
    "REFERENCES",
    "SHORTHANDS",
    "BaseOptimizerInfo",
    "Builder",
    "MethodInfo",
    "Setting",
    "create_optimizer",
    "get_base_optimizer",
    "get_method",
    "list_methods",
    "load_plugins",
    "method_of",
    "register_method",
]

METHODS: dict[str, MethodInfo] = {}
# The baselines every other method is paired against in reports, in this order.
REFERENCES = ("sgd", "sam")
# Defaults of radius settings registered the 0.2 way (``radius_keys=``): TrainConfig's then.
_RADIUS_DEFAULTS = {"rho": 0.05, "rho1": 0.1, "rho2": 0.05}


def _check_record(name: str, passes: tuple[str, ...], closure: str) -> None:
    if not isinstance(name, str) or not name or name != name.strip().lower() or " " in name:
        raise ValueError(f"invalid method name {name!r}: use a lower-case name without spaces")
    if not passes or any(part not in PASS_PARTS for part in passes):
        raise ValueError(f"invalid passes {passes!r}: each must be 'B', 'B^t' or 'B^v'")
    if "B" in passes and len(set(passes)) > 1:
        raise ValueError(f"invalid passes {passes!r}: a step either splits the batch or does not")
    if closure not in CLOSURE_KINDS:
        raise ValueError(f"invalid closure {closure!r}: one of {', '.join(CLOSURE_KINDS)}")
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")


def _add(info: MethodInfo) -> MethodInfo:
    names = info.setting_names
    for key in ((info.tune,) if info.tune else ()) + info.follows:
        if key not in names:
            raise ValueError(f"method {info.name!r}: tuned setting {key!r} is not one of its "
                             f"settings ({', '.join(names) or 'none'})")
    same_class = [m for m in METHODS.values() if info.cls is not None and m.cls is info.cls]
    if any(m.closures != info.closures or m.closure != info.closure for m in same_class):
        raise ValueError(f"method {info.name!r}: records of one class must share a step shape")
    METHODS[info.name] = info
    return info


def _legacy(name: str, keys: tuple[str, ...], adaptive: bool, buffers: int | None,
            common: dict[str, Any]) -> Callable[[Builder], Builder]:
    """The 0.2 registration: radius settings (with the digits grid) and ``adaptive`` from
    ``radius_keys=``/``adaptive=``, the builder taking ``(params, base, base_kwargs, radii,
    **options)``."""
    legacy = tuple(Setting(k, float, _RADIUS_DEFAULTS.get(k, 0.05), f"radius {k}", low=0.0,
                           grid=(0.05, 0.1, 0.2, 0.4), per_group=True) for k in keys)
    if adaptive:
        legacy += (Setting("adaptive", bool, False, "ASAM's scale-invariant radius"),)
    common = {**common, "follows": keys[1:]}

    def wrap(build: Builder) -> Builder:
        def adapt(params: Any, base: Any, base_kwargs: Any, values: Mapping[str, Any],
                  **options: Any) -> torch.optim.Optimizer:
            radii = {k: values[k] for k in keys}
            if adaptive:
                options["adaptive"] = values["adaptive"]
            return build(params, base, base_kwargs, radii, **options)

        _add(MethodInfo(name, adapt, settings=legacy, tune=keys[0] if keys else None,
                        buffers=buffers or 0, **common))
        return build

    return wrap


def register_method(
    name: str,
    cls: type[torch.optim.Optimizer] | None = None,
    *,
    description: str,
    paper: str = "",
    settings: Iterable[Setting] | None = None,
    tune: str | None = None,
    follows: Iterable[str] = (),
    passes: Iterable[str] = ("B",),
    closure: str = "loss",
    buffers: int | None = None,
    state: Iterable[str] = (),
    cost: Callable[[Mapping[str, Any], float], float] | None = None,
    fixed: Mapping[str, Any] | None = None,
    notes: str = "",
    off: Mapping[str, Any] | None = None,
    random: bool = False,
    variant_of: str | None = None,
    radius_keys: Iterable[str] | None = None,
    adaptive: bool = False,
) -> Any:
    """Add method ``name`` (a new, lower-case name without spaces) to `METHODS`.

    With ``cls`` (an optimizer class taking ``(params, base_optimizer, **settings, **options,
    **base_kwargs)``): registers it now and returns its `MethodInfo`; its settings are
    ``cls.SETTINGS`` less the ``fixed`` keyword arguments, unless given. Without ``cls``: a
    decorator on a builder ``build(params, base_optimizer, base_kwargs, settings, **options)``.
    The 0.2 form, ``radius_keys=("rho",), adaptive=True`` with a builder taking
    ``(params, base_optimizer, base_kwargs, radii, **options)``, is still accepted.
    """
    passes = tuple(passes)
    _check_record(name, passes, closure)
    fixed = dict(fixed or {})
    common: dict[str, Any]  # MethodInfo's keyword arguments, of several types
    common = dict(description=description, paper=paper, follows=tuple(follows), passes=passes,
                  closure=closure, state=tuple(state), cost=cost, fixed=fixed, notes=notes,
                  off=off, random=random, variant_of=variant_of)
    if cls is not None:
        own = tuple(s for s in getattr(cls, "SETTINGS", ()) if s.name not in fixed)
        return _add(MethodInfo(
            name, default_builder(cls, fixed), cls=cls, tune=tune,
            settings=tuple(settings) if settings is not None else own,
            buffers=buffers if buffers is not None else int(getattr(cls, "_num_buffers", 0)),
            **common))
    if radius_keys is not None:  # the 0.2 registration
        return _legacy(name, tuple(radius_keys), adaptive, buffers, common)

    def add(build: Builder) -> Builder:
        _add(MethodInfo(name, build, settings=tuple(settings or ()), tune=tune,
                        buffers=buffers or 0, **common))
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


def method_of(opt: torch.optim.Optimizer) -> MethodInfo:
    """The record of an optimizer built from the registry (by its class): what a framework
    adapter asks to know the step shape of an optimizer a user built (a subclass of a
    registered class has its step shape)."""
    load_plugins()
    for cls in type(opt).__mro__:
        for info in METHODS.values():
            if info.cls is cls:
                return info
    raise TypeError(
        f"expected an optimizer of a registered method (agnostic_sam.methods.list_methods()), got "
        f"{type(opt).__name__}"
    )


def create_optimizer(
    name: str,
    params: Any,
    base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
    base_kwargs: Mapping[str, Any] | None = None,
    *,
    settings: Mapping[str, Any] | None = None,
    radii: Mapping[str, Any] | None = None,
    **options: Any,
) -> torch.optim.Optimizer:
    """Build method ``name`` over ``params``: ``base_optimizer(**base_kwargs)`` takes the step.

    ``settings`` are the method's own (unknown names or bad values: ValueError naming the
    allowed ones; missing ones take the record's defaults). ``radii`` (the 0.2 keyword) may hold
    radii of other methods too: only this method's are taken. ``options`` go to every method
    alike: ``model``, ``perturbation``, ``loss_scaler``, ``check_finite``, ``max_grad_norm``,
    ``perturb_eps``; ``adaptive`` is taken as a setting where the method has one.
    """
    info = get_method(name)
    values = {k: v for k, v in (radii or {}).items() if k in info.setting_names}
    if "adaptive" in options:
        adaptive = options.pop("adaptive")
        if "adaptive" in info.setting_names:
            values["adaptive"] = adaptive
    values.update(settings or {})
    return info.build(params, base_optimizer, dict(base_kwargs or {}), info.resolve(values),
                      **options)


# The built-in methods register themselves on import (after the functions above exist).
from agnostic_sam.methods import builtin as _builtin  # noqa: E402,F401
