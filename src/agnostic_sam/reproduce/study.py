r"""The paired report of a digits study (Table 4 / Table 2 protocols), its Markdown and figure data.

A study's ``panels`` (see `agnostic_sam.reproduce.tables`) name the methods shown together (the
fixed radii, the tuned radii) and the methods they are paired against (``versus``: SGD, SAM). For
every row (e.g. ``cnn/noise0.2``) and method of a panel the report gives

* mean ± sample std (ddof = 1) of the final test accuracy over the seeds, and ``n``;
* the paired difference to each ``versus`` method over the common seeds (the same seed fixes the
  initialisation, data order, label noise and training subset for both), with a 95% Student-t
  interval (`agnostic_sam.stats.paired_difference`), and a verdict in plain words:
  ``ahead`` (the interval lies above 0), ``behind`` (below 0), ``no significant difference``
  (it contains 0), ``too few seeds`` (n < 2);
* for context, the paper's number for the same method and setting on its own data set
  (``paper``: a different data set, the same protocol), and the paper's gaps to the same baselines.

The tuning grid (held-out accuracy per candidate radius, the chosen radius) is reported with it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from agnostic_sam.reproduce.spec import TableSpec, paper_value
from agnostic_sam.reproduce.tables import Run
from agnostic_sam.stats import PairedDifference, paired_difference, summarize, t_quantile

__all__ = ["verdict", "study_report", "render_study", "figure_series", "frontier_series"]

CONFIDENCE = 0.95


def verdict(diff: PairedDifference) -> str:
    """``"ahead"``, ``"behind"``, ``"no significant difference"`` or ``"too few seeds"``."""
    if diff.n < 2:
        return "too few seeds"
    if not diff.significant:
        return "no significant difference"
    return "ahead" if diff.mean > 0 else "behind"


def _seed_values(runs: list[Run], runs_root: Path) -> dict[int, float]:
    """seed -> metric of the finished runs (a diverged run contributes nothing)."""
    from agnostic_sam.train.rundir import RunDir

    values = {}
    for run in runs:
        if run.pending:
            continue
        result = RunDir(runs_root / run.run_id).read_result()
        if result is None or result.get("status") == "diverged" or result.get(run.metric) is None:
            continue
        values[int(run.overrides["seed"])] = float(result[run.metric])
    return values


def _costs(runs: list[Run], runs_root: Path) -> dict[str, Any]:
    """Measured cost of the finished runs: forward + backward work per run in batches (steps x
    the batch-equivalents the trainer counted per step), wall seconds per run, and the CPUs."""
    from agnostic_sam.train.rundir import RunDir

    work, seconds, cpus = [], [], set()
    for run in runs:
        if run.pending:
            continue
        result = RunDir(runs_root / run.run_id).read_result()
        if result is None or result.get("status") != "finished":
            continue
        if result.get("batch_equivalents") is not None:
            work.append(float(result["steps"]) * float(result["batch_equivalents"]))
        seconds.append(float(result["total_seconds"]))
        cpus.add(f"{result.get('cpu')}, {result.get('threads')} thread(s)")
    return {"batches": sum(work) / len(work) if work else None,
            "seconds": sum(seconds) / len(seconds) if seconds else None, "machines": cpus}


def _interval(summary: Any) -> list[float | None] | None:
    """The 95% Student-t interval of the mean (None below two values)."""
    if summary is None or summary.n < 2 or not math.isfinite(summary.std):
        return None
    half = t_quantile(0.5 + CONFIDENCE / 2.0, summary.n - 1) * summary.std / math.sqrt(summary.n)
    return [_finite(summary.mean - half), _finite(summary.mean + half)]


def _radius_text(run: Run) -> str:
    from agnostic_sam.train.config import settings_text

    if run.pending:
        return "pending tuning"
    return settings_text(run.config())


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _versus(method: str, vals: dict[int, float], values: dict[str, dict[int, float]],
            versus: dict[str, str]) -> dict[str, Any]:
    """Paired differences of ``method`` to each reference over the common seeds."""
    vs: dict[str, Any] = {}
    for label, ref in versus.items():
        if ref == method or not vals or not values[ref]:
            vs[label] = None
            continue
        try:
            d = paired_difference(vals, values[ref], CONFIDENCE)
        except ValueError:  # no common seed yet
            vs[label] = None
            continue
        vs[label] = {**d.to_dict(), "verdict": verdict(d)}
    return vs


def _cell(method: str, members: list[Run], values: dict[str, dict[int, float]],
          paper_of: dict[str, Any], versus: dict[str, str], runs_root: Path,
          machines: set[str]) -> dict[str, Any]:
    """One method of one row: accuracy, interval, cost, paired differences, the paper's."""
    vals = values[method]
    summary = summarize(list(vals.values())) if vals else None
    p = paper_of.get(method)
    paper_vs = {
        label: (p["mean"] - paper_of[ref]["mean"])  # type: ignore[index]
        if p and ref != method and paper_of.get(ref) else None
        for label, ref in versus.items()
    }
    cost = _costs(members, runs_root)
    machines |= cost.pop("machines")
    return {
        "method": method,
        "cell": members[0].cell if members else None,
        "radius": _radius_text(members[0]) if members else None,
        "mean": _finite(summary.mean) if summary else None,
        "std": _finite(summary.std) if summary else None,
        "ci": _interval(summary),
        "cost_batches": cost["batches"],
        "seconds": cost["seconds"],
        "n": len(vals),
        "expected": len(members),
        "seeds": {str(s): v for s, v in sorted(vals.items())},
        "vs": _versus(method, vals, values, versus),
        "paper": None if p is None else {**p, "vs": paper_vs},
    }


def _panel(spec: TableSpec, entry: dict[str, Any], by_row: dict[str, dict[str, list[Run]]],
           runs_root: Path, paper: dict[str, Any], machines: set[str]) -> list[dict[str, Any]]:
    """The rows of one panel: its methods in every row."""
    versus = dict(entry.get("versus") or {})
    rows = []
    for row, methods in by_row.items():
        first = next(iter(methods.values()))[0].overrides
        values = {m: _seed_values(methods.get(m, []), runs_root) for m in entry["methods"]}
        paper_of = {m: paper_value(spec, methods[m][0].overrides, paper)
                    for m in entry["methods"] if m in methods}
        cells = [_cell(m, methods.get(m, []), values, paper_of, versus, runs_root, machines)
                 for m in entry["methods"]]
        rows.append({
            "row": row,
            "x": first.get(spec.x) if spec.x else None,
            "group": first.get(spec.group) if spec.group else None,
            "methods": cells,
        })
    return rows


def _tuning_entries(runs: list[Run], choices: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    tuning: list[dict[str, Any]] = []
    for run in runs:
        if run.tune is None or run.cell in {t["cell"] for t in tuning}:
            continue
        choice = choices.get(run.cell)
        tuning.append({
            "cell": run.cell, "row": run.row, "method": run.method,
            "candidates": list(run.tune),
            "seeds": choice["seeds"] if choice else None,
            "grid": {f"{r:g}": s.to_dict() for r, s in choice["grid"].items()} if choice else None,
            "chosen": choice["chosen"] if choice else None,
        })
    return tuning


def study_report(
    spec: TableSpec,
    runs: list[Run],
    runs_root: str | Path,
    choices: dict[str, dict[str, Any]],
    paper: dict[str, Any],
) -> dict[str, Any]:
    """The study's panels, rows and tuning grid as a dict (see the module docstring)."""
    runs_root = Path(runs_root)
    by_row: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        by_row.setdefault(str(run.row), {}).setdefault(run.method, []).append(run)
    machines: set[str] = set()
    panels = [{"name": name, "versus": dict(entry.get("versus") or {}),
               "rows": _panel(spec, entry, by_row, runs_root, paper, machines)}
              for name, entry in spec.panels.items()]
    return {
        "title": spec.title or spec.table,
        "note": spec.note,
        "unit": "percent",
        "metric": spec.metric,
        "x": spec.x,
        "group": spec.group,
        "paper_table": spec.paper.get("table"),
        "tuning_settings": dict(spec.tuning),
        "panels": panels,
        "tuning": _tuning_entries(runs, choices),
        "cost": spec.cost,
        "machines": sorted(machines),
    }


def _num(x: float | None, fmt: str = "+.2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _vs_text(vs: dict[str, Any] | None) -> tuple[str, str]:
    if vs is None:
        return "—", "—"
    if vs["n"] < 2 or vs["low"] is None:
        return f"{vs['mean']:+.2f} (n={vs['n']})", vs["verdict"]
    return f"{vs['mean']:+.2f} [{vs['low']:+.2f}, {vs['high']:+.2f}]", vs["verdict"]


def _render_tuning(study: dict[str, Any]) -> list[str]:
    """Markdown lines of the tuning grid: held-out accuracy per candidate, the choice."""
    lines: list[str] = []
    t = study["tuning_settings"]
    candidates = sorted({r for entry in study["tuning"] for r in entry["candidates"]})
    lines += ["### Radius tuning", "",
              f"Mean held-out accuracy (a stratified {t.get('val_fraction')} of the "
              "training set, "
              + ("its labels as noisy as the training labels (val_noise), " if t.get("val_noise")
                 else "") +
              "test set never opened) over the tuning seeds; "
              f"rho2 = {t.get('rho2_ratio')} rho1 for the "
              "Agnostic-SAM family; the highest mean wins, ties to the smaller radius "
              "(`compare.select_radius`).", ""]
    cols = ["row", "method"] + [f"r={r:g}" for r in candidates] + ["chosen", "tuning seeds"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for entry in study["tuning"]:
        cells = [str(entry["row"]), entry["method"]]
        for r in candidates:
            s = (entry["grid"] or {}).get(f"{r:g}")
            cells.append("n/a" if s is None else (
                f"{s['mean']:.2f} ± {s['std']:.2f}" if s["std"] is not None
                else f"{s['mean']:.2f}"))
        cells.append("pending" if entry["chosen"] is None else f"{entry['chosen']:g}")
        cells.append("n/a" if entry["seeds"] is None else str(len(entry["seeds"])))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def render_study(study: dict[str, Any]) -> list[str]:
    """Markdown lines: one table per (group, panel), then the tuning grid."""
    lines = [f"## {study['title']}", ""]
    if study.get("note"):
        lines += [study["note"], ""]
    labels = None
    for panel in study["panels"]:
        labels = list(panel["versus"])
        groups: dict[Any, list[dict[str, Any]]] = {}
        for row in panel["rows"]:
            groups.setdefault(row["group"], []).append(row)
        for group, rows in groups.items():
            head = (f"### {study['group']} = {group}, {panel['name']}" if study.get("group")
                    else f"### {panel['name']}")
            lines += [head, ""]
            cost = bool(study.get("cost"))
            cols = ["row", "method", "setting" if study.get("cost") else "radius",
                    "test acc (mean ± std)", "n"]
            if cost:
                cols[3:4] = ["test acc (mean [95% CI])"]
                cols += ["work per run (batches)", "s per run"]
            for label in labels:
                cols += [f"− {label} [95% CI]", f"vs {label}"]
            cols += [f"paper ({study['paper_table']}, its data): acc; gap to " + ", ".join(labels)]
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for row in rows:
                for c in row["methods"]:
                    acc = "n/a" if c["mean"] is None else (
                        f"{c['mean']:.2f} ± {c['std']:.2f}" if c["std"] is not None
                        else f"{c['mean']:.2f}")
                    if cost and c["mean"] is not None and c.get("ci"):
                        acc = f"{c['mean']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]"
                    cells = [row["row"], c["method"], c["radius"] or "n/a", acc,
                             f"{c['n']}/{c['expected']}"]
                    if cost:
                        cells += [_num(c.get("cost_batches"), ".0f"), _num(c.get("seconds"), ".1f")]
                    for label in labels:
                        cells += list(_vs_text(c["vs"].get(label)))
                    p = c["paper"]
                    if p is None:
                        cells.append("n/a")
                    else:
                        gaps = ", ".join(_num(p["vs"][label]) if p["vs"][label] is not None else "—"
                                         for label in labels)
                        many = f" (mean of {p['cells']} cells)" if p["cells"] > 1 else ""
                        cells.append(f"{p['mean']:.2f}{many}; {gaps}")
                    lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    if study.get("cost") and study.get("machines"):
        lines += ["Work per run: forward + backward passes the trainer counted, in batches "
                  "(steps x batch-equivalents per step); seconds: wall time per run on "
                  + "; ".join(study["machines"]) + ".", ""]
    if study["tuning"]:
        lines += _render_tuning(study)
    return lines


def frontier_series(study: dict[str, Any]) -> dict[str, Any]:
    """What `agnostic_sam.analysis.plots.plot_frontier` draws: ``{row: {method: (work, mean,
    low, high)}}`` for the finished cells of the first panel (accuracy against cost)."""
    out: dict[str, Any] = {}
    for row in study["panels"][0]["rows"] if study["panels"] else []:
        for c in row["methods"]:
            if c["mean"] is None or c.get("cost_batches") is None:
                continue
            low, high = c["ci"] if c.get("ci") else (c["mean"], c["mean"])
            out.setdefault(str(row["row"]), {})[c["method"]] = (
                c["cost_batches"], c["mean"], low, high)
    return out


def figure_series(study: dict[str, Any]) -> dict[str, Any]:
    """What `agnostic_sam.analysis.plots.plot_protocol` draws: ``{group: {panel: {method:
    [(x, mean, std, n), ...]}}}``, x ascending; cells without results left out."""
    out: dict[str, Any] = {}
    for panel in study["panels"]:
        for row in panel["rows"]:
            per_method = out.setdefault(str(row["group"]), {}).setdefault(panel["name"], {})
            for c in row["methods"]:
                if c["mean"] is not None:
                    per_method.setdefault(c["method"], []).append(
                        (float(row["x"]), c["mean"], c["std"] or 0.0, c["n"]))
    for panels in out.values():
        for per_method in panels.values():
            for series in per_method.values():
                series.sort()
    return out
