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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agnostic_sam.errors import TrainingDiverged, UsageError
from agnostic_sam.train.config import TrainConfig, default_out
from agnostic_sam.train.rundir import RunDir

__all__ = [
    "LAUNCHERS",
    "LAUNCHER_KEYS",
    "LaunchSummary",
    "LauncherConfig",
    "RunOutcome",
    "SubmititRun",
    "add_launcher_arguments",
    "launch",
    "launcher_config",
    "launcher_from_args",
    "visible_gpus",
]

LAUNCHERS = ("inline", "local", "slurm")
SUBMITIT_CLUSTERS = ("slurm", "local")  # "local": submitit's LocalExecutor, no scheduler
SLURM_EXTRA = "--launcher slurm needs submitit: pip install 'agnostic-sam[slurm]'"
LEDGER_NAME = "launch.json"  # in the submitit folder: run directory -> SLURM job id
# SLURM job states in which a submitted run will still start or is going on.
_LIVE_JOB_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING",
                    "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
_PARENT_POLL_S = 0.5  # how often a local worker checks that the launcher is still alive


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
    if not isinstance(lc.sbatch, Mapping):
        raise UsageError(f"launcher sbatch must map option names to values, got {lc.sbatch!r}")
    for key in lc.sbatch:
        if not isinstance(key, str) or not _SBATCH_KEY.match(key):
            raise UsageError(f"launcher sbatch option {key!r} is not an sbatch option name "
                             "(e.g. account, qos, constraint)")
        value = lc.sbatch[key]
        if isinstance(value, bool) and not value or not isinstance(value, (str, int, float, bool)):
            raise UsageError(f"launcher sbatch option {key!r} needs a value (or true for a bare "
                             f"flag), got {value!r}")
    # a bare flag (--sbatch requeue, YAML `requeue: true`) stays True: #SBATCH --requeue
    lc.sbatch = {k.replace("-", "_"): v if v is True else str(v) for k, v in lc.sbatch.items()}
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
    g.add_argument("--time", default=None, help="slurm: minutes (or D-HH:MM:SS) per run")
    g.add_argument("--gpus-per-run", type=int, default=None, help="slurm: GPUs per run (default 1)")
    g.add_argument("--cpus-per-run", type=int, default=None, help="slurm: CPUs per run (default 4)")
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


# ----------------------------------------------------------------------------- outcomes


@dataclass
class RunOutcome:
    """What the launcher found and did for one run."""

    out: str
    state: str  # RunDir.state before launching: new, partial, finished, failed, running
    action: str  # trained, resumed, skipped, left running, queued, submitted, planned
    status: str | None = None  # finished, diverged, error; None when not known (yet)
    error: str | None = None  # one line, for status "error" and "diverged"
    job_id: str | None = None  # slurm


@dataclass
class LaunchSummary:
    """Every run of a sweep with what happened to it; `text()` is the printed summary."""

    kind: str
    runs: list[RunOutcome]
    plan: str | None = None  # dry runs: the plan as printed

    def where(self, **match: Any) -> list[RunOutcome]:
        return [r for r in self.runs if all(getattr(r, k) == v for k, v in match.items())]

    @property
    def errors(self) -> list[RunOutcome]:
        return self.where(status="error")

    @property
    def failed(self) -> list[RunOutcome]:
        """Runs that raised or diverged (now or before)."""
        return [r for r in self.runs if r.status in ("error", "diverged")]

    def text(self) -> str:
        counts: dict[str, int] = {}
        for r in self.runs:
            counts[r.action] = counts.get(r.action, 0) + 1
        parts = ", ".join(f"{n} {a}" for a, n in counts.items()) or "no runs"
        lines = [f"{self.kind}: {len(self.runs)} runs: {parts}"]
        lines += [f"  {r.action}: {r.out} (another process is writing it)"
                  for r in self.runs if r.action == "left running"]
        lines += [f"  {r.status}: {r.out}: {r.error}" for r in self.failed if r.error]
        return "\n".join(lines)

    def raise_for_errors(self) -> None:
        """UsageError naming the first run that raised (diverged runs are results, not errors)."""
        if self.errors:
            first = self.errors[0]
            raise UsageError(f"{len(self.errors)} run(s) failed; the first, {first.out}: "
                             f"{first.error}")


# ----------------------------------------------------------------------------- one run


def run_one(cfg: TrainConfig) -> dict[str, Any]:
    """Train one run in this process with its fixed thread count; ``{"status", "error"}``.
    A diverged run is a result (its result.json says so), not an exception."""
    import torch

    from agnostic_sam.train import train

    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or 1)
    try:
        result = train(cfg)
        return {"status": result.get("status", "finished"), "error": None}
    except TrainingDiverged as exc:
        return {"status": "diverged", "error": str(exc)}
    finally:
        torch.set_num_threads(previous)


def _one_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def _resume_if_partial(cfg: TrainConfig) -> TrainConfig | dict[str, Any]:
    """`cfg` with ``resume`` set from the directory's state now, or the outcome when there is
    nothing to train (finished, failed)."""
    rundir = RunDir(cfg.out)
    state = rundir.state(cfg)
    if state == "running":
        raise UsageError(f"{cfg.out} is being written by another process")
    if state in ("finished", "failed"):
        return {"status": (rundir.read_result() or {}).get("status", state), "error": None}
    return dataclasses.replace(cfg, resume=state == "partial")


class SubmititRun:
    """The callable every array task runs: ``SubmititRun()(cfg)`` trains ``cfg``, resuming
    from its checkpoint when there is one, and returns ``{"status", "error"}``.

    submitit's checkpointable protocol (what `submitit.helpers.Checkpointable` provides, here
    without importing submitit on import): when the task is preempted or about to time out,
    submitit calls ``checkpoint(cfg)`` and requeues the call it returns, the same call. Whether
    it resumes is read from the run directory when the requeued task starts: a task preempted
    before its first epoch end has no checkpoint and starts afresh, any later one continues from
    checkpoint.pt (bit for bit). A requeued task whose run finished meanwhile does nothing.
    """

    def __call__(self, cfg: TrainConfig) -> dict[str, Any]:
        todo = _resume_if_partial(cfg)
        return todo if isinstance(todo, dict) else run_one(todo)

    def checkpoint(self, cfg: TrainConfig) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, cfg)


# ----------------------------------------------------------------------------- planning


def _plan(cfgs: Sequence[TrainConfig]) -> list[tuple[TrainConfig, str]]:
    """Each run with its out filled in and its state; UsageError for two runs in one folder or
    a folder holding another run."""
    planned, seen = [], set()
    for cfg in cfgs:
        out = cfg.out if cfg.out is not None else default_out(cfg)
        key = os.path.realpath(out)
        if key in seen:
            raise UsageError(f"two runs of the sweep share the run directory {out}")
        seen.add(key)
        cfg = dataclasses.replace(cfg, out=str(out))
        state = RunDir(out).state(cfg)
        planned.append((dataclasses.replace(cfg, resume=state == "partial"), state))
    return planned


_ACTIONS = {"new": "trained", "partial": "resumed", "finished": "skipped", "failed": "skipped",
            "running": "left running"}
_DONE = {"finished": "finished", "failed": "diverged"}  # state -> status of a run already done


def _outcome(cfg: TrainConfig, state: str) -> RunOutcome:
    return RunOutcome(cfg.out, state, _ACTIONS[state], status=_DONE.get(state))


def launch(
    cfgs: Sequence[TrainConfig],
    lc: LauncherConfig | None = None,
    *,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_done: Callable[[RunOutcome], None] | None = None,
) -> LaunchSummary:
    """Train every run of ``cfgs`` that is not finished yet, with launcher ``lc`` (see the
    module docstring); returns what happened to each. ``dry_run``: print the plan (for slurm
    the job array and its sbatch options), train nothing. ``log`` (default: stderr when
    ``progress``) gets one line per run; ``on_done`` (e.g. a progress bar's update) is called
    once per run when the launcher is done with it: at once for the runs it does not train."""
    lc = validate_launcher(dataclasses.replace(lc or LauncherConfig()))
    if log is None:
        log = ((lambda line: print(line, file=sys.stderr, flush=True)) if progress
               else (lambda line: None))
    planned = _plan(cfgs)
    done = on_done or (lambda outcome: None)
    if lc.kind == "slurm":
        summary = _launch_slurm(planned, lc, dry_run=dry_run, log=log)
        if not dry_run:
            for outcome in summary.runs:
                done(outcome)
        return summary
    outcomes = [_outcome(cfg, state) for cfg, state in planned]
    todo = [(k, cfg) for k, (cfg, state) in enumerate(planned) if state in ("new", "partial")]
    if dry_run:
        slots = _local_slots(planned, lc) if lc.kind == "local" else [None]
        lines = [f"{lc.kind}: {len(todo)} of {len(planned)} runs to train"
                 + (f", {len(slots)} at a time" if lc.kind == "local" else "")
                 + (f" on GPUs {','.join(str(s) for s in slots)}" if any(slots) else "")]
        lines += [f"  {state:<8} -> {_ACTIONS[state]:<12} {cfg.out}" for cfg, state in planned]
        text = "\n".join(lines)
        print(text)
        for o in outcomes:
            o.action = "planned" if o.state in ("new", "partial") else o.action
        return LaunchSummary(lc.kind, outcomes, plan=text)
    for outcome in outcomes:
        if outcome.state in ("finished", "failed", "running"):
            log(f"{outcome.action:<12} {outcome.out} ({outcome.state})")
            done(outcome)
    if lc.kind == "inline":
        _run_inline(todo, outcomes, log, done)
    else:
        _run_local(todo, outcomes, _local_slots(planned, lc), log, done)
    summary = LaunchSummary(lc.kind, outcomes)
    log(summary.text())
    return summary


def _finish(outcome: RunOutcome, result: dict[str, Any], started: float, log: Callable[[str], None],
            done: int, total: int) -> None:
    outcome.status, outcome.error = result["status"], result.get("error")
    what = outcome.status + (f": {outcome.error}" if outcome.error else "")
    log(f"[{done}/{total}] {outcome.action} {outcome.out} -> {what} "
        f"({time.perf_counter() - started:.0f} s)")


def _run_inline(todo: list[tuple[int, TrainConfig]], outcomes: list[RunOutcome],
                log: Callable[[str], None], on_done: Callable[[RunOutcome], None]) -> None:
    for done, (k, cfg) in enumerate(todo, 1):
        started = time.perf_counter()
        try:
            result = run_one(cfg)
        except Exception as exc:  # the sweep goes on; the summary names the run
            result = {"status": "error", "error": _one_line(exc)}
        _finish(outcomes[k], result, started, log, done, len(todo))
        on_done(outcomes[k])


# ----------------------------------------------------------------------------- local workers


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries ([] without
    CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _local_slots(planned: list[tuple[TrainConfig, str]], lc: LauncherConfig) -> list[str | None]:
    """One entry per worker: the GPU it gets (a ``CUDA_VISIBLE_DEVICES`` value) or None."""
    wants_gpu = [cfg for cfg, state in planned if state in ("new", "partial")
                 and cfg.device not in ("cpu", "mps")]
    gpus = visible_gpus() if wants_gpu else []
    jobs = lc.jobs or max(len(gpus), 1)
    if not gpus:
        return [None] * jobs
    pinned = [cfg for cfg in wants_gpu if cfg.device.startswith("cuda:")]
    if pinned:
        raise UsageError(f"--launcher local gives each run its own GPU; run {pinned[0].out} asks "
                         f"for {pinned[0].device}: use --device cuda or auto")
    return [gpus[i % len(gpus)] for i in range(jobs)]


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker die when the launcher dies, kill -9 included: the kernel's parent-death
    signal on Linux, and on every system a thread that notices the parent PID change."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def _local_worker(gpu: str | None, parent_pid: int, conn: Any) -> None:
    """A worker process: trains the runs the launcher sends, one after another, answering each
    with ``{"status", "error"}``; ends on None or when the launcher goes away."""
    _die_with_parent(parent_pid)
    if gpu is not None:  # before the first CUDA call (CUDA initializes lazily)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    while True:
        try:
            cfg = conn.recv()
        except (EOFError, OSError):
            return
        if cfg is None:
            return
        try:
            result = run_one(cfg)
        except BaseException as exc:  # noqa: BLE001 - reported to the launcher, which goes on
            result = {"status": "error", "error": _one_line(exc)}
        conn.send(result)


class _Worker:
    """The launcher's end of one worker process and the run it is training."""

    def __init__(self, context: Any, gpu: str | None) -> None:
        self.conn, child = context.Pipe()
        self.gpu = gpu
        self.proc = context.Process(target=_local_worker, name="agnostic-sam-worker",
                                    args=(gpu, os.getpid(), child))
        self.proc.start()
        child.close()  # the worker holds the only other end: EOF here when it dies
        self.run: tuple[int, float] | None = None  # (outcome index, start time)

    def give(self, k: int, cfg: TrainConfig) -> None:
        self.conn.send(cfg)
        self.run = (k, time.perf_counter())

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join()
        self.conn.close()


def _run_local(todo: list[tuple[int, TrainConfig]], outcomes: list[RunOutcome],
               slots: list[str | None], log: Callable[[str], None],
               on_done: Callable[[RunOutcome], None]) -> None:
    """One worker process per slot (at most one per run), each training one run after another:
    a worker pays its imports once. A worker that dies takes only its run with it; a new one
    takes its slot."""
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")
    if len(slots) > 1:  # one progress bar per worker would interleave: the launcher's lines only
        todo = [(k, dataclasses.replace(cfg, progress=False)) for k, cfg in todo]
    pending = deque(todo)
    workers = [_Worker(context, gpu) for gpu in slots[: len(todo)]]
    done = 0
    try:
        for w in workers:
            w.give(*pending.popleft())
        while any(w.run is not None for w in workers):
            busy = {w.conn: w for w in workers if w.run is not None}
            for conn in wait(list(busy)):
                w = busy[conn]
                k, started = w.run
                w.run = None
                try:
                    result = conn.recv()
                except (EOFError, OSError):
                    w.proc.join()
                    result = {"status": "error",
                              "error": f"worker exited with status {w.proc.exitcode}"}
                    w.conn.close()
                    workers.remove(w)
                    if pending:  # a new worker takes the dead one's slot
                        w = _Worker(context, w.gpu)
                        workers.append(w)
                done += 1
                _finish(outcomes[k], result, started, log, done, len(todo))
                on_done(outcomes[k])
                if pending and w in workers:
                    w.give(*pending.popleft())
        for w in workers:
            w.stop()
        workers = []
    finally:  # an error or Ctrl-C here: no worker outlives the launcher
        for w in workers:
            w.proc.kill()
            w.proc.join()


# ----------------------------------------------------------------------------- slurm (submitit)


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise UsageError(SLURM_EXTRA) from None
    return submitit


def _folder(planned: list[tuple[TrainConfig, str]], lc: LauncherConfig) -> Path:
    if lc.folder is not None:
        return Path(lc.folder)
    parents = [os.path.abspath(Path(cfg.out).parent) for cfg, _ in planned] or [os.getcwd()]
    return Path(os.path.commonpath(parents)) / "submitit"


def _read_ledger(folder: Path) -> dict[str, str]:
    try:
        return json.loads((folder / LEDGER_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """SLURM's state of jobs submitted earlier (one sacct call through submitit's watcher);
    UNKNOWN for a job sacct does not know (or without sacct)."""
    if not job_ids:
        return {}
    watcher = _submitit().SlurmJob.watcher
    try:
        for job_id in job_ids:
            watcher.register_job(job_id)
        watcher.update()
        infos = {job_id: watcher.get_info(job_id, mode="cache") for job_id in job_ids}
    except Exception:  # noqa: BLE001 - no sacct on this machine: nothing is known to be queued
        return {job_id: "UNKNOWN" for job_id in job_ids}
    return {job_id: (str(info.get("State", "UNKNOWN")).split() or ["UNKNOWN"])[0]
            for job_id, info in infos.items()}


def _executor_parameters(lc: LauncherConfig, tasks: int) -> dict[str, Any]:
    """submitit AutoExecutor parameters for one array of ``tasks`` runs."""
    params: dict[str, Any] = dict(name="agnostic-sam", timeout_min=lc.time, nodes=1,
                                  tasks_per_node=1, cpus_per_task=lc.cpus_per_run)
    if lc.gpus_per_run:
        params["gpus_per_node"] = lc.gpus_per_run
    if lc.mem_gb is not None:
        params["mem_gb"] = lc.mem_gb
    if lc.submitit_cluster == "slurm":
        params["slurm_array_parallelism"] = lc.max_parallel or max(tasks, 1)
        if lc.partition is not None:
            params["slurm_partition"] = lc.partition
        if lc.sbatch:
            params["slurm_additional_parameters"] = dict(lc.sbatch)
    return params


def _sbatch_lines(lc: LauncherConfig, tasks: int, folder: Path) -> list[str]:
    """The #SBATCH lines submitit writes for the array (rendered by submitit itself)."""
    from submitit.slurm.slurm import _make_sbatch_string

    kwargs: dict[str, Any] = dict(job_name="agnostic-sam", time=lc.time, nodes=1, ntasks_per_node=1,
                                  gpus_per_node=lc.gpus_per_run or None,
                                  cpus_per_task=lc.cpus_per_run,
                                  partition=lc.partition, map_count=tasks,
                                  array_parallelism=lc.max_parallel or tasks,
                                  additional_parameters=dict(lc.sbatch) or None)
    if lc.mem_gb is not None:
        kwargs["mem"] = f"{int(lc.mem_gb) if float(lc.mem_gb).is_integer() else lc.mem_gb}GB"
    text = _make_sbatch_string(command="python -u -m submitit.core._submit FOLDER",
                               folder=folder / "%j", **kwargs)
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def _absolute(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its run and data folders absolute (neither is part of the run's identity)."""
    data_dir = os.path.abspath(os.path.expanduser(cfg.data_dir)) if cfg.data_dir else cfg.data_dir
    return dataclasses.replace(cfg, out=os.path.abspath(cfg.out), data_dir=data_dir)


def _launch_slurm(planned: list[tuple[TrainConfig, str]], lc: LauncherConfig, *, dry_run: bool,
                  log: Callable[[str], None]) -> LaunchSummary:
    submitit = _submitit()
    folder = _folder(planned, lc)
    ledger = _read_ledger(folder) if lc.submitit_cluster == "slurm" else {}
    earlier = [ledger[os.path.abspath(cfg.out)] for cfg, state in planned
               if state in ("new", "partial") and os.path.abspath(cfg.out) in ledger]
    job_states = _job_states(earlier)
    outcomes, todo = [], []
    for cfg, state in planned:
        outcome = _outcome(cfg, state)
        job_id = ledger.get(os.path.abspath(cfg.out))
        if state in ("new", "partial") and job_states.get(job_id) in _LIVE_JOB_STATES:
            # submitted before and still pending or running: do not submit it twice
            outcome.action, outcome.job_id = "queued", job_id
            log(f"queued       {cfg.out} (job {job_id}, {job_states[job_id]})")
        if outcome.action in ("trained", "resumed"):
            todo.append((cfg, outcome))
        outcomes.append(outcome)
    if dry_run:
        lines = [f"slurm: job array of {len(todo)} task{'' if len(todo) == 1 else 's'} "
                 f"(of {len(planned)} runs; "
                 f"at most {lc.max_parallel or len(todo)} at once), submitit folder {folder}"]
        if todo:
            lines += _sbatch_lines(lc, len(todo), folder)
        lines += [f"  task {i}: {cfg.out} ({o.state} -> {o.action})"
                  for i, (cfg, o) in enumerate(todo)]
        lines += [f"  not submitted: {o.out} ({o.state} -> {o.action})" for o in outcomes
                  if o.action not in ("trained", "resumed")]
        text = "\n".join(lines)
        print(text)
        for _, o in todo:
            o.action = "planned"
        return LaunchSummary("slurm", outcomes, plan=text)
    if not todo:
        summary = LaunchSummary("slurm", outcomes)
        log(summary.text())
        return summary
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=lc.submitit_cluster)
    executor.update_parameters(**_executor_parameters(lc, len(todo)))
    # absolute folders: a task's working directory is the scheduler's choice
    jobs = executor.map_array(SubmititRun(), [_absolute(cfg) for cfg, _ in todo])
    for job, (cfg, outcome) in zip(jobs, todo):
        outcome.job_id = str(job.job_id)
        ledger[os.path.abspath(cfg.out)] = outcome.job_id
    if lc.submitit_cluster == "slurm":
        folder.mkdir(parents=True, exist_ok=True)
        (folder / LEDGER_NAME).write_text(json.dumps(ledger, indent=1) + "\n")
    array = str(jobs[0].job_id).split("_")[0]
    log(f"submitted job array {array}: {len(jobs)} tasks; watch: squeue -j {array}; "
        f"logs: {folder}/{array}_<task>/")
    if lc.wait:
        submitted = time.perf_counter()  # the times logged are since submission
        for done, (job, (_, outcome)) in enumerate(zip(jobs, todo), 1):
            try:
                result = job.result()
            except Exception as exc:  # the array goes on; the summary names the run
                result = {"status": "error", "error": _one_line(exc)}
            _finish(outcome, result, submitted, log, done, len(todo))
    else:
        for outcome in (o for _, o in todo):
            outcome.action = "submitted"
    summary = LaunchSummary("slurm", outcomes)
    log(summary.text())
    return summary
