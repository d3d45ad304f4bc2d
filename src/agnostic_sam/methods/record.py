r"""The method record: everything a consumer asks about a training method, in one place.

A `MethodInfo` says which optimizer class builds the method and with which fixed arguments; its
settings (`Setting`: name, type, default, range, help; read from the class's ``SETTINGS``);
which setting ``--tune`` searches and which follow it (``rho2 = r * rho2_ratio``); its step shape
(the forward + backward passes on B / B^t / B^v, hence one closure or two, and the closure
protocol); its parameter-sized buffers; its mean cost in batch-equivalents; and the state it keeps
across steps (which travels in ``state_dict()``). `train`, `compare`, `reproduce`, `bench`, the
command line and the framework adapters read it; none compares a method's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from agnostic_sam.optim._settings import Setting, check_settings

__all__ = [
    "CLOSURE_KINDS",
    "PASS_PARTS",
    "SHORTHANDS",
    "Builder",
    "MethodInfo",
    "Setting",
]

# build(params, base_optimizer, base_kwargs, settings, **options) -> optimizer: `settings` holds
# every setting of the method (checked), `options` the sharpness-aware options the trainer passes
# to every method (model, perturbation, loss_scaler, check_finite, max_grad_norm, perturb_eps).
Builder = Callable[..., torch.optim.Optimizer]

PASS_PARTS = ("B", "B^t", "B^v")
# "loss": closure() runs forward + backward and returns the mean loss.
# "per-sample": closure(index=None, backward=True) runs forward on the batch (or its samples
# `index`), calls opt.backward(mean loss) when `backward`, and returns the per-sample losses.
CLOSURE_KINDS = ("loss", "per-sample")
# Settings that are also TrainConfig fields and command-line flags of their own (--rho, ...).
SHORTHANDS = ("rho", "rho1", "rho2", "adaptive")


def _passes_cost(passes: tuple[str, ...], ratio: float) -> float:
    size = {"B": 1.0, "B^t": ratio, "B^v": 1.0 - ratio}
    return sum(size[part] for part in passes)


@dataclass(frozen=True)
class MethodInfo:
    """A registry entry: what consumers ask instead of comparing the method's name."""

    name: str
    build: Builder
    description: str
    # The optimizer class (None for a builder registered without one).
    cls: type[torch.optim.Optimizer] | None = None
    # The paper, as "Authors, Title, Venue Year".
    paper: str = ""
    settings: tuple[Setting, ...] = ()
    # The setting `--tune` searches (None: not tunable) and those that follow it as
    # ``r * rho2_ratio`` (the paper keeps rho1 = 2 rho2).
    tune: str | None = None
    follows: tuple[str, ...] = ()
    # The forward + backward passes of one (full) step, in order, each on "B" (the whole batch),
    # "B^t" or "B^v". A method with B^t / B^v passes splits each batch and its step takes two
    # closures, step(train_closure, val_closure); the others take one, step(closure).
    passes: tuple[str, ...] = ("B",)
    closure: str = "loss"
    # Parameter-sized buffers alive during a step, beyond the base optimizer's state.
    buffers: int = 0
    # Per-parameter or optimizer-wide state kept across steps (names as in `state_dict()`).
    state: tuple[str, ...] = ()
    # Mean forward + backward work of one step in units of |B|: f(settings, ratio); None: the
    # passes' sizes (a method whose cost varies from step to step declares its mean here).
    cost: Callable[[Mapping[str, Any], float], float] | None = None
    # Keyword arguments fixed by this record (e.g. variant="simpler"), not settings a user sets.
    fixed: Mapping[str, Any] = field(default_factory=dict)
    # Where this implementation differs from the authors' code and from pytorch_optimizer, and
    # why (docs/methods.md shows it).
    notes: str = ""
    # Settings that turn the method off: its step is then the base optimizer's step, bit for bit
    # (the conformance suite checks it). None: the tuned setting and its followers at 0.
    off: Mapping[str, Any] | None = None
    # It draws random numbers (RWP's noise, ESAM's subsets, sharp_prob) from a generator it owns:
    # its constructor takes ``seed=`` (an int), which `train` sets from the run's seed.
    random: bool = False
    # The method this record derives from (a scheduled "<name>-sched"); None for a method of its
    # own. Studies of the family list the methods, not their variants.
    variant_of: str | None = None

    @property
    def off_settings(self) -> dict[str, Any]:
        if self.off is not None:
            return dict(self.off)
        return {k: 0.0 for k in self.shown}

    # ---- step shape ---------------------------------------------------------------------------

    @property
    def splits_batch(self) -> bool:
        """Its step takes (train_closure, val_closure) on B^t / B^v."""
        return any(part != "B" for part in self.passes)

    @property
    def closures(self) -> int:
        """Closures per call of ``step``."""
        return 2 if self.splits_batch else 1

    def samples(self, batch_size: int, n_t: int) -> int:
        """Images through forward + backward in one full step, with |B^t| = n_t."""
        size = {"B": batch_size, "B^t": n_t, "B^v": batch_size - n_t}
        return sum(size[part] for part in self.passes)

    def batch_equivalents(self, ratio: float, settings: Mapping[str, Any] | None = None) -> float:
        """Mean forward + backward work of one step in units of |B|, for r = |B^t| / |B|."""
        if self.cost is not None:
            return float(self.cost(self.resolve(settings or {}), ratio))
        return _passes_cost(self.passes, ratio)

    # ---- settings -----------------------------------------------------------------------------

    @property
    def setting_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.settings)

    def setting(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise ValueError(f"method '{self.name}' has no setting {name!r}; its settings: "
                         f"{', '.join(self.setting_names) or 'none'}")

    @property
    def defaults(self) -> dict[str, Any]:
        return {s.name: s.default for s in self.settings}

    def resolve(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Every setting: the record's defaults < ``values`` (checked; an unknown name or a bad
        value is a ValueError naming the allowed ones)."""
        try:
            return {**self.defaults, **check_settings(self.settings, values)}
        except ValueError as exc:
            raise ValueError(f"method '{self.name}': {exc}") from None

    @property
    def tunable(self) -> bool:
        """Has a setting for `--tune` to search."""
        return self.tune is not None

    @property
    def grid(self) -> tuple[float, ...]:
        """The tuned setting's default candidates."""
        return self.setting(self.tune).grid if self.tune else ()

    def tuned_settings(self, value: float, follow_ratio: float) -> dict[str, float]:
        """The settings for candidate ``value``: the tuned one takes it, those that follow it
        ``value * follow_ratio``."""
        if self.tune is None:
            return {}
        return {self.tune: value, **{key: value * follow_ratio for key in self.follows}}

    def as_config(self, values: Mapping[str, Any],
                  method_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """TrainConfig changes that set ``values``: the shorthand settings as their own fields,
        the others merged into ``method_args`` (a run's existing ones)."""
        changes: dict[str, Any] = {k: v for k, v in values.items() if k in SHORTHANDS}
        rest = {k: v for k, v in values.items() if k not in SHORTHANDS}
        if rest:
            changes["method_args"] = {**(method_args or {}), **rest}
        return changes

    @property
    def shown(self) -> tuple[str, ...]:
        """The settings a report shows beside the method's name: the tuned one and its
        followers (for the built-in methods: the radii)."""
        return tuple(k for k in ((self.tune,) if self.tune else ()) + self.follows)

    def settings_text(self, values: Mapping[str, Any], extra: Iterable[str] = ()) -> str:
        """``"rho1=0.1, rho2=0.05"`` for the shown settings (and ``extra`` names) of the resolved
        ``values``; ``"-"`` when there is none."""
        names = list(self.shown) + [k for k in extra if k not in self.shown]
        return ", ".join(f"{k}={_fmt(values[k])}" for k in names if k in values) or "-"


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default_builder(cls: type[torch.optim.Optimizer], fixed: Mapping[str, Any]) -> Builder:
    """build(params, base, base_kwargs, settings, **options) = cls(params, base, **fixed,
    **settings, **options, **base_kwargs)."""

    def build(params: Any, base_optimizer: Any, base_kwargs: Mapping[str, Any],
              settings: Mapping[str, Any], **options: Any) -> torch.optim.Optimizer:
        return cls(params, base_optimizer, **fixed, **settings, **options, **base_kwargs)

    return build
