"""Sweep launchers: train a list of runs in this process, in worker processes, or on SLURM.

`launch(cfgs, lc)` looks at each run's directory first (`RunDir.state`, decided by the run's
identity) and then does only what is left::

    finished  -> skipped (nothing is opened for writing, no file is touched)
    failed    -> skipped (a run that diverged is a result; delete its folder to rerun it)
    partial   -> resumed (``resume=True``: continues bit for bit from checkpoint.pt)
    running   -> left alone and reported (another process holds its lock)
    new       -> trained

Launchers (`LauncherConfig.kind`):

``inline``  one run after another in this process.
``local``   ``jobs`` worker processes on this machine (spawn, not fork), each training one
            run after another; with GPUs one worker per GPU (``CUDA_VISIBLE_DEVICES``).
            Workers die with the launcher, kill -9 included: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``
            on Linux and a thread that watches the parent PID everywhere. Every file a run writes
            is written atomically, so a killed sweep leaves the last checkpoints intact.
``slurm``   one submitit job array per sweep (partition, time, GPUs, CPUs and memory per run,
            at most ``max_parallel`` tasks at once). Each task runs `SubmititRun`, which
            follows submitit's checkpointable protocol: on preemption or time-out submitit
            calls its ``checkpoint`` and requeues the same call, and the call resumes from the
            run's checkpoint, so a preempted run ends bit-identical to an uninterrupted one.

Every run trains with a fixed thread count (``cfg.threads or 1``) and the same code path, so
the numbers do not depend on the launcher or on ``jobs``.

Modules: `config` (LauncherConfig and its validation), `outcome` (what happened to each run),
`sweep` (planning, `launch`, `unfinished`), `local` (inline and worker processes), `slurm`
(submitit job arrays and their ledger), `cluster` (what sinfo, squeue and sacct say).
The command-line flags are in `agnostic_sam.cli.launcher`.
"""

from agnostic_sam.launch.config import (
    LAUNCHER_KEYS,
    LAUNCHERS,
    LauncherConfig,
    launcher_config,
    validate_launcher,
)
from agnostic_sam.launch.local import visible_gpus
from agnostic_sam.launch.outcome import LaunchSummary, RunOutcome, run_one
from agnostic_sam.launch.slurm import SubmititRun
from agnostic_sam.launch.sweep import launch, unfinished

__all__ = [
    "LAUNCHERS",
    "LAUNCHER_KEYS",
    "LaunchSummary",
    "LauncherConfig",
    "RunOutcome",
    "SubmititRun",
    "launch",
    "launcher_config",
    "run_one",
    "unfinished",
    "validate_launcher",
    "visible_gpus",
]
