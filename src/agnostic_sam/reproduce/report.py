r"""The reproduction report: per table cell, the paper's number next to ours.

For each cell the report reads the runs that feed it (``result.json`` and ``metrics.jsonl`` in
each run directory) and gives

* ``paper``: the paper's mean (and std where the paper gives one), from ``paper_numbers.json``;
* ``ours``: mean, sample standard deviation (ddof=1) and ``n`` over the cell's runs (seeds);
* ``diff``: ours minus paper, in the table's unit (percentage points or minutes);
* ``seconds_per_epoch``: mean wall-clock seconds per epoch from ``metrics.jsonl``, epochs after
  the first when there are several (the first carries warm-up: cuDNN autotuning, data caching).

A ``best_of`` cell (Table 2's SAM, best of three radii, as the paper did) groups its runs by
method, takes each method's mean over seeds and keeps the method with the highest mean; the report
names the chosen method. Table 6 (``metric: seconds_per_epoch``) is reported in minutes, like the
paper; its std pools the per-epoch times of the cell's runs.

A digits study (``spec`` given) is reported by `agnostic_sam.reproduce.study`: paired differences
to SGD and SAM with 95% intervals and verdicts, the tuning grid, the paper's numbers as context.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from agnostic_sam.compare.report import report_write, unusable
from agnostic_sam.errors import UsageError
from agnostic_sam.reproduce.spec import TABLES, TableSpec
from agnostic_sam.reproduce.study import render_study, study_report
from agnostic_sam.reproduce.tables import Run
from agnostic_sam.stats import summarize
from agnostic_sam.train.checkpoint import atomic_write_text
from agnostic_sam.train.rundir import RunDir, strict_json

__all__ = [
    "paper_numbers",
    "run_values",
    "seconds_per_epoch",
    "build_report",
    "check_runs",
    "render_markdown",
    "write_report",
]


def paper_numbers() -> dict[str, Any]:
    """``paper_numbers.json``:
    {"tables": {table: {"title", "unit", "cells": {key: {"mean", "std"?}}}}}."""
    text = resources.files("agnostic_sam.reproduce").joinpath("paper_numbers.json").read_text()
    return json.loads(text)


def _epoch_seconds(run_dir: Path) -> list[float]:
    """Per-epoch seconds, dropping the first epoch when later ones exist (warm-up). The rows are
    read strictly (`RunDir.read_metrics`); a row whose time is not a number is refused."""
    rd = RunDir(run_dir)
    seconds = []
    for number, row in enumerate(rd.read_metrics(), start=1):
        if "epoch_seconds" in row:
            value = row["epoch_seconds"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise UsageError(f"{rd.metrics_path}: line {number} has epoch_seconds "
                                 f"{value!r}, not a number; it is damaged")
            seconds.append(float(value))
    return seconds[1:] if len(seconds) > 1 else seconds


def seconds_per_epoch(run_dir: str | Path) -> float | None:
    """Mean seconds per epoch of one run (None without metrics)."""
    seconds = _epoch_seconds(Path(run_dir))
    return sum(seconds) / len(seconds) if seconds else None


def run_values(run_dir: str | Path, metric: str) -> list[float]:
    """The values one finished run contributes to its cell: ``[result[metric]]`` for a result.json
    key, the per-epoch seconds for ``seconds_per_epoch``; ``[]`` while the run is unfinished."""
    rd = RunDir(run_dir)
    result = rd.read_result()  # strict: a damaged file raises, naming it
    if result is None or result.get("status") == "diverged":
        return []
    if metric == "seconds_per_epoch":
        return _epoch_seconds(rd.path)
    return [float(rd.read_finished((metric,))[metric])]


def check_runs(runs: list[Run], runs_root: str | Path) -> None:
    """Read every finished run the report uses, strictly; one UsageError naming every run that
    cannot be used and why (`agnostic_sam.compare.report.unusable`): none is left out in
    silence, and nothing is written before."""
    problems: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for run in runs:
        if run.pending or (run.run_id, run.metric) in seen:
            continue
        seen.add((run.run_id, run.metric))
        try:
            run_values(Path(runs_root) / run.run_id, run.metric)
            seconds_per_epoch(Path(runs_root) / run.run_id)
        except UsageError as exc:
            if all(run.run_id != name for name, _ in problems):
                problems.append((run.run_id, str(exc)))
    if problems:
        raise unusable(problems)


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _cell(
    runs: list[Run],
    runs_root: Path,
    paper: dict[str, Any] | None,
    to_unit: float,
) -> dict[str, Any]:
    """Summarise the runs of one cell (all share table, cell key and metric)."""
    metric = runs[0].metric
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    candidates = []
    for method, members in by_method.items():
        values: list[float] = []
        done = 0
        for run in members:
            v = run_values(runs_root / run.run_id, metric)
            done += bool(v)
            values.extend(x * to_unit for x in v)
        candidates.append((method, members, values, done))
    # best_of: the method with the highest mean (accuracy); a single method otherwise
    scored = [c for c in candidates if c[2]]
    if scored:
        method, members, values, done = max(scored, key=lambda c: sum(c[2]) / len(c[2]))
    else:
        method, members, values, done = candidates[0]
    summary = summarize(values) if values else None
    spe = [s for s in (seconds_per_epoch(runs_root / r.run_id) for r in members) if s is not None]
    paper_mean = paper.get("mean") if paper else None
    ours_mean = _finite(summary.mean) if summary else None
    return {
        "cell": runs[0].cell,
        "method": method if len(by_method) > 1 else None,
        "paper": {"mean": paper_mean, "std": paper.get("std") if paper else None},
        "ours": {
            "mean": ours_mean,
            "std": _finite(summary.std) if summary else None,
            "n": done,
            "expected": len(members),
        },
        "diff": None if paper_mean is None or ours_mean is None else ours_mean - paper_mean,
        "seconds_per_epoch": sum(spe) / len(spe) if spe else None,
        "runs": [r.run_id for r in members],
    }


def build_report(
    runs: list[Run],
    runs_root: str | Path,
    paper: dict[str, Any] | None = None,
    *,
    spec: TableSpec | None = None,
    choices: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The report as a dict: {"tables": {table: {"title", "unit", "metric", "cells": [cell, ...]}}}.

    ``runs`` are the planned runs (``plan``); ``runs_root`` holds their directories by run id.
    Cells keep plan order; a cell whose runs have not finished has ``ours.mean = None``. With the
    ``spec`` of a digits study (and its tuning ``choices``) the table is the study's paired report.
    """
    runs_root = Path(runs_root)
    paper = paper if paper is not None else paper_numbers()
    check_runs(runs, runs_root)
    if spec is not None:
        return {"tables": {spec.table: study_report(spec, runs, runs_root, choices or {}, paper)}}
    grouped: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        grouped.setdefault(run.table, {}).setdefault(run.cell, []).append(run)
    tables: dict[str, Any] = {}
    for table in sorted(grouped, key=TABLES.index):
        info = paper["tables"].get(table, {})
        unit = info.get("unit", "percent")
        # Table 6: our seconds become minutes, the paper's unit
        to_unit = 1 / 60 if unit == "minutes" else 1.0
        cells = [
            _cell(cell_runs, runs_root, info.get("cells", {}).get(key), to_unit)
            for key, cell_runs in grouped[table].items()
        ]
        tables[table] = {"title": info.get("title", table), "unit": unit, "note": info.get("note"),
                         "metric": next(iter(grouped[table].values()))[0].metric, "cells": cells}
    return {"tables": tables}


def _fmt(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    """One Markdown table per paper table: cell | paper | ours (n) | diff | s/epoch."""
    lines = ["# Agnostic-SAM reproduction report", ""]
    if report.get("smoke"):
        lines += ["**Smoke run** (`--smoke`): two steps of `*_mini` models on synthetic data "
                  "of each "
                  "data set's shape. It checks that every run goes through; its numbers are not "
                  "results.", ""]
    timings = report.get("timings") or {}
    if timings:
        parts = ", ".join(f"{k.removesuffix('_seconds')} {v / 60:.1f} min"
                          for k, v in timings.items())
        lines += [f"Wall time of this invocation: {parts} (runs finished earlier are skipped, not "
                  "counted).", ""]
    if report.get("failed"):
        lines += [f"**{len(report['failed'])} runs failed or diverged**: "
                  + ", ".join(Path(p).name for p in report["failed"]), ""]
    for table in report["tables"].values():
        if "panels" in table:
            lines += render_study(table)
            continue
        unit = "minutes per epoch" if table["unit"] == "minutes" else "test accuracy, %"
        lines += [f"## {table['title']}", "", f"Unit: {unit}; metric: `{table['metric']}`.", ""]
        if table.get("note"):
            lines += [f"Note: {table['note']}", ""]
        lines += ["| cell | paper | ours | n | ours − paper | s/epoch |",
                  "|---|---|---|---|---|---|"]
        for c in table["cells"]:
            name = c["cell"] + (f" (best: {c['method']})" if c["method"] else "")
            n = f"{c['ours']['n']}/{c['ours']['expected']}"
            diff = "n/a" if c["diff"] is None else f"{c['diff']:+.2f}"
            spe = "n/a" if c["seconds_per_epoch"] is None else f"{c['seconds_per_epoch']:.1f}"
            lines.append(f"| {name} | {_fmt(**c['paper'])} | "
                         f"{_fmt(c['ours']['mean'], c['ours']['std'])} "
                         f"| {n} | {diff} | {spe} |")
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    again = "run the same command with --report-only"
    report_write(out_dir, lambda: out_dir.mkdir(parents=True, exist_ok=True), again)
    md, js = out_dir / "report.md", out_dir / "report.json"
    page, text = render_markdown(report), strict_json(report, indent=2) + "\n"
    # Each file whole or not at all; the JSON last, as the mark of a complete report.
    report_write(md, lambda: atomic_write_text(md, page), again)
    report_write(js, lambda: atomic_write_text(js, text), again)
    return md, js
