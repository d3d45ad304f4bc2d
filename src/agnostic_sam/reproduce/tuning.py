r"""Radius tuning for a study table: held-out runs, the choice, and the tuned final runs.

A method entry with ``tune: [r_1, ..., r_k]`` (see `agnostic_sam.reproduce.tables`) has, in
every report cell, final runs whose radius is *pending*. Tuning decides it per cell:

1. for every candidate ``r`` and tuning seed ``s`` (``tuning.seeds``), one run with the cell's
   settings, the method's radius fields from the method registry
   (``MethodInfo.tuned_settings(r, rho2_ratio)``: ``rho = r`` for SAM, ``rho1 = r, rho2 = r *
   rho2_ratio`` for the Agnostic-SAM family) and ``val_fraction``: it trains on the training set
   minus a stratified held-out part and evaluates on that part; the data module never opens the
   test set (``result.json`` says ``eval_split: holdout``);
2. the choice is `agnostic_sam.compare.select_radius` over the mean held-out accuracy across the
   tuning seeds (ties go to the smaller radius), the same rule as ``compare --tune``;
3. the cell's final runs (the grid's seeds, full training set) get the chosen radius and are
   evaluated once on the test set.

A final run whose chosen radius equals a fixed-radius run's settings has the same run id and is
trained once (`agnostic_sam.train.rundir.run_id` of the resolved config).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from agnostic_sam.errors import UsageError
from agnostic_sam.reproduce.spec import TableSpec
from agnostic_sam.reproduce.tables import Run
from agnostic_sam.stats import summarize

__all__ = ["radius_overrides", "tune_plan", "choose", "resolve"]


def radius_overrides(optimizer: str, radius: float, rho2_ratio: float,
                     method_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TrainConfig changes of candidate ``radius`` for the method's tuned setting, as the
    method registry sets them."""
    from agnostic_sam.methods import get_method

    info = get_method(optimizer)
    return info.as_config(info.tuned_settings(radius, rho2_ratio), method_args)


def _optimizer(run: Run) -> str:
    from agnostic_sam.train.config import TrainConfig

    return str(run.overrides.get("optimizer", TrainConfig().optimizer))


def _tuning(spec: TableSpec) -> tuple[float, float, list[int] | None]:
    t = spec.tuning
    if "rho2_ratio" not in t:
        raise UsageError(f"reproduce config {spec.path.name}: tuning.rho2_ratio is required")
    seeds = t.get("seeds")
    return float(t["val_fraction"]), float(t["rho2_ratio"]), None if seeds is None else list(seeds)


def _tune_only(spec: TableSpec) -> dict[str, Any]:
    """Settings of the tune runs alone: a held-out part as noisy as the training labels
    (``tuning.val_noise``), and the budget they tune at (``tuning.budget``; the chosen setting
    then serves the cell at its own budget)."""
    t, out = spec.tuning, dict[str, Any]()
    if t.get("val_noise"):
        out["val_noise"] = True
    if t.get("budget") is not None:
        out["budget"] = str(t["budget"])
    return out


def tune_plan(runs: list[Run], spec: TableSpec, seeds: list[int] | None = None) -> list[Run]:
    """The held-out runs that choose the radius of every tuned cell among ``runs``.

    ``seeds`` replaces the config's ``tuning.seeds`` (default: the final runs' seeds). Each tune
    run keeps the cell's settings (with --smoke: the smoke settings) and its cell key.
    """
    if not spec.tune:
        return []
    val_fraction, rho2_ratio, spec_seeds = _tuning(spec)
    tune_runs: list[Run] = []
    seen: set[str] = set()
    for run in runs:
        if run.tune is None or run.cell in seen:
            continue
        seen.add(run.cell)
        cell_seeds = seeds or spec_seeds or sorted(
            {r.overrides["seed"] for r in runs if r.cell == run.cell})
        for radius in run.tune:
            for seed in cell_seeds:
                overrides = {**run.overrides, "seed": seed, "val_fraction": val_fraction,
                             **radius_overrides(_optimizer(run), radius, rho2_ratio,
                                                run.overrides.get("method_args")),
                             **_tune_only(spec)}
                tune_runs.append(dataclasses.replace(
                    run, overrides=overrides, phase="tune", radius=radius, tune=None))
    return tune_runs


def _held_out_value(run_dir: Path, metric: str) -> float | None:
    """The held-out accuracy of a finished tune run; None while it is unfinished."""
    from agnostic_sam.train.rundir import RunDir

    result = RunDir(run_dir).read_result()
    if result is None or result.get(metric) is None:
        return None
    if result.get("eval_split") != "holdout":
        # A tune run must never have been evaluated on the test set.
        raise UsageError(f"{run_dir} was evaluated on {result.get('eval_split')!r}, not the "
                         "held-out split; it cannot be a tuning run")
    return float(result[metric])


def choose(tune_runs: list[Run], runs_root: str | Path) -> dict[str, dict[str, Any]]:
    """Per tuned cell whose tune runs have all finished: the held-out grid and the choice.

    ``{cell: {"candidates": [...], "seeds": [...], "grid": {r: Summary}, "chosen": r}}``.
    Cells with an unfinished tune run are left out (their final runs stay pending).
    """
    from agnostic_sam.compare import select_radius

    runs_root = Path(runs_root)
    by_cell: dict[str, list[Run]] = {}
    for run in tune_runs:
        by_cell.setdefault(run.cell, []).append(run)
    choices: dict[str, dict[str, Any]] = {}
    for cell, members in by_cell.items():
        values: dict[float, list[float]] = {}
        complete = True
        for run in members:
            value = _held_out_value(runs_root / run.run_id, run.metric)
            if value is None:
                complete = False
                break
            values.setdefault(float(run.radius), []).append(value)  # type: ignore[arg-type]
        if not complete:
            continue
        grid = {r: summarize(v) for r, v in sorted(values.items())}
        choices[cell] = {
            "candidates": sorted(values),
            "seeds": sorted({r.overrides["seed"] for r in members}),
            "grid": grid,
            "chosen": select_radius(grid),
        }
    return choices


def resolve(runs: list[Run], choices: dict[str, dict[str, Any]], spec: TableSpec | None) -> None:
    """Give every pending final run with a choice its chosen radius (in place)."""
    if spec is None or not spec.tune:
        return
    _, rho2_ratio, _ = _tuning(spec)
    for run in runs:
        if run.pending and run.cell in choices:
            radius = float(choices[run.cell]["chosen"])
            run.overrides = {**run.overrides,
                             **radius_overrides(_optimizer(run), radius, rho2_ratio,
                                                run.overrides.get("method_args"))}
            run.radius = radius
