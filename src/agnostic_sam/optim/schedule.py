r"""Sharpness on a schedule: any method whose passes are on B, taking its sharpness-aware step only
on some steps and a plain base step (one pass at theta) on the others, as Composer's SAM does.

Design (issue 19, item 11). The schedule is a property of the step, not of a method's update
rule, so it is written once, here, and applied to a method's class by `on_schedule(cls)`: a
subclass (cached: one per class) whose ``step`` decides, before any pass, whether this step is a
sharpness step; if so it runs ``cls.step`` unchanged, else one pass at theta and the base
optimizer's step (``_transform_final`` of ``cls`` is bypassed). Its ``SETTINGS`` are the class's
plus `SCHEDULE_SETTINGS`; its constructor takes ``seed=`` for the draws. The method registry
gets one record per scheduled method, ``"<name>-sched"``, derived from the method's record
(settings, tuned setting, off settings, state, cost ``1 + (c - 1) p / k`` with c the method's
own cost), so every consumer (train, compare --tune, bench, the adapters) runs it with no
per-method code. No change to `SharpnessOptimizer` is needed. A method whose step keeps state
across steps (LookSAM's v, Friendly-SAM's m, Lookbehind-SAM's cycle) leaves it untouched on the
plain steps: the plain steps are the base optimizer's, as Composer's are.

The rule, with t = 1, 2, ... the optimizer's step count (in ``state_dict()``):

    sharp(t) = (t mod interval == 0) and (sharp_prob == 1 or u_t < sharp_prob)

with u_t ~ U[0, 1) drawn (``torch.rand`` on a CPU ``torch.Generator`` seeded with ``seed``, its
state in ``state_dict()``) before the first pass of every step with t mod interval == 0, and
only when sharp_prob < 1. The draw is on the host: reading it is no device synchronization (the
one read of a tensor's value per such step, besides `_finish`'s). Under DDP every rank must take
the same ``seed`` (`train` passes the run's seed), so that all ranks run the same passes.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from agnostic_sam.optim._base import Closure, SharpnessOptimizer
from agnostic_sam.optim._settings import Setting

__all__ = ["SCHEDULE_SETTINGS", "SharpSchedule", "on_schedule", "scheduled_cost"]

SCHEDULE_SETTINGS = (
    Setting("interval", int, 2, "the sharpness-aware step on steps k, 2k, ...; plain otherwise",
            low=1),
    Setting("sharp_prob", float, 1.0, "probability that a scheduled step is sharpness-aware "
            "(a seeded Bernoulli draw)", low=0.0, high=1.0),
)
_STATE_KEY = "schedule"  # in state_dict(): {"step": int, "generator": CPU generator state}


def scheduled_cost(cost: float, interval: int, sharp_prob: float) -> float:
    """Mean passes per step in units of |B|: plain steps take 1, sharp ones ``cost``."""
    return 1.0 + (cost - 1.0) * sharp_prob / interval


class SharpSchedule(SharpnessOptimizer):
    """The schedule's step; used as the first base of the classes `on_schedule` makes."""

    _schedule_of: type[SharpnessOptimizer]  # the method's class (set by on_schedule)

    def _init_schedule(self, interval: int, sharp_prob: float, seed: int) -> None:
        self.interval = SCHEDULE_SETTINGS[0].check(interval)
        self.sharp_prob = SCHEDULE_SETTINGS[1].check(sharp_prob)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"invalid seed={seed!r}: must be an int")
        self.schedule_step = 0
        self._schedule_gen = torch.Generator().manual_seed(seed)
        self._plain_now = False

    def _sharp_now(self) -> bool:
        """Advance the step count; whether this step is a sharpness step (a host-side draw)."""
        self.schedule_step += 1
        if self.schedule_step % self.interval:
            return False
        if self.sharp_prob >= 1.0:
            return True
        # A CPU generator: reading the draw is no device synchronization.
        return float(torch.rand((), generator=self._schedule_gen)) < self.sharp_prob

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, grad_scaler: Any = None) -> Tensor:  # type: ignore[override]
        """The method's step on scheduled steps, else one pass at theta and the base step."""
        if not callable(closure):
            raise TypeError(f"{type(self).__name__}.step(closure) needs a closure that runs "
                            "forward and backward on the mini-batch and returns the loss")
        if self._sharp_now():
            return super().step(closure, grad_scaler=grad_scaler)  # type: ignore[call-overload]
        return self._plain_step(closure, grad_scaler)

    def _plain_step(self, closure: Closure, grad_scaler: Any) -> Tensor:
        with self._stepping(grad_scaler):
            params, _ = self._params()
            foreach = self._use_foreach(params)
            if self._present_gradients(params):
                raise RuntimeError(f"{type(self).__name__} found gradients in p.grad at step "
                                   "entry: call opt.zero_grad() before, and backward only inside "
                                   "the closure")
            loss = self._run(closure, params, at_theta=True, final=True)
            check: list[Tensor] = []
            self._plain_now = True  # the method's _transform_final is not for this gradient
            try:
                norm = self._final_gradients(params, check, foreach, want_norm=True)
            finally:
                self._plain_now = False
            assert norm is not None  # want_norm=True
            self.stats = {"loss_train": loss, "grad_norm_train": norm}
            self._finish(params, None, check, ("at theta",), foreach)
        return loss

    def _transform_final(self, params: list[Tensor], foreach: bool) -> None:
        if not self._plain_now:
            super()._transform_final(params, foreach)

    def _state_dict(self) -> dict[str, Any]:
        state = super()._state_dict()
        state[_STATE_KEY] = {"step": self.schedule_step,
                             "generator": self._schedule_gen.get_state()}
        return state

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop(_STATE_KEY, None)
        super()._load_state_dict(state_dict)
        if saved is not None:
            self.schedule_step = int(saved["step"])
            self._schedule_gen.set_state(saved["generator"].clone())


_CLASSES: dict[type, type] = {}


def on_schedule(cls: type[SharpnessOptimizer]) -> type[SharpSchedule]:
    """The class of method ``cls`` on a schedule (one per class): its settings plus ``interval``
    and ``sharp_prob``, and ``seed=`` for the draws (also given to ``cls`` when it takes one)."""
    if cls in _CLASSES:
        return _CLASSES[cls]
    if not (isinstance(cls, type) and issubclass(cls, SharpnessOptimizer)):
        raise TypeError(f"on_schedule needs a SharpnessOptimizer subclass, got {cls!r}")
    takes_seed = "seed" in inspect.signature(cls.__init__).parameters
    interval0, prob0 = (s.default for s in SCHEDULE_SETTINGS)

    def __init__(self: Any, params: Any, *args: Any, interval: int = interval0,
                 sharp_prob: float = prob0, seed: int = 0, **kwargs: Any) -> None:
        self._init_schedule(interval, sharp_prob, seed)
        if takes_seed:
            kwargs["seed"] = seed
        cls.__init__(self, params, *args, **kwargs)

    # The signature a reader (and the settings' consistency checks) sees: cls's, plus ours.
    sig = inspect.signature(cls.__init__)
    extra = [inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=s.default)
             for s in SCHEDULE_SETTINGS]
    if not takes_seed:
        extra.append(inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0))
    ps = list(sig.parameters.values())
    var_kw = [p for p in ps if p.kind is inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in ps if p.kind is not inspect.Parameter.VAR_KEYWORD]
    __init__.__signature__ = sig.replace(parameters=rest + extra + var_kw)  # type: ignore[attr-defined]
    name = f"{cls.__name__}OnSchedule"
    made = type(name, (SharpSchedule, cls), {
        "__init__": __init__, "__module__": __name__, "__qualname__": name,
        "SETTINGS": tuple(getattr(cls, "SETTINGS", ())) + SCHEDULE_SETTINGS,
        "_schedule_of": cls,
        "__doc__": f"`{cls.__name__}` on a schedule (see `agnostic_sam.optim.schedule`).",
    })
    _CLASSES[cls] = made
    globals()[name] = made  # so pickle finds it once the class is made (the registry makes it)
    return made
