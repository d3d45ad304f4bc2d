"""`launch(cfgs, lc)`: plan a sweep by each run's state, then hand what is left to the launcher
(see the package docstring for what each state leads to)."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence

from agnostic_sam.errors import UsageError
from agnostic_sam.launch.cluster import describe_state, job_states
from agnostic_sam.launch.config import LauncherConfig, validate_launcher
from agnostic_sam.launch.local import local_slots, run_inline, run_local
from agnostic_sam.launch.outcome import ACTIONS, LaunchSummary, RunOutcome, outcome_for, run_dir
from agnostic_sam.launch.slurm import launch_slurm, ledger_folder, read_ledger
from agnostic_sam.train.config import TrainConfig, default_out
from agnostic_sam.train.rundir import RunDir

__all__ = ["launch", "unfinished"]


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


def _dry_run(planned: list[tuple[TrainConfig, str]], outcomes: list[RunOutcome],
             lc: LauncherConfig) -> LaunchSummary:
    """Print what the inline or local launcher would do; train nothing."""
    todo = [cfg for cfg, state in planned if state in ("new", "partial")]
    slots = local_slots(planned, lc) if lc.kind == "local" else [None]
    lines = [f"{lc.kind}: {len(todo)} of {len(planned)} runs to train"
             + (f", {len(slots)} at a time" if lc.kind == "local" else "")
             + (f" on GPUs {','.join(str(s) for s in slots)}" if any(slots) else "")]
    lines += [f"  {state:<8} -> {ACTIONS[state]:<12} {cfg.out}" for cfg, state in planned]
    text = "\n".join(lines)
    print(text)
    for o in outcomes:
        o.action = "planned" if o.state in ("new", "partial") else o.action
    return LaunchSummary(lc.kind, outcomes, plan=text)


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
    package docstring); returns what happened to each. ``dry_run``: print the plan (for slurm
    the job array and its sbatch options), train nothing. ``log`` (default: stderr when
    ``progress``) gets one line per run; ``on_done`` (e.g. a progress bar's update) is called
    once per run when the launcher is done with it: at once for the runs it does not train."""
    lc = validate_launcher(dataclasses.replace(lc or LauncherConfig()))
    if log is None:
        log = ((lambda line: print(line, file=sys.stderr, flush=True)) if progress
               else (lambda line: None))
    planned = _plan(cfgs)
    done = on_done or (lambda outcome: None)
    if lc.kind == "slurm":  # what was submitted and what is waited for is said in any case
        notice = log if progress else (lambda line: print(line, file=sys.stderr, flush=True))
        summary = launch_slurm(planned, lc, dry_run=dry_run, log=log, notice=notice)
        if not dry_run:
            for outcome in summary.runs:
                done(outcome)
        return summary
    outcomes = [outcome_for(cfg, state) for cfg, state in planned]
    if dry_run:
        return _dry_run(planned, outcomes, lc)
    todo = [(k, cfg) for k, (cfg, state) in enumerate(planned) if state in ("new", "partial")]
    for outcome in outcomes:
        if outcome.state in ("finished", "failed", "running"):
            log(f"{outcome.action:<12} {outcome.out} ({outcome.state})")
            done(outcome)
    if lc.kind == "inline":
        run_inline(todo, outcomes, log, done)
    else:
        run_local(todo, outcomes, local_slots(planned, lc), log, done)
    summary = LaunchSummary(lc.kind, outcomes)
    log(summary.text())
    return summary


def unfinished(cfgs: Sequence[TrainConfig], lc: LauncherConfig | None = None) -> list[str]:
    """One line per run of ``cfgs`` that has not ended (neither finished nor diverged): where
    it stands and its directory. With the slurm launcher, a run submitted earlier is named by
    its job and the job's state (queued, running, cancelled, failed (TIMEOUT), ...); other runs
    by their directory: not started, partial (stopped; the next launch resumes it), or running
    (another process holds its lock)."""
    lc = lc or LauncherConfig()
    runs = _plan(cfgs)
    todo = [(cfg, state) for cfg, state in runs if state not in ("finished", "failed")]
    ledger: dict[str, str] = {}
    if lc.kind == "slurm" and lc.submitit_cluster == "slurm" and todo:
        ledger = read_ledger(ledger_folder([cfg for cfg, _ in runs], lc))
    mine = {run_dir(cfg): ledger.get(run_dir(cfg)) for cfg, _ in todo}
    jobs = [j for j in mine.values() if j is not None]
    try:
        states = {j: describe_state(s) for j, s in job_states(jobs).items()}
    except UsageError as exc:  # no cluster to ask here: name the jobs anyway
        states = {j: f"state unknown ({exc})" for j in jobs}
    words = {"new": "not started", "partial": "partial (stopped; the next launch resumes it)",
             "running": "running (another process holds its lock)"}
    lines = []
    for cfg, state in todo:
        job = mine[run_dir(cfg)]
        lines.append(f"{states[job]} (job {job}): {cfg.out}" if job else
                     f"{words[state]}: {cfg.out}")
    return lines
