"""The ``slurm`` launcher: one submitit job array per sweep. Each task runs `SubmititRun`, which
follows submitit's checkpointable protocol, so a preempted or requeued task resumes from its
run's checkpoint and ends bit-identical to an uninterrupted run.

A ledger in the submitit folder (``launch.json``: run directory -> job id) makes a rerun with the
same arguments safe at any time: a run whose job is still queued or running is left to that job
(and waited for with ``wait``), only the others are submitted. Before anything is submitted the
partition and its GPUs are checked with sinfo, and a refusal of sbatch is one line."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agnostic_sam.errors import UsageError
from agnostic_sam.launch.cluster import (
    LIVE,
    describe_state,
    job_states,
    node_limits,
    sbatch_refusal,
)
from agnostic_sam.launch.config import DEFAULT_CPUS, LauncherConfig
from agnostic_sam.launch.outcome import (
    LaunchSummary,
    RunOutcome,
    finish,
    one_line,
    outcome_for,
    run_dir,
    run_one,
)
from agnostic_sam.train.config import TrainConfig
from agnostic_sam.train.rundir import RunDir

__all__ = ["LEDGER_NAME", "SubmititRun", "launch_slurm", "ledger_folder", "read_ledger"]

SLURM_EXTRA = "--launcher slurm needs submitit: pip install 'agnostic-sam[slurm]'"
LEDGER_NAME = "launch.json"  # in the submitit folder: run directory -> SLURM job id
_JOB_NAME = "agnostic-sam"
_POLL_S = 2.0  # how often a waiting launcher looks at its tasks (squeue, result files)
Planned = list[tuple[TrainConfig, str]]  # each run with its RunDir.state


def _resume_if_partial(cfg: TrainConfig) -> TrainConfig | dict[str, Any]:
    """`cfg` with ``resume`` set from the directory's state now, or the outcome when there is
    nothing to train (finished, failed)."""
    rundir = RunDir(run_dir(cfg))
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
        if isinstance(todo, dict):
            print(f"agnostic-sam: {cfg.out} has ended ({todo['status']})", flush=True)
            return todo
        # in the task's log (appended to on a requeue): what each start of the task did
        print(f"agnostic-sam: {'resuming' if todo.resume else 'starting'} {cfg.out}", flush=True)
        return run_one(todo)

    def checkpoint(self, cfg: TrainConfig) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, cfg)


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise UsageError(SLURM_EXTRA) from None
    return submitit


def ledger_folder(cfgs: Sequence[TrainConfig], lc: LauncherConfig) -> Path:
    """submitit's folder for these runs: ``lc.folder``, or ``submitit/`` in their common parent."""
    if lc.folder is not None:
        return Path(lc.folder)
    parents = [os.path.dirname(run_dir(cfg)) for cfg in cfgs] or [os.getcwd()]
    return Path(os.path.commonpath(parents)) / "submitit"


def read_ledger(folder: Path) -> dict[str, str]:
    """Run directory (absolute) -> the SLURM job id that last got it; {} when there is none."""
    try:
        ledger = json.loads((folder / LEDGER_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return ledger if isinstance(ledger, dict) else {}


def _write_ledger(folder: Path, ledger: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{LEDGER_NAME}.tmp"
    tmp.write_text(json.dumps(ledger, indent=1) + "\n")
    os.replace(tmp, folder / LEDGER_NAME)


def _fit_to_nodes(lc: LauncherConfig, *, ask_cluster: bool) -> tuple[LauncherConfig, str]:
    """``lc`` with the defaults of ``gpus_per_run`` and ``cpus_per_run`` decided by what the
    partition's nodes have (sinfo), and a note saying so: 1 GPU where they have a gpu GRES,
    none where they have none; 4 CPUs or all a node has. More GPUs, CPUs or memory than a node
    has is refused in one line naming the flag (SLURM would queue such a job forever or refuse
    it). ``ask_cluster`` False (dry runs): sinfo is asked only for defaults, and a machine
    without it plans 1 GPU and 4 CPUs."""
    fallback = dataclasses.replace(
        lc, gpus_per_run=1 if lc.gpus_per_run is None else lc.gpus_per_run,
        cpus_per_run=DEFAULT_CPUS if lc.cpus_per_run is None else lc.cpus_per_run)
    if lc.submitit_cluster == "local" or not ask_cluster and fallback == lc:
        return fallback, ""  # submitit's LocalExecutor: gpus_per_run is what the tasks see
    try:  # a dry run on a machine whose controller is down must not hang: 5 s
        node = node_limits(lc.partition, timeout=30 if ask_cluster else 5)
    except UsageError:
        if ask_cluster:
            raise
        return fallback, ""
    where = f"partition {lc.partition}" if lc.partition else "the default partition"
    gpus = int(node.gpus > 0) if lc.gpus_per_run is None else lc.gpus_per_run
    cpus = min(DEFAULT_CPUS, node.cpus) if lc.cpus_per_run is None else lc.cpus_per_run
    notes = []
    if lc.gpus_per_run is None and not node.gpus:
        notes.append(f"no GPUs: {where} has no gpu GRES, as --gpus-per-run 0")
    if lc.cpus_per_run is None and cpus < DEFAULT_CPUS:
        notes.append(f"{cpus} CPUs a run: the most a node of {where} has")
    if ask_cluster:
        too_many: list[tuple[str, float, float, str]] = [
            ("--gpus-per-run", gpus, node.gpus, "GPUs"),
            ("--cpus-per-run", cpus, node.cpus, "CPUs")]
        if lc.mem_gb is not None:  # in GB, rounded down to 0.01
            too_many.append(("--mem-gb", lc.mem_gb, int(node.mem_mb / 10.24) / 100, "GB"))
        for flag, asked, most, what in too_many:
            if asked > most:
                have = f"at most {most:g} {what}" if most else "no GPUs (no gpu GRES)"
                raise UsageError(f"the nodes of {where} have {have}, and {flag} {asked:g} asks "
                                 f"for more: use {flag} {most:g}")
    lc = dataclasses.replace(lc, gpus_per_run=gpus, cpus_per_run=cpus)
    return lc, f" ({'; '.join(notes)})" if notes else ""


def _sbatch_options(lc: LauncherConfig) -> dict[str, Any]:
    """Extra #SBATCH options: the user's, and an appending log (a requeued task would truncate
    its own log otherwise)."""
    return {"open_mode": "append", **lc.sbatch}


def _executor_parameters(lc: LauncherConfig, tasks: int) -> dict[str, Any]:
    """submitit AutoExecutor parameters for one array of ``tasks`` runs."""
    params: dict[str, Any] = dict(name=_JOB_NAME, timeout_min=lc.time, nodes=1,
                                  tasks_per_node=1, cpus_per_task=lc.cpus_per_run)
    if lc.gpus_per_run:
        params["gpus_per_node"] = lc.gpus_per_run
    if lc.mem_gb is not None:
        params["mem_gb"] = lc.mem_gb
    if lc.submitit_cluster == "slurm":
        params["slurm_array_parallelism"] = lc.max_parallel or max(tasks, 1)
        if lc.partition is not None:
            params["slurm_partition"] = lc.partition
        params["slurm_additional_parameters"] = _sbatch_options(lc)
    return params


def _sbatch_lines(lc: LauncherConfig, tasks: int, folder: Path) -> list[str]:
    """The #SBATCH lines submitit writes for the array (rendered by submitit itself)."""
    from submitit.slurm.slurm import _convert_mem, _make_sbatch_string

    kwargs: dict[str, Any] = dict(job_name=_JOB_NAME, time=lc.time, nodes=1, ntasks_per_node=1,
                                  gpus_per_node=lc.gpus_per_run or None,
                                  cpus_per_task=lc.cpus_per_run,
                                  partition=lc.partition, map_count=tasks,
                                  array_parallelism=lc.max_parallel or tasks,
                                  additional_parameters=_sbatch_options(lc))
    if lc.mem_gb is not None:
        kwargs["mem"] = _convert_mem(lc.mem_gb)
    text = _make_sbatch_string(command="python -u -m submitit.core._submit FOLDER",
                               folder=folder / "%j", **kwargs)
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def _absolute(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its run and data folders absolute (neither is part of the run's identity)."""
    data_dir = os.path.abspath(os.path.expanduser(cfg.data_dir)) if cfg.data_dir else cfg.data_dir
    return dataclasses.replace(cfg, out=run_dir(cfg), data_dir=data_dir)


def _sort(planned: Planned, ledger: dict[str, str]) -> tuple[list[RunOutcome], list[tuple[
        TrainConfig, RunOutcome]]]:
    """Each run's outcome, and the runs to submit. A run whose earlier job (the ledger) is
    still queued or running is left to it: action "queued", its job id and state."""
    earlier = [ledger[run_dir(cfg)] for cfg, state in planned
               if state in ("new", "partial", "running") and run_dir(cfg) in ledger]
    states = job_states(earlier) if earlier else {}
    outcomes, todo = [], []
    for cfg, state in planned:
        outcome = outcome_for(cfg, state)
        job_id = ledger.get(run_dir(cfg))
        if job_id is not None and state in ("new", "partial", "running") \
                and states.get(job_id) in LIVE:
            outcome.action, outcome.job_id = "queued", job_id
            outcome.job_state = describe_state(states[job_id])
        elif outcome.action in ("trained", "resumed"):
            todo.append((cfg, outcome))
        outcomes.append(outcome)
    return outcomes, todo


def _dry_run(lc: LauncherConfig, folder: Path, outcomes: list[RunOutcome],
             todo: list[tuple[TrainConfig, RunOutcome]], total: int) -> LaunchSummary:
    """Print the job array that would be submitted (its #SBATCH lines) and the runs left out."""
    lines = [f"slurm: job array of {len(todo)} task{'' if len(todo) == 1 else 's'} "
             f"(of {total} runs; "
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


def _submit(lc: LauncherConfig, folder: Path, todo: list[tuple[TrainConfig, RunOutcome]]
            ) -> list[Any]:
    """One job array of the runs in ``todo`` (their outcomes get the job ids). When sbatch
    refuses it, the files submitit wrote for it are removed and the refusal is one line."""
    submitit = _submitit()
    before = set(folder.iterdir()) if folder.is_dir() else None
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=lc.submitit_cluster)
    executor.update_parameters(**_executor_parameters(lc, len(todo)))
    refused = (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError)
    said = io.StringIO()  # submitit prints sbatch's stderr too: it is in our one line instead
    try:
        with contextlib.redirect_stderr(said):
            # absolute folders: a task's working directory is the scheduler's choice
            jobs = executor.map_array(SubmititRun(), [_absolute(cfg) for cfg, _ in todo])
    except refused as exc:
        for path in set(folder.iterdir()) - (before or set()) if folder.is_dir() else ():
            path.unlink()
        if before is None and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise sbatch_refusal(str(exc) or said.getvalue(), len(todo)) from None
    for job, (_, outcome) in zip(jobs, todo):
        outcome.job_id = str(job.job_id)
    return list(jobs)


def _ended(pending: list[tuple[Any, RunOutcome]], on_slurm: bool) -> list[tuple[Any, RunOutcome]]:
    """The jobs of ``pending`` that have ended: their result file is there (submitit looks
    every second), or, on SLURM, the queue no longer holds them and accounting says so.
    (submitit alone asks sacct less and less often, up to once a minute: a cancelled task would
    keep the launcher waiting that long.)"""
    live = set()
    if on_slurm:
        live = {j for j, state in job_states([str(o.job_id) for _, o in pending]).items()
                if state in LIVE}
    return [(job, o) for job, o in pending
            if job.done() or on_slurm and o.job_id not in live and job.done(force_check=True)]


def _wait(lc: LauncherConfig, folder: Path, jobs: list[Any],
          todo: list[tuple[TrainConfig, RunOutcome]], adopted: list[RunOutcome],
          log: Callable[[str], None]) -> None:
    """Wait for the tasks submitted now and for the earlier ones left queued or running;
    each run's outcome gets its result as its task ends (an error in one line when the task
    did not end well: failed, cancelled, killed)."""
    submitit = _submitit()
    pending = list(zip(jobs, (o for _, o in todo)))
    pending += [(submitit.SlurmJob(folder=folder / "%j", job_id=o.job_id), o) for o in adopted]
    started, total, done = time.perf_counter(), len(pending), 0  # times logged: since the wait
    while pending:
        for job, outcome in _ended(pending, lc.submitit_cluster == "slurm"):
            pending.remove((job, outcome))
            try:
                result = job.result()
            except Exception as exc:  # the array goes on; the summary names the run
                result = {"status": "error", "error": one_line(exc)}
            if outcome.action == "queued":
                outcome.action = "adopted"
            done += 1
            finish(outcome, result, started, log, done, total)
        if pending:
            time.sleep(_POLL_S)


def launch_slurm(planned: Planned, lc: LauncherConfig, *, dry_run: bool,
                 log: Callable[[str], None], notice: Callable[[str], None]) -> LaunchSummary:
    """Submit the runs of ``planned`` that need training as one job array (leaving runs whose
    earlier job still runs to it), and with ``lc.wait`` wait for all of them. ``notice`` gets
    what a user must read even without progress lines: what was submitted, what is waited for."""
    folder = ledger_folder([cfg for cfg, _ in planned], lc)
    ledger = read_ledger(folder) if lc.submitit_cluster == "slurm" else {}
    outcomes, todo = _sort(planned, ledger)
    lc, fit_note = _fit_to_nodes(lc, ask_cluster=not dry_run and bool(todo))
    if dry_run:
        return _dry_run(lc, folder, outcomes, todo, len(planned))
    adopted = [o for o in outcomes if o.action == "queued"]
    if adopted:
        notice(f"left to earlier jobs, not submitted again: {len(adopted)} run(s): "
               + ", ".join(f"{o.job_id} ({o.job_state}) {o.out}" for o in adopted))
    jobs = _submit(lc, folder, todo) if todo else []
    if jobs:
        if lc.submitit_cluster == "slurm":
            ledger.update({run_dir(cfg): str(o.job_id) for cfg, o in todo})
            _write_ledger(folder, ledger)
        array = str(jobs[0].job_id).split("_")[0]
        what, logs = ((f"job array {array}", f"{array}_<task>") if "_" in str(jobs[0].job_id)
                      else (f"job {array}", array))  # submitit submits one run as a plain job
        notice(f"submitted {what}: {len(jobs)} task(s) for the unfinished runs; "
               f"watch: squeue -j {array}; logs: {folder}/{logs}/{fit_note}")
    if lc.wait and (jobs or adopted):
        notice(f"waiting for {len(jobs)} task(s) submitted now and {len(adopted)} earlier")
        _wait(lc, folder, jobs, todo, adopted, log)
    else:
        for _, outcome in todo:
            outcome.action = "submitted"
    summary = LaunchSummary("slurm", outcomes)
    log(summary.text())
    return summary
