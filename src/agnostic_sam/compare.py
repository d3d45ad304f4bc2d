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
import multiprocessing
import sys
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agnostic_sam.compare_report import read_run, write_report
from agnostic_sam.errors import UsageError
from agnostic_sam.stats import Summary, summarize
from agnostic_sam.train import train
from agnostic_sam.train.config import OPTIMIZERS, RESULT_FIELDS, TrainConfig, load_config

__all__ = [
    "OPTIMIZERS",
    "RADIUS_OPTIMIZERS",
    "CompareConfig",
    "load_compare_config",
    "select_radius",
    "compare",
]

# Optimizers whose perturbation radius --tune searches; SGD has none.
RADIUS_OPTIMIZERS = ("sam", "agnostic-sam", "agnostic-sam-simpler")
# Held-out share of the training set used for tuning when the config does not set one.
DEFAULT_TUNE_VAL_FRACTION = 0.1
# Mean accuracies closer than this (percentage points) count as a tie: they differ only by
# floating-point summation order.
_TIE = 1e-9


@dataclass
class CompareConfig:
    """What to compare. ``train`` is the shared per-run config; ``train.out`` is the root."""

    train: TrainConfig
    optimizers: list[str] = field(default_factory=lambda: list(OPTIMIZERS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    jobs: int = 1
    tune: list[float] | None = None  # candidate radii (rho for SAM, rho1 for Agnostic-SAM)
    rho2_ratio: float = 0.5  # Agnostic-SAM rho2 = rho1 * rho2_ratio while tuning
    hessian: bool = False  # add each final model's top Hessian eigenvalue (slow)

    def __post_init__(self) -> None:
        self.optimizers = [str(o) for o in _as_list(self.optimizers, "optimizers")]
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS]
        if unknown or not self.optimizers:
            raise UsageError(
                f"optimizers must be a non-empty subset of {', '.join(OPTIMIZERS)}; got {unknown or 'none'}"
            )
        if len(set(self.optimizers)) != len(self.optimizers):
            raise UsageError(f"optimizers listed twice: {self.optimizers}")
        seeds = _as_list(self.seeds, "seeds")
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise UsageError(f"seeds must be a non-empty list of integers, got {self.seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise UsageError(f"seeds listed twice: {seeds}")
        self.seeds = list(seeds)
        if not isinstance(self.jobs, int) or isinstance(self.jobs, bool) or self.jobs < 1:
            raise UsageError(f"jobs must be an integer >= 1, got {self.jobs!r}")
        if self.tune is not None:
            tune = [_positive(r, "tune radius") for r in _as_list(self.tune, "tune")]
            if not tune:
                raise UsageError("tune needs at least one radius")
            self.tune = sorted(set(tune))
        self.rho2_ratio = _positive(self.rho2_ratio, "rho2_ratio")
        if not isinstance(self.hessian, bool):
            raise UsageError(f"hessian must be true or false, got {self.hessian!r}")


def _as_list(value: Any, name: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise UsageError(f"{name} must be a list, got {value!r}")


def _positive(value: Any, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or not math.isfinite(value)
    ):
        raise UsageError(f"{name} must be a positive number, got {value!r}")
    return float(value)


COMPARE_KEYS = tuple(f.name for f in dataclasses.fields(CompareConfig) if f.name != "train")
# TrainConfig keys that compare sets for each run from its lists.
_PER_RUN_KEYS = ("optimizer", "seed")


def load_compare_config(
    path: str | Path | None,
    compare_overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
) -> CompareConfig:
    """Defaults < YAML file < overrides (``None`` values in overrides mean "not given").

    The YAML holds train keys and the compare keys (``optimizers``, ``seeds``, ``jobs``,
    ``tune``, ``rho2_ratio``, ``hessian``) side by side; ``out`` is the comparison root
    (default ``runs/compare-<dataset>-<model>``).
    """
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError:
            raise UsageError(f"config file {path} is not valid YAML") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UsageError(f"config file {path} must hold a mapping of keys to values")
        file_values = {str(k).replace("-", "_"): v for k, v in (loaded or {}).items()}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in file_values:
        if key in _PER_RUN_KEYS:
            raise UsageError(
                f"config key '{key}' in {path} is set per run by compare; use '{key}s:' (a list)"
            )
        if key not in train_keys and key not in COMPARE_KEYS:
            raise UsageError(f"unknown config key '{key}' in {path}")
    compare_values = {k: file_values.pop(k) for k in COMPARE_KEYS if k in file_values}
    compare_values.update({k: v for k, v in (compare_overrides or {}).items() if v is not None})
    overrides = {k: v for k, v in (train_overrides or {}).items() if v is not None}
    train_cfg = load_config(None, overrides, base=file_values)
    if file_values.get("out") is None and overrides.get("out") is None:
        train_cfg.out = str(Path("runs") / f"compare-{train_cfg.dataset}-{train_cfg.model}")
    return CompareConfig(train=train_cfg, **compare_values)


def select_radius(grid: Mapping[float, Summary]) -> float:
    """The radius with the highest mean validation accuracy; ties go to the smaller radius."""
    if not grid:
        raise ValueError("select_radius needs at least one radius")
    best = max(s.mean for s in grid.values())
    return min(r for r, s in grid.items() if s.mean >= best - _TIE)


# ----------------------------------------------------------------------------- planning and running


@dataclass(frozen=True)
class _Run:
    phase: str  # "tune" or "final"
    optimizer: str
    seed: int
    radius: float | None  # the tuned radius, None = the config's own radii
    cfg: TrainConfig


def _radius_fields(optimizer: str, radius: float, rho2_ratio: float) -> dict[str, float]:
    if optimizer == "sam":
        return {"rho": radius}
    return {"rho1": radius, "rho2": radius * rho2_ratio}


def _plan(
    cc: CompareConfig, phase: str, radii: Mapping[str, list[float | None]], val_fraction: float
) -> list[_Run]:
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
                    changes.update(_radius_fields(optimizer, radius, cc.rho2_ratio))
                runs.append(
                    _Run(phase, optimizer, seed, radius, dataclasses.replace(cc.train, **changes))
                )
    return runs


def _comparable(values: Mapping[str, Any]) -> dict[str, Any]:
    # Only fields that change a run's numbers (not out, threads, progress, ...).
    return {k: values.get(k) for k in RESULT_FIELDS}


def _is_finished(cfg: TrainConfig) -> bool:
    """True when ``cfg.out`` holds a finished run of this very config; a finished run of a
    different config is an error (silently overwriting or mixing results would mislead)."""
    run_dir = Path(cfg.out)
    if not (run_dir / "result.json").is_file():
        return False
    saved_path = run_dir / "config.yaml"
    saved = (
        _comparable(dataclasses.asdict(load_config(saved_path, {}))) if saved_path.is_file() else {}
    )
    wanted = _comparable(dataclasses.asdict(cfg))
    diff = sorted(k for k in wanted if saved.get(k) != wanted[k])
    if diff:
        key = diff[0]
        raise UsageError(
            f"{run_dir} holds a finished run with a different config ({key}: {saved.get(key)!r} != "
            f"{wanted[key]!r}); choose another --out or delete that folder"
        )
    return True


def _train_worker(cfg: TrainConfig) -> dict:
    """Run one training in this process with the run's fixed thread count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or 1)
    try:
        return train(cfg)
    finally:
        torch.set_num_threads(previous)


def _execute(runs: list[_Run], jobs: int, bar: Any) -> None:
    todo = []
    for run in runs:
        if _is_finished(run.cfg):
            bar.update(1)
        elif (Path(run.cfg.out) / "checkpoint.pt").is_file():
            # An interrupted run (killed compare): continue it; train() checks the config matches.
            todo.append(dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, resume=True)))
        else:
            todo.append(run)
    if jobs == 1 or len(todo) <= 1:
        for run in todo:
            bar.set_postfix_str(f"{run.optimizer} seed {run.seed}")
            _train_worker(run.cfg)
            bar.update(1)
        return
    # "spawn": fresh interpreters, no inherited torch thread pools or CUDA state.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context) as pool:
        futures = {pool.submit(_train_worker, run.cfg): run for run in todo}
        for future in as_completed(futures):
            run = futures[future]
            future.result()  # re-raises a worker's error here, in the parent
            bar.set_postfix_str(f"{run.optimizer} seed {run.seed}")
            bar.update(1)


def compare(cc: CompareConfig, *, print_report: bool = True) -> dict:
    """Run (or reuse) every run of the comparison and write the report; returns comparison.json's content."""
    from tqdm.auto import tqdm

    eval_fraction = cc.train.val_fraction
    tuning = None
    final_radii: dict[str, list[float | None]] = {o: [None] for o in cc.optimizers}
    tunable = [o for o in cc.optimizers if o in RADIUS_OPTIMIZERS] if cc.tune else []
    total = len(cc.seeds) * (len(cc.optimizers) + len(tunable) * len(cc.tune or []))
    with tqdm(
        total=total, desc="compare", unit="run", disable=not cc.train.progress, file=sys.stderr
    ) as bar:
        if tunable:
            val_fraction = cc.train.val_fraction or DEFAULT_TUNE_VAL_FRACTION
            tune_runs = _plan(cc, "tune", {o: list(cc.tune) for o in tunable}, val_fraction)
            _execute(tune_runs, cc.jobs, bar)
            grid = {
                o: {
                    r: summarize(
                        [
                            read_run(x)["result"]["final_test_acc"]
                            for x in tune_runs
                            if x.optimizer == o and x.radius == r
                        ]
                    )
                    for r in cc.tune
                }
                for o in tunable
            }
            chosen = {o: select_radius(grid[o]) for o in tunable}
            final_radii.update({o: [chosen[o]] for o in tunable})
            tuning = {
                "candidates": list(cc.tune),
                "rho2_ratio": cc.rho2_ratio,
                "val_fraction": val_fraction,
                "grid": grid,
                "chosen": chosen,
            }
            eval_fraction = 0.0  # the tuned methods are retrained on everything and tested once
        final_runs = _plan(cc, "final", final_radii, eval_fraction)
        _execute(final_runs, cc.jobs, bar)

    metric = "validation" if eval_fraction > 0 else "test"
    settings = {**{k: getattr(cc, k) for k in COMPARE_KEYS}, "train": cc.train}
    return write_report(cc, final_runs, tuning, metric, settings, print_report=print_report)

