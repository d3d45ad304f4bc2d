"""`LauncherConfig`: where and how a sweep's runs train, and its validation (one line per bad
value, before anything is planned or submitted)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agnostic_sam.errors import UsageError

__all__ = ["DEFAULT_CPUS", "LAUNCHERS", "LAUNCHER_KEYS", "MAX_MEM_GB", "MAX_TIME_MIN",
           "SUBMITIT_CLUSTERS", "LauncherConfig", "launcher_config", "validate_launcher"]

LAUNCHERS = ("inline", "local", "slurm")
DEFAULT_CPUS = 4  # CPUs a SLURM task asks for unless told (or fewer, when a node has fewer)
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
    # None: what suits the partition's nodes (sinfo): 1 GPU where they have a gpu GRES, else
    # none; DEFAULT_CPUS CPUs, or all a node has when it has fewer
    gpus_per_run: int | None = None
    cpus_per_run: int | None = None
    mem_gb: float | None = None  # None: the partition's default
    folder: str | None = None  # submitit's logs and pickles; None: <runs' common parent>/submitit
    max_parallel: int | None = None  # array tasks running at once; None: all
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra #SBATCH options: {"account": "x"}
    wait: bool = False  # block until every task ends (False: submit and return)
    submitit_cluster: str = "slurm"  # "local": submitit's LocalExecutor (tests, one machine)


LAUNCHER_KEYS = tuple(f.name for f in dataclasses.fields(LauncherConfig))
_SBATCH_KEY = re.compile(r"[a-z][a-z0-9_-]*")


# SLURM's --time formats (sbatch(1)): MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME_FORMATS = (
    (re.compile(r"(\d+)"), ("minutes",)),
    (re.compile(r"(\d+):(\d+)"), ("minutes", "seconds")),
    (re.compile(r"(\d+):(\d+):(\d+)"), ("hours", "minutes", "seconds")),
    (re.compile(r"(\d+)-(\d+)"), ("days", "hours")),
    (re.compile(r"(\d+)-(\d+):(\d+)"), ("days", "hours", "minutes")),
    (re.compile(r"(\d+)-(\d+):(\d+):(\d+)"), ("days", "hours", "minutes", "seconds")),
)
MAX_TIME_MIN = 366 * 24 * 60  # a year: longer is a typo, not a run
MAX_MEM_GB = 65536.0  # 64 TiB, beyond any node; 1 MB is the least sbatch can be given
_NAME = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")  # a partition (or a list of them)
# What an #SBATCH value may hold: no newline (a new #SBATCH line), no quote, space or shell
# metacharacter; constraint expressions also use & | [ ] * (sbatch's --constraint syntax).
_SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.,:=@%+/-]+")
_CONSTRAINT_VALUE = re.compile(r"[A-Za-z0-9_.,:=@%+/&|\[\]*-]+")
_TIME_HELP = "minutes or one of SLURM's MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS"


def _parse_time(value: Any) -> int:
    """Minutes (seconds rounded up) from an int or one of SLURM's ``--time`` formats, each
    field in its range (minutes and seconds < 60 below a larger field, hours < 24 after days)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = value.strip() if isinstance(value, str) else ""
    for pattern, names in _TIME_FORMATS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        f = dict(zip(names, (int(g) for g in m.groups())))
        limits: dict[str, int | None] = {
            "seconds": 60, "minutes": 60 if len(names) > 2 or "days" in names else None,
            "hours": 24 if "days" in names else None}
        if all((limit := limits.get(k)) is None or v < limit for k, v in f.items()):
            seconds = (((f.get("days", 0) * 24 + f.get("hours", 0)) * 60 + f.get("minutes", 0))
                       * 60 + f.get("seconds", 0))
            return -(-seconds // 60)
        break
    raise UsageError(f"launcher time must be {_TIME_HELP}, got {value!r}")


def _check_int(name: str, value: Any, low: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UsageError(f"launcher {name} must be an integer >= {low}, got {value!r}")


def _check_mem(mem_gb: Any) -> None:
    if mem_gb is None:
        return
    if (isinstance(mem_gb, bool) or not isinstance(mem_gb, (int, float))
            or not math.isfinite(mem_gb) or not 0.001 <= mem_gb <= MAX_MEM_GB):
        raise UsageError(f"launcher mem_gb must be a number of GB from 0.001 (1 MB) to "
                         f"{MAX_MEM_GB:.0f}, got {mem_gb!r}")


def _check_sbatch(sbatch: Any) -> dict[str, Any]:
    """Extra ``#SBATCH`` options as submitit takes them (``-`` -> ``_``; a bare flag stays
    True: ``--sbatch requeue``, YAML ``requeue: true`` -> ``#SBATCH --requeue``)."""
    if not isinstance(sbatch, Mapping):
        raise UsageError(f"launcher sbatch must map option names to values, got {sbatch!r}")
    for key in sbatch:
        if not isinstance(key, str) or not _SBATCH_KEY.fullmatch(key):
            raise UsageError(f"launcher sbatch option {key!r} is not an sbatch option name "
                             "(e.g. account, qos, constraint)")
        value = sbatch[key]
        if isinstance(value, bool) and not value or not isinstance(value, (str, int, float, bool)):
            raise UsageError(f"launcher sbatch option {key!r} needs a value (or true for a bare "
                             f"flag), got {value!r}")
        allowed = _CONSTRAINT_VALUE if key in ("constraint", "C") else _SBATCH_VALUE
        if value is not True and not allowed.fullmatch(str(value)):
            raise UsageError(f"launcher sbatch option {key!r} has a value an #SBATCH line must not "
                             f"hold, {value!r}: use letters, digits and _.,:=@%+/- only")
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
    if lc.time > MAX_TIME_MIN:
        raise UsageError(f"launcher time must be at most a year ({MAX_TIME_MIN} minutes), got "
                         f"{lc.time} minutes")
    _check_int("jobs", lc.jobs, 1, optional=True)
    _check_int("gpus_per_run", lc.gpus_per_run, 0, optional=True)
    _check_int("cpus_per_run", lc.cpus_per_run, 1, optional=True)
    _check_int("max_parallel", lc.max_parallel, 1, optional=True)
    _check_mem(lc.mem_gb)
    if lc.partition is not None and (not isinstance(lc.partition, str)
                                     or not _NAME.fullmatch(lc.partition)):
        raise UsageError(f"launcher partition must be a partition name (letters, digits, _.-; "
                         f"a comma between several), got {lc.partition!r}")
    if lc.folder is not None and (not isinstance(lc.folder, str)
                                  or not lc.folder.isprintable() or not lc.folder):
        raise UsageError(f"launcher folder must be a path without control characters, got "
                         f"{lc.folder!r}")
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
