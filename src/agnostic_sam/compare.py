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

This module plans and runs the runs; `agnostic_sam.compare_report` summarizes them and writes
the report files.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agnostic_sam.compare_config import (
    COMPARE_KEYS,
    CompareConfig,
    PlannedRun,
    load_compare_config,
)
from agnostic_sam.compare_report import write_report
from agnostic_sam.errors import TrainingDiverged, UsageError
from agnostic_sam.methods import get_method
from agnostic_sam.stats import Summary, summarize
from agnostic_sam.train import train
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
    root = Path(cc.train.out)
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
                    changes.update(get_method(optimizer).tuned_radii(radius, cc.rho2_ratio))
                cfg = dataclasses.replace(cc.train, **changes)
                runs.append(PlannedRun(phase, optimizer, seed, radius, cfg))
    return runs


def _train_worker(cfg: Any) -> dict:
    """Run one training in this process with the run's fixed thread count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or 1)
    try:
        return train(cfg)
    finally:
        torch.set_num_threads(previous)


def _execute(runs: list[PlannedRun], cc: CompareConfig, bar: Any) -> None:
    """Train every run that is not finished yet (resuming partial ones); a run another process
    is writing is an error (it would be read half-done)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    todo = []
    for run in runs:
        state = RunDir(run.cfg.out).state(run.cfg)
        if state == "running":
            raise UsageError(f"{run.cfg.out} is being written by another process; "
                             "wait for it, then run compare again")
        if state in ("finished", "failed"):
            bar.update(1)
        else:
            todo.append(dataclasses.replace(run.cfg, resume=state == "partial"))
    if cc.jobs == 1 or len(todo) <= 1:
        for cfg in todo:
            _run_one(cfg)
            bar.update(1)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(cc.jobs, len(todo)), mp_context=context) as pool:
        for future in as_completed([pool.submit(_run_one, cfg) for cfg in todo]):
            future.result()
            bar.update(1)


def _run_one(cfg: Any) -> None:
    """Train one run; a diverged run is a result of the sweep (its result.json says so)."""
    try:
        _train_worker(cfg)
    except TrainingDiverged:
        pass


def _accuracy(run: PlannedRun) -> float | None:
    """The run's final accuracy; None for a run that diverged."""
    result = RunDir(run.cfg.out).read_result() or {}
    if result.get("status") == "diverged":
        return None
    return float(result["final_test_acc"])


def _tune(cc: CompareConfig, tunable: list[str], bar: Any) -> dict:
    """Train every candidate radius on the held-out split; choose each method's radius."""
    val_fraction = cc.train.val_fraction or DEFAULT_TUNE_VAL_FRACTION
    runs = _plan(cc, "tune", {o: list(cc.tune) for o in tunable}, val_fraction)
    _execute(runs, cc, bar)
    grid: dict[str, dict[float, Summary]] = {}
    diverged: dict[str, dict[float, int]] = {}
    for o in tunable:
        grid[o], diverged[o] = {}, {}
        for r in cc.tune:
            accs = [_accuracy(x) for x in runs if x.optimizer == o and x.radius == r]
            # A candidate with a diverged seed cannot be chosen: its mean would hide the failure.
            grid[o][r] = summarize(accs) if None not in accs else Summary(math.nan, math.nan, 0)
            diverged[o][r] = accs.count(None)
    return {
        "candidates": list(cc.tune),
        "rho2_ratio": cc.rho2_ratio,
        "val_fraction": val_fraction,
        "grid": grid,
        "diverged": diverged,
        "chosen": {o: select_radius(grid[o]) for o in tunable},
    }


def compare(cc: CompareConfig, *, print_report: bool = True) -> dict:
    """Run (or reuse) every run of the comparison and write the report; returns the content
    of comparison.json."""
    from tqdm.auto import tqdm

    eval_fraction = cc.train.val_fraction
    tuning = None
    final_radii: dict[str, list[float | None]] = {o: [None] for o in cc.optimizers}
    tunable = [o for o in cc.optimizers if get_method(o).tunable] if cc.tune else []
    total = len(cc.seeds) * (len(cc.optimizers) + len(tunable) * len(cc.tune or []))
    with tqdm(
        total=total, desc="compare", unit="run", disable=not cc.train.progress, file=sys.stderr
    ) as bar:
        if tunable:
            tuning = _tune(cc, tunable, bar)
            final_radii.update({o: [r] for o, r in tuning["chosen"].items()})
            eval_fraction = 0.0  # the tuned methods are retrained on everything and tested once
        final_runs = _plan(cc, "final", final_radii, eval_fraction)
        _execute(final_runs, cc, bar)
    failed = [r.cfg.out for r in final_runs if _accuracy(r) is None]
    if failed:
        raise TrainingDiverged(f"the run in {failed[0]} diverged (see its result.json); "
                         f"{len(failed)} final run(s) failed, so there is nothing fair to compare")

    metric = "validation" if eval_fraction > 0 else "test"
    settings = {**{k: getattr(cc, k) for k in COMPARE_KEYS}, "train": cc.train}
    return write_report(cc, final_runs, tuning, metric, settings, print_report=print_report)
