"""The ``slurm`` launcher: one submitit job array per sweep. Each task runs `SubmititRun`, which
follows submitit's checkpointable protocol, so a preempted or requeued task resumes from its
run's checkpoint and ends bit-identical to an uninterrupted run. A ledger in the submitit folder
(run directory -> job id) lets a rerun leave runs whose job is still queued or running to it."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agnostic_sam.errors import UsageError
from agnostic_sam.launch.config import LauncherConfig
from agnostic_sam.launch.outcome import LaunchSummary, finish, one_line, outcome_for, run_one
from agnostic_sam.train.config import TrainConfig
from agnostic_sam.train.rundir import RunDir

__all__ = ["LEDGER_NAME", "SubmititRun", "launch_slurm"]

SLURM_EXTRA = "--launcher slurm needs submitit: pip install 'agnostic-sam[slurm]'"
LEDGER_NAME = "launch.json"  # in the submitit folder: run directory -> SLURM job id
# SLURM job states in which a submitted run will still start or is going on.
_LIVE_JOB_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING",
                    "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


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


def launch_slurm(planned: list[tuple[TrainConfig, str]], lc: LauncherConfig, *, dry_run: bool,
                  log: Callable[[str], None]) -> LaunchSummary:
    submitit = _submitit()
    folder = _folder(planned, lc)
    ledger = _read_ledger(folder) if lc.submitit_cluster == "slurm" else {}
    earlier = [ledger[os.path.abspath(cfg.out)] for cfg, state in planned
               if state in ("new", "partial") and os.path.abspath(cfg.out) in ledger]
    job_states = _job_states(earlier)
    outcomes, todo = [], []
    for cfg, state in planned:
        outcome = outcome_for(cfg, state)
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
                result = {"status": "error", "error": one_line(exc)}
            finish(outcome, result, submitted, log, done, len(todo))
    else:
        for outcome in (o for _, o in todo):
            outcome.action = "submitted"
    summary = LaunchSummary("slurm", outcomes)
    log(summary.text())
    return summary
