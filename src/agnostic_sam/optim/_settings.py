"""A method's settings as data: name, type, default, valid range, one-line help.

Each optimizer class lists its settings in ``SETTINGS``; its constructor checks them with
`check_settings` (a ValueError naming the value and the range, the torch.optim convention), and
the method registry (`agnostic_sam.methods`) reads the same records to build configs, command-line
help, tuning grids and documentation. One list, so a setting is never typed twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Setting", "check_settings"]

_TYPES = (float, int, bool, str)


@dataclass(frozen=True)
class Setting:
    """One setting of a method. ``kind`` is float, int, bool or str; a number lies in
    ``[low, high]`` (an end is open where ``low_open``/``high_open``; None: unbounded);
    ``optional``: None is allowed (and means what ``help`` says); ``choices``: the allowed values
    of a str setting; ``grid``: the candidates ``--tune`` searches when this is the tuned setting.
    ``per_group``: the value lives in each param group (a per-group hyper-parameter, like lr)."""

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    choices: tuple[str, ...] = ()
    grid: tuple[float, ...] = ()
    per_group: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _TYPES:
            raise TypeError(f"setting {self.name!r}: kind must be float, int, bool or str")
        if self.default is not None or not self.optional:
            self.check(self.default)

    def range_text(self) -> str:
        """``"a float in [0, inf)"``, ``"an int >= 1"``, ``"true or false"``, ``"one of a, b"``."""
        if self.kind is bool:
            text = "true or false"
        elif self.kind is str:
            text = "one of " + ", ".join(self.choices) if self.choices else "a string"
        else:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            left = "(" if self.low_open or self.low is None else "["
            right = ")" if self.high_open or self.high is None else "]"
            text = f"{'an int' if self.kind is int else 'a float'} in {left}{lo}, {hi}{right}"
        return text + (" or null" if self.optional else "")

    def check(self, value: Any) -> Any:
        """``value`` as this setting's type (an int is taken for a float); ValueError naming
        the setting, the value and the allowed range otherwise."""
        if value is None and self.optional:
            return None
        ok = False
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is str:
            ok = isinstance(value, str) and (not self.choices or value in self.choices)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.kind is int and not isinstance(value, int):
                ok = False
            else:
                value = self.kind(value)
                ok = math.isfinite(value) and self._in_range(value)
        if not ok:
            raise ValueError(f"invalid {self.name}={value!r}: must be {self.range_text()}")
        return value

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


def check_settings(settings: Iterable[Setting], values: Mapping[str, Any]) -> dict[str, Any]:
    """Every value of ``values`` checked against its setting (ValueError for an unknown name
    or a bad value); returns the checked values."""
    known = {s.name: s for s in settings}
    out = {}
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"unknown setting {name!r}; the settings are "
                             f"{', '.join(known) or 'none'}")
        out[name] = known[name].check(value)
    return out
