"""What a comparison runs: its config (`CompareConfig`, from defaults < YAML < flags) and its
planned runs (`PlannedRun`). Shared by `agnostic_sam.compare.run` (which runs them) and
`agnostic_sam.compare.report` (which reports them)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from agnostic_sam.errors import UsageError
from agnostic_sam.launch import LauncherConfig, launcher_config
from agnostic_sam.methods import list_methods
from agnostic_sam.train.config import TrainConfig, load_config, read_config_file

__all__ = ["COMPARE_KEYS", "CompareConfig", "PlannedRun", "load_compare_config"]


@dataclass
class CompareConfig:
    """What to compare. ``train`` is the shared per-run config; ``train.out`` is the root."""

    train: TrainConfig
    optimizers: list[str] = field(default_factory=list_methods)  # every registered method
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    jobs: int = 1
    tune: list[float] | None = None  # candidate radii (rho for SAM, rho1 for Agnostic-SAM)
    rho2_ratio: float = 0.5  # Agnostic-SAM rho2 = rho1 * rho2_ratio while tuning
    hessian: bool = False  # add each final model's top Hessian eigenvalue (slow)
    # Where the runs train: a LauncherConfig, or a YAML ``launcher:`` mapping (inline, local
    # worker processes, slurm through submitit). ``jobs > 1`` alone means local workers.
    launcher: Any = None

    def __post_init__(self) -> None:
        self.optimizers = [str(o) for o in _as_list(self.optimizers, "optimizers")]
        known = list_methods()
        unknown = [o for o in self.optimizers if o not in known]
        if unknown or not self.optimizers:
            raise UsageError(
                f"optimizers must be a non-empty subset of {', '.join(known)}; "
                f"got {unknown or 'none'}"
            )
        if len(set(self.optimizers)) != len(self.optimizers):
            raise UsageError(f"optimizers listed twice: {self.optimizers}")
        seeds = _as_list(self.seeds, "seeds")
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise UsageError(f"seeds must be a non-empty list of integers, got {self.seeds!r}")
        bad = [s for s in seeds if not 0 <= s < 2**32]
        if bad:
            raise UsageError(f"seeds must be in [0, 2**32), got {bad[0]}")
        if len(set(seeds)) != len(seeds):
            raise UsageError(f"seeds listed twice: {seeds}")
        self.seeds = list(seeds)
        if not isinstance(self.jobs, int) or isinstance(self.jobs, bool) or self.jobs < 1:
            raise UsageError(f"jobs must be an integer >= 1, got {self.jobs!r}")
        if self.tune is not None:
            tune = [_positive(r, "tune radius") for r in _as_list(self.tune, "tune")]
            if not tune:
                raise UsageError("tune needs at least one radius")
            self.tune = sorted(set(tune))
        self.rho2_ratio = _positive(self.rho2_ratio, "rho2_ratio")
        if not isinstance(self.hessian, bool):
            raise UsageError(f"hessian must be true or false, got {self.hessian!r}")
        if not isinstance(self.launcher, LauncherConfig):
            if self.launcher is not None and not isinstance(self.launcher, Mapping):
                raise UsageError(
                    f"launcher must be a mapping of launcher keys, got {self.launcher!r}"
                )
            section = dict(self.launcher or {})
            if self.jobs > 1 and section.get("kind", "inline") in ("inline", "local"):
                section.update(kind="local", jobs=self.jobs)  # `jobs: N` alone: local workers
            self.launcher = launcher_config(section)


def _as_list(value: Any, name: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise UsageError(f"{name} must be a list, got {value!r}")


def _positive(value: Any, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or not math.isfinite(value)
    ):
        raise UsageError(f"{name} must be a positive number, got {value!r}")
    return float(value)


COMPARE_KEYS = tuple(f.name for f in dataclasses.fields(CompareConfig) if f.name != "train")
# TrainConfig keys that compare sets for each run from its lists.
_PER_RUN_KEYS = ("optimizer", "seed")


def load_compare_config(
    path: str | Path | None,
    compare_overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
) -> CompareConfig:
    """Defaults < YAML file < overrides (``None`` values in overrides mean "not given").

    The YAML holds train keys and the compare keys (``optimizers``, ``seeds``, ``jobs``,
    ``tune``, ``rho2_ratio``, ``hessian``, a ``launcher:`` mapping) side by side; ``out`` is
    the comparison root (default ``runs/compare-<dataset>-<model>``).
    """
    file_values: dict[str, Any] = {}
    if path is not None:
        file_values = {str(k).replace("-", "_"): v for k, v in read_config_file(path).items()}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in file_values:
        if key in _PER_RUN_KEYS:
            raise UsageError(
                f"config key '{key}' in {path} is set per run by compare; use '{key}s:' (a list)"
            )
        if key not in train_keys and key not in COMPARE_KEYS:
            raise UsageError(f"unknown config key '{key}' in {path}")
    compare_values = {k: file_values.pop(k) for k in COMPARE_KEYS if k in file_values}
    compare_values.update({k: v for k, v in (compare_overrides or {}).items() if v is not None})
    overrides = {k: v for k, v in (train_overrides or {}).items() if v is not None}
    train_cfg = load_config(None, overrides, base=file_values)
    if file_values.get("out") is None and overrides.get("out") is None:
        train_cfg.out = str(Path("runs") / f"compare-{train_cfg.dataset}-{train_cfg.model}")
    return CompareConfig(train=train_cfg, **compare_values)


@dataclass(frozen=True)
class PlannedRun:
    """One run of a comparison: its phase, method, seed, tuned radius and full config."""

    phase: str  # "tune" or "final"
    optimizer: str
    seed: int
    radius: float | None  # the tuned radius, None = the config's own radii
    cfg: TrainConfig

    @property
    def out(self) -> str:
        """The run's directory (`run._plan` always sets it)."""
        return cast(str, self.cfg.out)
