"""The launcher flags shared by `compare` and `reproduce` (``--launcher``, ``--partition``, ...)
and the `LauncherConfig` they make with a YAML ``launcher:`` mapping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agnostic_sam.errors import UsageError
from agnostic_sam.launch.config import LAUNCHERS, LauncherConfig, launcher_config

__all__ = ["add_launcher_arguments", "launcher_from_args"]


def add_launcher_arguments(parser: Any, *, jobs: bool = True) -> None:
    """The launcher flags (``jobs=False`` when the command already has ``--jobs``)."""
    g = parser.add_argument_group("launcher")
    g.add_argument("--launcher", choices=LAUNCHERS, default=None,
                   help="inline (this process), local (worker processes) or slurm (submitit job "
                        "array)")
    if jobs:
        g.add_argument("--jobs", type=int, default=None,
                       help="--launcher local: worker processes (default: one per GPU, 1 without)")
    g.add_argument("--partition", default=None, help="slurm: partition")
    g.add_argument("--time", default=None,
                   help="slurm: per run, in minutes or SLURM's MM:SS, HH:MM:SS, D-HH[:MM[:SS]]")
    g.add_argument("--gpus-per-run", type=int, default=None,
                   help="slurm: GPUs per run (default: 1 where the partition has GPUs, else 0)")
    g.add_argument("--cpus-per-run", type=int, default=None,
                   help="slurm: CPUs per run (default 4, or all a node has when fewer)")
    g.add_argument("--mem-gb", type=float, default=None, help="slurm: memory per run in GB")
    g.add_argument("--submitit-folder", dest="submitit_folder", default=None,
                   help="slurm: folder for submitit's logs (default: next to the runs)")
    g.add_argument("--max-parallel", type=int, default=None, help="slurm: array tasks at once")
    g.add_argument("--sbatch", action="append", default=None, metavar="KEY=VALUE",
                   help="slurm: extra sbatch option, e.g. --sbatch account=proj, --sbatch requeue "
                        "(repeatable)")
    g.add_argument("--wait", action="store_true", default=None,
                   help="slurm: wait for the job array to end (default: submit and return)")


def launcher_from_args(args: Any, base: Mapping[str, Any] | None = None) -> LauncherConfig:
    """LauncherConfig from a YAML ``launcher:`` mapping (``base``) < the flags in ``args``."""
    sbatch = None
    if getattr(args, "sbatch", None):
        sbatch = dict((base or {}).get("sbatch") or {})
        for item in args.sbatch:
            key, sep, value = item.partition("=")
            if not key.lstrip("-"):
                raise UsageError(f"--sbatch takes KEY=VALUE or a bare KEY, got {item!r}")
            sbatch[key.lstrip("-")] = value if sep else True
    flags: dict[str, Any]  # values of several types, read by key
    flags = {"kind": getattr(args, "launcher", None), "jobs": getattr(args, "jobs", None),
             "partition": getattr(args, "partition", None), "time": getattr(args, "time", None),
             "gpus_per_run": getattr(args, "gpus_per_run", None),
             "cpus_per_run": getattr(args, "cpus_per_run", None),
             "mem_gb": getattr(args, "mem_gb", None),
             "folder": getattr(args, "submitit_folder", None),
             "max_parallel": getattr(args, "max_parallel", None), "sbatch": sbatch,
             "wait": getattr(args, "wait", None)}
    kind = flags["kind"] or (base or {}).get("kind") or "inline"
    # Commands whose --jobs defaults to 1: a 1 does not override the YAML's jobs, nor is it an
    # error for a launcher without workers.
    if flags["jobs"] == 1 and (kind != "local" or (base or {}).get("jobs") is not None):
        flags["jobs"] = None
    if kind == "inline" and flags["jobs"] is not None and flags["jobs"] > 1:  # --jobs N: workers
        flags["kind"] = "local"
    return launcher_config(base, **flags)
