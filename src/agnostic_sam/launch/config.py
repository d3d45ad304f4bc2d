"""`LauncherConfig`: where and how a sweep's runs train, and its validation (one line per bad
value, before anything is planned or submitted)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agnostic_sam.errors import UsageError

__all__ = ["LAUNCHERS", "LAUNCHER_KEYS", "SUBMITIT_CLUSTERS", "LauncherConfig", "launcher_config",
           "validate_launcher"]

LAUNCHERS = ("inline", "local", "slurm")
SUBMITIT_CLUSTERS = ("slurm", "local")  # "local": submitit's LocalExecutor, no scheduler


@dataclass
class LauncherConfig:
    """Where and how a sweep's runs train. YAML keys and flags have the same names
    (``gpus_per_run`` <-> ``--gpus-per-run``); see `launcher_config`."""

    kind: str = "inline"  # inline | local | slurm
    # local: worker processes; None -> one per visible CUDA GPU, or 1 on a machine without one
    jobs: int | None = None
    # slurm (submitit)
    partition: str | None = None
    time: int = 24 * 60  # minutes of wall time per run (each requeue gets it again)
    gpus_per_run: int = 1
    cpus_per_run: int = 4
    mem_gb: float | None = None  # None: the partition's default
    folder: str | None = None  # submitit's logs and pickles; None: <runs' common parent>/submitit
    max_parallel: int | None = None  # array tasks running at once; None: all
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra #SBATCH options: {"account": "x"}
    wait: bool = False  # block until every task ends (False: submit and return)
    submitit_cluster: str = "slurm"  # "local": submitit's LocalExecutor (tests, one machine)


LAUNCHER_KEYS = tuple(f.name for f in dataclasses.fields(LauncherConfig))
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")


def _parse_time(value: Any) -> int:
    """Minutes from an int or SLURM's ``[D-]HH:MM[:SS]`` / ``MM``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
        if m:
            days, a, b, c = (int(g) if g else None for g in m.groups())
            if b is None:  # "MM" or "D-HH"
                return (days or 0) * 1440 + (a * 60 if days is not None else a)
            seconds = c or 0
            return (days or 0) * 1440 + a * 60 + b + (1 if seconds else 0)
    raise UsageError(f"launcher time must be minutes or [D-]HH:MM[:SS], got {value!r}")


def _check_int(name: str, value: Any, low: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UsageError(f"launcher {name} must be an integer >= {low}, got {value!r}")


def _check_sbatch(sbatch: Any) -> dict[str, Any]:
    """Extra ``#SBATCH`` options as submitit takes them (``-`` -> ``_``; a bare flag stays
    True: ``--sbatch requeue``, YAML ``requeue: true`` -> ``#SBATCH --requeue``)."""
    if not isinstance(sbatch, Mapping):
        raise UsageError(f"launcher sbatch must map option names to values, got {sbatch!r}")
    for key in sbatch:
        if not isinstance(key, str) or not _SBATCH_KEY.match(key):
            raise UsageError(f"launcher sbatch option {key!r} is not an sbatch option name "
                             "(e.g. account, qos, constraint)")
        value = sbatch[key]
        if isinstance(value, bool) and not value or not isinstance(value, (str, int, float, bool)):
            raise UsageError(f"launcher sbatch option {key!r} needs a value (or true for a bare "
                             f"flag), got {value!r}")
    return {k.replace("-", "_"): v if v is True else str(v) for k, v in sbatch.items()}


def validate_launcher(lc: LauncherConfig) -> LauncherConfig:
    """`lc` with ``time`` in minutes, or UsageError naming the bad value (one line)."""
    if lc.kind not in LAUNCHERS:
        raise UsageError(f"unknown launcher {lc.kind!r}; choose from {', '.join(LAUNCHERS)}")
    if lc.submitit_cluster not in SUBMITIT_CLUSTERS:
        raise UsageError("launcher submitit_cluster must be one of "
                         f"{', '.join(SUBMITIT_CLUSTERS)}, got {lc.submitit_cluster!r}")
    lc.time = _parse_time(lc.time)
    _check_int("time (minutes)", lc.time, 1)
    _check_int("jobs", lc.jobs, 1, optional=True)
    _check_int("gpus_per_run", lc.gpus_per_run, 0)
    _check_int("cpus_per_run", lc.cpus_per_run, 1)
    _check_int("max_parallel", lc.max_parallel, 1, optional=True)
    if lc.mem_gb is not None and (isinstance(lc.mem_gb, bool)
                                  or not isinstance(lc.mem_gb, (int, float))
                                  or lc.mem_gb <= 0):
        raise UsageError(f"launcher mem_gb must be a number > 0, got {lc.mem_gb!r}")
    if lc.partition is not None and (not isinstance(lc.partition, str) or not lc.partition.strip()):
        raise UsageError(f"launcher partition must be a name, got {lc.partition!r}")
    lc.sbatch = _check_sbatch(lc.sbatch)
    if lc.jobs is not None and lc.kind != "local":
        raise UsageError(f"--jobs is for --launcher local, not {lc.kind}")
    return lc


def launcher_config(values: Mapping[str, Any] | None = None, **overrides: Any) -> LauncherConfig:
    """A validated LauncherConfig from a mapping (a YAML ``launcher:`` section), then keyword
    overrides (flags); None values are ignored; unknown keys are refused."""
    merged: dict[str, Any] = {}
    for layer in (values or {}), overrides:
        if not isinstance(layer, Mapping):
            raise UsageError(f"the launcher section must be a mapping, got {layer!r}")
        for key, value in layer.items():
            if key not in LAUNCHER_KEYS:
                raise UsageError(f"unknown launcher key '{key}'; choose from "
                                 f"{', '.join(LAUNCHER_KEYS)}")
            if value is not None:
                merged[key] = value
    if "sbatch" in merged and not isinstance(merged["sbatch"], Mapping):
        raise UsageError("launcher sbatch must map option names to values, got "
                         f"{merged['sbatch']!r}")
    return validate_launcher(LauncherConfig(**merged))
