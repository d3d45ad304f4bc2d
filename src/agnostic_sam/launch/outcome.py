"""What a launcher found and did for each run (`RunOutcome`, `LaunchSummary`), and training one
run in this process (`run_one`), which every launcher ends up calling."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agnostic_sam.errors import TrainingDiverged, UsageError
from agnostic_sam.train.config import TrainConfig

__all__ = ["ACTIONS", "LaunchSummary", "RunOutcome", "finish", "one_line", "outcome_for",
           "run_dir", "run_one"]

# RunDir.state before launching -> what the launcher does with the run
ACTIONS = {"new": "trained", "partial": "resumed", "finished": "skipped", "failed": "skipped",
           "running": "left running"}
_DONE = {"finished": "finished", "failed": "diverged"}  # state -> status of a run already done


@dataclass
class RunOutcome:
    """What the launcher found and did for one run."""

    out: str
    state: str  # RunDir.state before launching: new, partial, finished, failed, running
    # trained, resumed, skipped, left running, planned; slurm: submitted, queued (left to an
    # earlier job that is still queued or running), adopted (such a run, waited for)
    action: str
    status: str | None = None  # finished, diverged, error; None when not known (yet)
    error: str | None = None  # one line, for status "error" and "diverged"
    job_id: str | None = None  # slurm
    job_state: str | None = None  # slurm, a run left to an earlier job: queued or running


def run_dir(cfg: TrainConfig) -> str:
    """The absolute run directory of a planned run (planning fills ``out`` in)."""
    if cfg.out is None:
        raise ValueError("a planned run needs its run directory: TrainConfig.out is None")
    return os.path.abspath(cfg.out)


def outcome_for(cfg: TrainConfig, state: str) -> RunOutcome:
    return RunOutcome(str(cfg.out), state, ACTIONS[state], status=_DONE.get(state))


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
        lines += [f"  queued: {r.out} (job {r.job_id}, {r.job_state})"
                  for r in self.runs if r.action == "queued"]
        lines += [f"  {r.status}: {r.out}: {r.error}" for r in self.failed if r.error]
        return "\n".join(lines)

    def raise_for_errors(self) -> None:
        """UsageError naming the first run that raised (diverged runs are results, not errors)."""
        if self.errors:
            first = self.errors[0]
            raise UsageError(f"{len(self.errors)} run(s) failed; the first, {first.out}: "
                             f"{first.error}")


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


def one_line(exc: BaseException) -> str:
    """``Type: last non-empty line of the message`` (a traceback's gist in one line)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def finish(outcome: RunOutcome, result: dict[str, Any], started: float,
           log: Callable[[str], None], done: int, total: int) -> None:
    """Record a run's ``{"status", "error"}`` in its outcome and log ``[done/total]``."""
    outcome.status, outcome.error = result["status"], result.get("error")
    what = outcome.status + (f": {outcome.error}" if outcome.error else "")
    log(f"[{done}/{total}] {outcome.action} {outcome.out} -> {what} "
        f"({time.perf_counter() - started:.0f} s)")
