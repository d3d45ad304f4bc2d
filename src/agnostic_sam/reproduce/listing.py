"""The --dry-run listing of a plan: each training run's epochs, steps per epoch and steps, the
cells it feeds, and the totals.

Steps per epoch come from the training-set sizes the paper states (``TRAIN_SIZES``), so a plan
is listed without opening any data set.
"""

from __future__ import annotations

import math
from typing import Any

from agnostic_sam.errors import UsageError
from agnostic_sam.reproduce.tables import Run, unique_runs, with_defaults

__all__ = ["TRAIN_SIZES", "steps_per_epoch", "format_plan"]

# Training-set sizes (images) as the paper states them (Sec. 4.1); used by --dry-run only.
TRAIN_SIZES = {
    "cifar10": 50_000,
    "cifar100": 50_000,
    "flowers102": 2_040,  # train + val splits joined, as the paper does
    "stanford_cars": 8_144,
    "fgvc_aircraft": 6_667,  # trainval
    "oxford_pets": 3_680,
    "digits": 1_437,  # the fixed stratified 80/20 split of scikit-learn's 1,797 images
}


def _stratified_keep(n: int, held_fraction: float) -> int:
    """Examples left after a stratified hold-out of ``held_fraction`` (scikit-learn's sizes:
    ``ceil(fraction * n)`` held out)."""
    return n - math.ceil(held_fraction * n)


def steps_per_epoch(overrides: dict[str, Any]) -> int:
    """Optimizer steps in one epoch, from the data set's known training-set size.

    As the trainer does: every method takes one step per full mini-batch ``B`` (the last partial
    batch is dropped; the Agnostic-SAM family splits ``B`` into ``B^t``/``B^v``). With
    ``split: fixed`` an epoch is one pass over ``S^t`` (``round(r N)`` images) in pieces of
    ``|B^t| = round(r |B|)``. A held-out part (``val_fraction``) and a training subset
    (``train_fraction``) shrink ``N`` first. Unset fields take TrainConfig's defaults.
    """
    from agnostic_sam.methods import get_method
    from agnostic_sam.optim import split_sizes

    cfg = with_defaults(overrides)
    dataset = cfg["dataset"]
    if dataset not in TRAIN_SIZES:
        raise UsageError(f"no known training-set size for data set '{dataset}'")
    n = TRAIN_SIZES[dataset]
    if cfg.get("val_fraction"):
        n = _stratified_keep(n, float(cfg["val_fraction"]))
    if cfg["train_fraction"] < 1.0:
        n = _stratified_keep(n, 1.0 - float(cfg["train_fraction"]))
    batch = int(cfg["batch_size"])
    if cfg["split"] == "fixed" and get_method(cfg["optimizer"]).splits_batch:
        ratio = float(cfg["split_ratio"])
        n, batch = round(ratio * n), split_sizes(batch, ratio)[0]
    return n // batch


def _listing_line(name: str, overrides: dict[str, Any], cells: str) -> tuple[str, int]:
    cfg = with_defaults(overrides)
    epochs, max_steps = int(cfg["epochs"]), cfg["max_steps"]
    if cfg["dataset"] in TRAIN_SIZES:
        from agnostic_sam.train.config import TrainConfig, budget_factor

        per_epoch: int | str = steps_per_epoch(overrides)
        # a passes budget stretches a cheaper method's run (the trainer's planned_steps)
        planned = max(1, round(epochs * int(per_epoch) * budget_factor(TrainConfig(**cfg))))
        steps = planned if max_steps is None else min(planned, max_steps)
    else:  # --smoke: synthetic data, the step cap decides
        per_epoch, steps = "-", int(max_steps or 0)
    return f"{name:<62} {epochs:>6} {per_epoch:>8} {steps:>9}  {cells}", steps


def format_plan(runs: list[Run], tune_runs: list[Run] | None = None) -> str:
    """The --dry-run listing: one line per training run, cells it feeds, and totals.

    With ``tune_runs`` (a study with tuned radii) the held-out tuning runs come first; a tuned
    final run whose radius is not chosen yet is listed as ``<...>-seed<k>-after-tuning``.
    """
    lines = []
    total = 0
    header = f"{'run':<62} {'epochs':>6} {'steps/ep':>8} {'steps':>9}  cells"
    tune_unique = unique_runs(tune_runs or [])
    if tune_unique:
        lines += ["tuning (held-out val_fraction, test set never opened): "
                  f"{len(tune_unique)} runs", header]
        for run in tune_unique:
            line, steps = _listing_line(run.run_id, run.overrides,
                                        f"tune {run.cell} r={run.radius:g}")
            lines.append(line)
            total += steps
        lines.append("final runs (full training set, test set once):")
    lines.append(header)
    # a pending run has no id yet: it is one per (cell, seed) until its radius is chosen
    cells_of: dict[Any, list[str]] = {}
    first: dict[Any, Run] = {}
    for run in runs:
        key = (run.cell, run.overrides.get("seed")) if run.pending else run.run_id
        cells_of.setdefault(key, []).append(f"{run.table}:{run.cell}")
        first.setdefault(key, run)
    names = list(cells_of)
    for key in names:
        line, steps = _listing_line(_listing_name(first[key]), first[key].overrides,
                                    " ".join(cells_of[key]))
        lines.append(line)
        total += steps
    n_cells = len({(r.table, r.cell) for r in runs})
    n_runs = len(names) + len(tune_unique)
    lines.append(f"{n_runs} training runs, {n_cells} table cells, {total} optimizer steps in total")
    return "\n".join(lines)


def _listing_name(run: Run) -> str:
    if not run.pending:
        return run.run_id
    cfg = with_defaults(run.overrides)
    return f"{cfg['dataset']}-{cfg['model']}-{cfg['optimizer']}-seed{cfg['seed']}-<tuned>"
