"""Several optimizers x seeds: run them, tabulate them, pair them, and tune their radii honestly.

Layout of a comparison directory ``<out>``::

    <out>/<optimizer>/seed<k>/                 the runs that are reported (full training set)
    <out>/tune/<optimizer>/rho<r>/seed<k>/     radius-tuning runs (held-out validation split)
    <out>/comparison.json, comparison.md       summary, paired statistics, tuning grid
    <out>/accuracy_curves.png                  test accuracy per epoch, mean ± std over seeds

Radius tuning (``tune``): each optimizer with a radius is trained, for every candidate ``r``,
with ``rho = r`` (SAM) or ``rho1 = r, rho2 = r * rho2_ratio`` (Agnostic-SAM family; the paper
keeps ``rho1 = 2 rho2`` throughout) on the training set minus a stratified validation part
(``TrainConfig.val_fraction``; the data module then never loads the test set). The radius with the
best mean final validation accuracy over the seeds wins (ties -> the smaller radius). Only then
is every optimizer retrained on the full training set with its chosen radius and evaluated once
on the test set, so the reported test numbers played no part in choosing anything.

Every run has a fixed thread count (``threads``, 1 unless set) and runs with its own progress
bar off, so ``jobs=N`` worker processes give bit-identical numbers to ``jobs=1``.

This module plans and runs the runs; `agnostic_sam.compare.report` summarizes them and writes
the report files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from agnostic_sam.compare.config import (
    COMPARE_KEYS,
    CompareConfig,
    PlannedRun,
    load_compare_config,
)
from agnostic_sam.compare.report import REPORT_KEYS, unusable, write_report
from agnostic_sam.errors import TrainingDiverged, UsageError
from agnostic_sam.launch import launch, unfinished
from agnostic_sam.methods import get_method
from agnostic_sam.stats import Summary, summarize
from agnostic_sam.train.config import method_settings
from agnostic_sam.train.rundir import RunDir

__all__ = ["CompareConfig", "PlannedRun", "compare", "load_compare_config", "select_radius"]

# Held-out share of the training set used for tuning when the config does not set one.
DEFAULT_TUNE_VAL_FRACTION = 0.1
# Mean accuracies closer than this (percentage points) count as a tie: they differ only by
# floating-point summation order.
_TIE = 1e-9


def select_radius(grid: Mapping[float, Summary]) -> float:
    """The radius with the highest mean validation accuracy; ties go to the smaller radius."""
    if not grid:
        raise ValueError("select_radius needs at least one radius")
    usable = {r: s for r, s in grid.items() if s.n > 0}  # radii whose runs all diverged drop out
    if not usable:
        raise UsageError("every candidate radius diverged while tuning; lower --lr or the radii")
    grid = usable
    best = max(s.mean for s in grid.values())
    return min(r for r, s in grid.items() if s.mean >= best - _TIE)


# ----------------------------------------------------------------------------- planning and running


def _plan(
    cc: CompareConfig, phase: str, radii: Mapping[str, list[float | None]], val_fraction: float
) -> list[PlannedRun]:
    root = Path(cast(str, cc.train.out))  # load_compare_config sets it
    runs = []
    for optimizer, candidates in radii.items():
        for radius in candidates:
            for seed in cc.seeds:
                if phase == "tune":
                    run_dir = root / "tune" / optimizer / f"rho{radius:g}" / f"seed{seed}"
                else:
                    run_dir = root / optimizer / f"seed{seed}"
                changes: dict[str, Any] = dict(
                    optimizer=optimizer,
                    seed=seed,
                    out=str(run_dir),
                    val_fraction=val_fraction,
                    progress=False,
                    threads=cc.train.threads or 1,
                )
                if radius is not None:
                    info = get_method(optimizer)
                    changes.update(info.as_config(info.tuned_settings(radius, cc.rho2_ratio),
                                                  cc.train.method_args))
                cfg = dataclasses.replace(cc.train, **changes)
                runs.append(PlannedRun(phase, optimizer, seed, radius, cfg))
    return runs


def _execute(runs: list[PlannedRun], cc: CompareConfig, *, dry_run: bool,
             report_only: bool) -> bool:
    """Train what is not finished yet with the comparison's launcher (finished runs are
    skipped, partial ones resumed). True when every run is done: False after a dry run or a
    submission to SLURM that was not waited for (run the same command again when it ends)."""
    if report_only:
        return True
    summary = launch([run.cfg for run in runs], cc.launcher, dry_run=dry_run,
                     progress=cc.train.progress)
    summary.raise_for_errors()
    busy = summary.where(action="left running")
    if busy:
        raise UsageError(f"{busy[0].out} is being written by another process; "
                         "wait for it, then run compare again")
    return not any(r.action in ("planned", "submitted", "queued") for r in summary.runs)


def _status(run: PlannedRun) -> str:
    """"finished", "diverged" or "missing" (not trained, or still training); UsageError when
    the run's directory holds a run of another config (never report it under this one)."""
    state = RunDir(run.out).state(run.cfg)
    return {"finished": "finished", "failed": "diverged"}.get(state, "missing")


def _check_files(run: PlannedRun, keys: tuple[str, ...], curve: bool) -> None:
    """UsageError unless the finished run's files hold what the report reads: ``keys`` as finite
    numbers in result.json and, with ``curve``, a test accuracy in every metrics.jsonl row."""
    run_dir = RunDir(run.out)
    run_dir.read_finished(keys)
    if curve:
        for number, row in enumerate(run_dir.read_metrics(), start=1):
            value = row.get("test_acc")
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise UsageError(f"{run_dir.metrics_path}: line {number} has test_acc "
                                 f"{value!r}, not a number; delete the run to retrain it")


def _states(runs: list[PlannedRun], keys: tuple[str, ...], *, curve: bool) -> dict[str, str]:
    """`_status` of every run, with each finished run's files read strictly (`_check_files`).
    One UsageError naming every run that cannot be used, and why: a run is never dropped from
    a report in silence."""
    states: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for run in runs:
        try:
            states[run.out] = _status(run)
            if states[run.out] == "finished":
                _check_files(run, keys, curve)
        except UsageError as exc:
            problems.append((str(run.cfg.out), str(exc)))
    if problems:
        raise unusable(problems)
    return states


def _tune_grid(cc: CompareConfig, tunable: list[str], runs: list[PlannedRun]) -> dict:
    """Mean held-out accuracy per method and candidate radius, and each method's choice. A
    candidate with a diverged (or, with --report-only, a missing) seed cannot be chosen: its
    mean would hide the failure."""
    grid: dict[str, dict[float, Summary]] = {}
    diverged: dict[str, dict[float, int]] = {}
    val_fraction = runs[0].cfg.val_fraction if runs else DEFAULT_TUNE_VAL_FRACTION
    known = _states(runs, ("final_test_acc",), curve=False)
    candidates = cast(list[float], cc.tune)  # set: only a tuning comparison gets here
    for o in tunable:
        grid[o], diverged[o] = {}, {}
        for r in candidates:
            mine = [x for x in runs if x.optimizer == o and x.radius == r]
            states = [known[x.out] for x in mine]
            if all(s == "finished" for s in states):
                # (finished: result.json was read by _states)
                grid[o][r] = summarize([float(RunDir(x.out).read_result()["final_test_acc"])  # type: ignore[index]
                                        for x in mine])
            else:
                grid[o][r] = Summary(math.nan, math.nan, 0)
            diverged[o][r] = states.count("diverged")
    return {
        "candidates": list(candidates),
        "rho2_ratio": cc.rho2_ratio,
        "val_fraction": val_fraction,
        "grid": grid,
        "diverged": diverged,
        "chosen": {o: select_radius(grid[o]) for o in tunable},
    }


def budget_plan(runs: list[PlannedRun]) -> list[str]:
    """One line per method: its cost per step (the registry's mean, in batches) and the steps it
    gets under the run's budget (first seed's run of each method)."""
    from agnostic_sam.train.build import steps_per_epoch_of
    from agnostic_sam.train.config import budget_factor, planned_steps

    lines, seen = [], set()
    for run in runs:
        if run.optimizer in seen:
            continue
        seen.add(run.optimizer)
        cfg = run.cfg
        cost = get_method(cfg.optimizer).batch_equivalents(cfg.split_ratio, method_settings(cfg))
        spe = steps_per_epoch_of(cfg)
        budget = ("epochs" if cfg.budget == "epochs"
                  else f"passes of {cfg.budget_reference} in {cfg.epochs} epochs")
        lines.append(f"  {cfg.optimizer}: {cost:.3g} batches/step, {planned_steps(cfg, spe)} steps "
                     f"({cfg.epochs} x {spe} x {budget_factor(cfg):.4g}; budget {budget})")
    return ["planned steps per run:"] + lines


def compare(cc: CompareConfig, *, print_report: bool = True, dry_run: bool = False,
            report_only: bool = False) -> dict | None:
    """Run (or reuse) every run of the comparison and write the report; returns the content
    of comparison.json, or None when runs are still to come (a dry run, a SLURM submission:
    run the same command again when they have finished). ``report_only`` trains nothing and
    reports the finished runs, saying how many are missing; a run whose files are damaged stops
    it in one line naming every such run. One comparison at a time per ``out``: a second one
    (or a report of it) while the first runs is refused, naming the first's PID."""
    if dry_run:
        return _compare(cc, print_report=print_report, dry_run=True, report_only=report_only)
    with RunDir(cast(str, cc.train.out)).lock():
        return _compare(cc, print_report=print_report, dry_run=False, report_only=report_only)


def _compare(cc: CompareConfig, *, print_report: bool, dry_run: bool,
             report_only: bool) -> dict | None:
    eval_fraction = cc.train.val_fraction
    tuning = None
    final_radii: dict[str, list[float | None]] = {o: [None] for o in cc.optimizers}
    tunable = [o for o in cc.optimizers if get_method(o).tunable] if cc.tune else []
    if tunable:
        val_fraction = cc.train.val_fraction or DEFAULT_TUNE_VAL_FRACTION
        candidates = cast(list[float], cc.tune)  # set, or nothing would be tunable
        tune_runs = _plan(cc, "tune", {o: list(candidates) for o in tunable}, val_fraction)
        if not _execute(tune_runs, cc, dry_run=dry_run, report_only=report_only):
            print(f"{len(tune_runs)} tuning runs {'planned' if dry_run else 'on SLURM'}; the "
                  "final runs follow once they have finished: run the same command again")
            return None
        tuning = _tune_grid(cc, tunable, tune_runs)
        final_radii.update({o: [r] for o, r in tuning["chosen"].items()})
        eval_fraction = 0.0  # the tuned methods are retrained on everything and tested once
    final_runs = _plan(cc, "final", final_radii, eval_fraction)
    if dry_run:
        for line in budget_plan(final_runs):
            print(line)
    if not _execute(final_runs, cc, dry_run=dry_run, report_only=report_only):
        print(f"{len(final_runs)} runs {'planned' if dry_run else 'on SLURM'}; build the report "
              "when they have finished: the same command with --report-only")
        return None
    states = _states(final_runs, REPORT_KEYS, curve=True)
    failed = [out for out, s in states.items() if s == "diverged"]
    if failed:
        raise TrainingDiverged(f"the run in {failed[0]} diverged (see its result.json); "
                               f"{len(failed)} final run(s) failed: nothing fair to compare")
    missing = [r for r in final_runs if states[r.out] == "missing"]
    if missing:
        print(f"{len(missing)} of {len(final_runs)} final runs are missing (not finished); "
              "the report covers the finished ones")
        for line in unfinished([r.cfg for r in missing], cc.launcher):
            print(f"  {line}")
        final_runs = [r for r in final_runs if states[r.out] == "finished"]
        if not final_runs:
            raise UsageError("no final run has finished yet: nothing to report")

    metric = "validation" if eval_fraction > 0 else "test"
    settings = {**{k: getattr(cc, k) for k in COMPARE_KEYS}, "train": cc.train}
    return write_report(cc, final_runs, tuning, metric, settings, print_report=print_report)
