"""Run a table's training runs (skipping finished ones, resuming partial ones) and write the report.

Layout under ``out`` (default ``runs/reproduce``)::

    out/runs/<run id>/      one training run (config.yaml, metrics.jsonl, result.json,
                            checkpoint.pt)
    out/report.md           the paper's numbers next to ours, one table per paper table
    out/report.json         the same as data
    out/smoke_weights/      --smoke only: *_mini state dicts standing in for pretrained weights
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agnostic_sam.errors import UsageError
from agnostic_sam.reproduce.listing import format_plan
from agnostic_sam.reproduce.report import build_report, write_report
from agnostic_sam.reproduce.spec import STUDIES, TableSpec, spec_of
from agnostic_sam.reproduce.tables import SMOKE_WEIGHTS, Run, plan, unique_runs
from agnostic_sam.reproduce.tuning import choose, resolve, tune_plan

__all__ = ["run_state", "check_data", "reproduce"]

# RunDir's state names, as reproduce logs them.
_STATE_WORDS = {"finished": "complete"}


def run_state(run_dir: str | Path, overrides: dict[str, Any]) -> str:
    """``"new"``, ``"partial"`` (a checkpoint, no result), ``"complete"`` (result.json written),
    ``"failed"`` (a result saying the run diverged) or ``"running"`` (another process holds it).

    `agnostic_sam.train.rundir.RunDir` decides; "the same run" is ``run_identity`` of the
    resolved configs. A directory holding another run raises UsageError naming the first field
    that differs: reusing it would mix results.
    """
    from agnostic_sam.train import load_config
    from agnostic_sam.train.rundir import RunDir, run_identity

    rd = RunDir(run_dir)
    cfg = load_config(None, overrides)
    saved = rd.saved_config() if rd.path.is_dir() else None
    if saved is not None:
        mine, theirs = run_identity(cfg), run_identity(saved)
        for key in mine:
            if mine[key] != theirs[key]:
                raise UsageError(
                    f"{run_dir} holds a run with {key}={theirs[key]!r}, not {mine[key]!r}; "
                    "delete it or choose another --out"
                )
    state = rd.state(cfg)
    return _STATE_WORDS.get(state, state)


def check_data(runs: list[Run], *, data_dir: str | None, download: bool) -> None:
    """Open every data set and weights file the runs need before any training starts.

    A missing data set raises the data module's one-line UsageError naming the folder, the
    files it expects, and that ``--download`` fetches them where a network exists; missing
    pretrained weights raise the models module's line naming the file to fetch. Tuning runs
    (``val_fraction > 0``) are checked with their held-out split, so the test split stays closed.
    """
    from agnostic_sam.data import build_data
    from agnostic_sam.models import resolve_weights
    from agnostic_sam.train.config import TrainConfig

    default = TrainConfig().dataset
    datasets = {(r.overrides.get("dataset", default), r.overrides.get("image_size"),
                 float(r.overrides.get("val_fraction") or 0.0)) for r in runs}
    for name, image_size, val_fraction in sorted(datasets, key=str):
        build_data(name, data_dir=data_dir, download=download, image_size=image_size,
                   val_fraction=val_fraction)
    for weights in {r.overrides["weights"] for r in runs if r.overrides.get("weights")}:
        if weights != SMOKE_WEIGHTS:
            resolve_weights(weights)


def _effective(run: Run, out: Path) -> dict[str, Any]:
    """The run's TrainConfig fields, with ``SMOKE_WEIGHTS`` replaced by its file under ``out``."""
    overrides = dict(run.overrides)
    if overrides.get("weights") == SMOKE_WEIGHTS:
        overrides["weights"] = str(out / "smoke_weights" / f"{overrides['model']}.pt")
    return overrides


def _write_smoke_weights(overrides: dict[str, Any]) -> None:
    """A ``_mini`` model's state dict standing in for ImageNet weights (Table 3 under --smoke).

    Built with 1000 classes like an ImageNet checkpoint, so ``load_pretrained`` must skip the head
    and load the rest, as it does for the real weights.
    """
    import torch

    from agnostic_sam.models import create_model

    path = Path(overrides["weights"])
    if not path.exists():
        size = overrides.get("image_size") or 32
        with torch.random.fork_rng(devices=[]):  # the same stand-in weights in every sweep
            torch.manual_seed(0)
            model = create_model(overrides["model"], num_classes=1000, in_channels=3,
                                 image_size=size)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)


def _launch(cfgs: list[Any], lc: Any, log: Callable[[str], None], *,
            dry_run: bool = False) -> tuple[list[str], bool]:
    """Train ``cfgs`` with the sweep launcher ``lc`` (`agnostic_sam.launch`: inline, local
    workers that die with this process, or a SLURM job array); returns the run directories
    that failed or diverged, and whether every run is done here (False after a dry run or a
    SLURM submission that was not waited for)."""
    from agnostic_sam.launch import launch

    summary = launch(cfgs, lc, dry_run=dry_run, log=log)
    done = not any(r.action in ("planned", "submitted", "queued") for r in summary.runs)
    return [str(r.out) for r in summary.failed], done


def _train_runs(
    todo: list[Run],
    runs: list[Run],
    *,
    out: Path,
    data_dir: str | None,
    download: bool,
    device: str,
    progress: bool,
    launcher: Any,
    threads: int | None,
    log_to: list[str],
    label: str,
    log: Callable[[str], None],
    dry_run: bool = False,
) -> tuple[list[str], bool]:
    """Train the runs of ``todo`` not finished yet (resuming partial ones) with ``launcher``;
    the failed ones, and whether all are done (see `_launch`)."""
    from agnostic_sam.train import load_config

    runs_root = out / "runs"
    effective = {run.run_id: _effective(run, out) for run in todo}
    states = {rid: run_state(runs_root / rid, overrides) for rid, overrides in effective.items()}
    if not dry_run:  # before anything is submitted: --download fetches on this (login) node
        check_data([r for r in todo if states[r.run_id] in ("new", "partial")],
                   data_dir=data_dir, download=download)
    # run id -> the cells it feeds (a run id costs a resolved config: computed once per run)
    cells_of: dict[str, set[str]] = {}
    for r in runs:
        if not r.pending:
            cells_of.setdefault(r.run_id, set()).add(f"{r.table}:{r.cell}")
    cfgs = []
    for i, run in enumerate(todo, 1):
        state = states[run.run_id]
        cells = (", ".join(sorted(cells_of.get(run.run_id, ())))
                 or f"tune {run.cell} r={run.radius:g}")
        if state in ("complete", "failed", "running"):
            if not dry_run:
                log(f"[{label}{i}/{len(todo)}] {state:<8} {run.run_id} ({cells})")
            continue
        if not dry_run:
            what = "resume" if state == "partial" else "train "
            log(f"[{label}{i}/{len(todo)}] {what}   {run.run_id} ({cells})")
        overrides = effective[run.run_id]
        if run.overrides.get("weights") == SMOKE_WEIGHTS and not dry_run:
            _write_smoke_weights(overrides)
        # one thread per run unless told otherwise: with --jobs N the N runs share the cores,
        # and the numbers do not depend on N (threads is not part of a run's identity)
        cfgs.append(load_config(None, {
            **overrides, "out": str(runs_root / run.run_id), "resume": state == "partial",
            "device": device, "data_dir": data_dir, "download": download,
            "progress": progress and launcher.kind == "inline", "threads": threads or 1,
            "log": list(log_to),
        }))
    return _launch(cfgs, launcher, log, dry_run=dry_run)


def reproduce(
    table: str,
    *,
    out: str | Path = "runs/reproduce",
    data_dir: str | None = None,
    download: bool = False,
    seeds: list[int] | None = None,
    tune_seeds: list[int] | None = None,
    smoke: bool = False,
    device: str = "auto",
    dry_run: bool = False,
    report_only: bool = False,
    jobs: int = 1,
    threads: int | None = None,
    progress: bool = True,
    launcher: Any = None,
    log_to: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Train every run of ``table`` (a paper table, ``all``, or a digits study), then report.

    Finished runs (result.json present, config matching) are skipped, partial ones resumed from
    their checkpoint. A study with tuned radii (``STUDIES``) first trains the held-out tuning
    runs, chooses each tuned cell's radius (`agnostic_sam.reproduce.tuning`), then trains the
    final runs. Runs train with ``launcher`` (an `agnostic_sam.launch.LauncherConfig`: inline,
    local worker processes, or a SLURM job array through submitit); without one, ``jobs`` > 1
    means that many local workers. Each run uses ``threads`` CPU threads (default 1) and logs
    to ``log_to`` (tensorboard, wandb). ``dry_run`` only logs the plan (tuned final runs whose
    tuning has not finished are listed as pending; with a launcher other than inline also what
    it would start, e.g. the job array) and returns None; ``report_only`` writes the report
    from whatever runs exist. A SLURM submission that is not waited for returns None: run the
    same command again when its jobs have ended (finished runs are skipped). Returns the
    report dict.
    """
    lc = _launcher_config(launcher, jobs, out)
    out = Path(out)
    runs_root = out / "runs"
    runs, spec, tune_runs = _planned(table, seeds=seeds, tune_seeds=tune_seeds, smoke=smoke,
                                     device=device, runs_root=runs_root)
    common: dict[str, Any] = dict(out=out, data_dir=data_dir, download=download, device=device,
                  progress=progress, launcher=lc, threads=threads, log_to=log_to or [], log=log)
    if dry_run:
        _log_plan(runs, tune_runs, lc, common, log)
        return None
    timings: dict[str, float] = {}
    failed: list[str] = []
    if report_only:
        _log_missing(runs, tune_runs, common, log)
    elif not _train_phases(runs, tune_runs, spec, runs_root, timings, failed, common, log):
        return None
    report = build_report(runs, runs_root, spec=spec, choices=choose(tune_runs, runs_root))
    report.update(smoke=smoke, timings=timings, failed=failed)
    md, js = write_report(report, out)
    log(f"wrote {md} and {js}")
    if spec is not None:
        _draw_study_figures(report["tables"][spec.table], spec, out, log)
    return report


def _launcher_config(launcher: Any, jobs: int, out: str | Path) -> Any:
    """``launcher``, or from ``jobs`` alone: inline for 1, that many local workers above; a
    SLURM launcher without a folder keeps its submitit files under ``out``."""
    from agnostic_sam.launch import LauncherConfig

    if not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"--jobs must be an integer >= 1, got {jobs!r}")
    lc = launcher or (LauncherConfig(kind="local", jobs=jobs) if jobs > 1 else LauncherConfig())
    if lc.kind == "slurm" and lc.folder is None:
        lc = dataclasses.replace(lc, folder=str(Path(out) / "submitit"))
    return lc


def _planned(table: str, *, seeds: list[int] | None, tune_seeds: list[int] | None, smoke: bool,
             device: str, runs_root: Path) -> tuple[list[Run], TableSpec | None, list[Run]]:
    """The table's runs on ``device``, the study's spec (None for a paper table) and its tuning
    runs; the tuned final runs get the radii chosen by the tuning runs already finished."""
    runs = plan(table, seeds=seeds, smoke=smoke)
    for run in runs:  # the device is part of a run's identity (rundir.IDENTITY_FIELDS)
        run.overrides["device"] = device
    spec = spec_of(table) if table in STUDIES else None
    tune_runs = tune_plan(runs, spec, seeds=tune_seeds) if spec is not None else []
    resolve(runs, choose(tune_runs, runs_root), spec)
    return runs, spec, tune_runs


def _log_plan(runs: list[Run], tune_runs: list[Run], lc: Any, common: dict[str, Any],
              log: Callable[[str], None]) -> None:
    """--dry-run: the listing, and with a launcher other than inline what it would start (the
    first phase's runs)."""
    log(format_plan(runs, tune_runs))
    if lc.kind != "inline":
        first = unique_runs(tune_runs) if tune_runs else unique_runs(runs)
        _train_runs(first, runs, label="", dry_run=True, **common)


def _log_missing(runs: list[Run], tune_runs: list[Run], common: dict[str, Any],
                 log: Callable[[str], None]) -> None:
    """--report-only: each run of the table not ended yet, with where it stands (with the slurm
    launcher its job and the job's state: queued, running, cancelled, failed (TIMEOUT), ...),
    and the final runs whose tuning has not finished; the report covers the finished ones."""
    from agnostic_sam.launch import unfinished
    from agnostic_sam.train import load_config

    out: Path = common["out"]
    todo = unique_runs(tune_runs) + unique_runs([r for r in runs if not r.pending])
    cfgs = [load_config(None, {**_effective(run, out), "out": str(out / "runs" / run.run_id),
                               "device": common["device"]}) for run in todo]
    try:
        lines = unfinished(cfgs, common["launcher"])
    except UsageError:  # a damaged run: the report names every one of them, in one line
        return
    pending = len({r.cell for r in runs if r.pending})
    if lines or pending:
        log(f"{len(lines)} of {len(todo)} runs are missing (not finished); the report covers "
            "the finished ones")
        for line in lines:
            log(f"  {line}")
    if pending:
        log(f"  {pending} cells wait for their tuning runs (their final runs are not planned "
            "yet)")


def _train_phases(runs: list[Run], tune_runs: list[Run], spec: Any, runs_root: Path,
                  timings: dict[str, float], failed: list[str], common: dict[str, Any],
                  log: Callable[[str], None]) -> bool:
    """The tuning runs (when the study tunes), the choice of radii, then the final runs; their
    seconds go to ``timings``, the runs that failed to ``failed``. False when a phase was
    submitted (SLURM) and not waited for: run the same command again when it has ended."""

    def phase(todo: list[Run], label: str, key: str, waiting: str) -> bool:
        start = time.perf_counter()
        phase_failed, done = _train_runs(todo, runs, label=label, **common)
        failed.extend(phase_failed)
        if not done:
            log(f"{len(todo)} {waiting}")
        timings[key] = time.perf_counter() - start
        return done

    if tune_runs:
        if not phase(unique_runs(tune_runs), "tune ", "tuning_seconds",
                     "tuning runs submitted; the final runs follow once they have "
                     "finished: run the same command again"):
            return False
        resolve(runs, choose(tune_runs, runs_root), spec)
        pending = sorted({r.cell for r in runs if r.pending})
        if pending:
            log(f"no radius chosen for {len(pending)} cells (a tuning run failed): "
                f"{', '.join(pending)}")
    return phase(unique_runs(runs), "", "final_seconds",
                 "runs submitted; when they have finished, build the report with the "
                 "same command and --report-only")


def _draw_study_figures(study: dict[str, Any], spec: TableSpec, out: Path,
                        log: Callable[[str], None]) -> None:
    """figure.png and, for a study with ``cost``, frontier.png; each logged when drawn."""
    figure = _draw_figure(study, out / "figure.png")
    if figure is not None:
        log(f"wrote {figure}")
    if spec.cost:
        frontier = _draw_frontier(study, out / "frontier.png")
        if frontier is not None:
            log(f"wrote {frontier}")


def _draw_frontier(study: dict[str, Any], path: Path) -> Path | None:
    """Accuracy against measured cost, one point per method and row (studies with ``cost``)."""
    from agnostic_sam.analysis.plots import plot_frontier
    from agnostic_sam.reproduce.study import frontier_series

    series = frontier_series(study)
    if not series:
        return None
    return plot_frontier(series, path, title=f"{study['title']}: accuracy against cost")


def _draw_figure(study: dict[str, Any], path: Path) -> Path | None:
    """The study's figure (accuracy against its x, fixed and tuned radii side by side)."""
    from agnostic_sam.analysis.plots import plot_protocol
    from agnostic_sam.reproduce.study import figure_series

    series = figure_series(study)
    if not any(methods for panels in series.values() for methods in panels.values()):
        return None
    xlabel = {"noise_rate": "label noise rate (training set)",
              "train_fraction": "fraction of the training set"}.get(study["x"], str(study["x"]))
    return plot_protocol(series, path, xlabel=xlabel, title=study["title"])
