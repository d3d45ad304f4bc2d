"""The report of a comparison: per-optimizer summaries over seeds, paired statistics against the
reference methods, the markdown page, the accuracy-curve plot and ``comparison.json``.

`agnostic_sam.compare.run` plans and runs the runs; this module only reads their run directories
(``result.json``, ``metrics.jsonl``) and writes ``<out>/comparison.{json,md}`` and
``<out>/accuracy_curves.png``.
"""

from __future__ import annotations

import dataclasses
import errno
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from agnostic_sam.compare.config import CompareConfig, PlannedRun
from agnostic_sam.errors import UsageError
from agnostic_sam.methods import REFERENCES
from agnostic_sam.stats import (
    Summary,
    format_mean_std,
    format_paired,
    paired_difference,
    summarize,
    t_quantile,
)
from agnostic_sam.train.checkpoint import atomic_write_text
from agnostic_sam.train.config import settings_text
from agnostic_sam.train.rundir import RunDir, strict_json

__all__ = ["REPORT_KEYS", "jsonable", "markdown", "paired", "read_run", "report_write",
           "summaries", "unusable", "write_report"]

# The result.json numbers the report reads from every run (`compare.run` checks them first).
REPORT_KEYS = ("final_test_acc", "best_test_acc", "total_seconds")
# A full disk or quota: the runs are intact and the report can be written again from them.
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def unusable(problems: Sequence[tuple[str, str]]) -> UsageError:
    """One line naming every run a report cannot use: ``(run, why)`` pairs, the reasons of the
    first three in full and the other runs by name."""
    named = "; ".join(reason for _, reason in problems[:3])
    rest = [run for run, _ in problems[3:]]
    more = f"; and {len(rest)} more: {', '.join(rest)}" if rest else ""
    return UsageError(f"{len(problems)} run(s) cannot be used: {named}{more}")


def report_write(path: Path, write: Callable[[], Any], again: str) -> Any:
    """``write()`` of a report file; an OSError becomes one UsageError line naming ``path``
    (and, for a full disk, that the runs are intact and ``again`` writes the report)."""
    try:
        return write()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in _DISK_FULL:
            raise UsageError(f"cannot write {path}: {reason}; the runs are intact, free some "
                             f"space and {again}") from None
        raise UsageError(f"cannot write {path}: {reason}") from None


def read_run(run: PlannedRun) -> dict:
    """``{"result": result.json, "curve": test accuracy per epoch}`` of a finished run."""
    run_dir = RunDir(run.out)
    return {
        "result": run_dir.read_result(),
        "curve": [m["test_acc"] for m in run_dir.read_metrics()],
    }


def summaries(
    cc: CompareConfig, runs: Sequence[PlannedRun], eigen: Callable[[str], float] | None
) -> dict[str, dict]:
    """Per optimizer: its radius, final/best accuracy and seconds per run over the seeds, the
    per-seed final accuracies (for pairing), the curves and, with ``eigen``, the top eigenvalue."""
    out: dict[str, dict] = {}
    for optimizer in cc.optimizers:
        mine = [r for r in runs if r.optimizer == optimizer]
        if not mine:  # --report-only before any of its runs finished
            continue
        read = {r.seed: read_run(r) for r in mine}
        final = {s: float(v["result"]["final_test_acc"]) for s, v in read.items()}
        entry = {
            "radius": settings_text(mine[0].cfg),
            "final_test_acc": summarize(list(final.values())),
            "best_test_acc": summarize(
                [float(v["result"]["best_test_acc"]) for v in read.values()]
            ),
            "seconds_per_run": summarize(
                [float(v["result"]["total_seconds"]) for v in read.values()]
            ),
            # forward + backward work per run the trainer counted, in batches (None before 0.3)
            "work_per_run": _mean_or_none([
                float(v["result"]["steps"]) * float(v["result"]["batch_equivalents"])
                for v in read.values() if v["result"].get("batch_equivalents") is not None]),
            "machines": sorted({f"{v['result'].get('cpu')}, {v['result'].get('threads')} "
                                "thread(s)" for v in read.values()}),
            "per_seed": final,
            "curves": [v["curve"] for v in read.values()],
            "runs": [str(r.cfg.out) for r in mine],  # each cell's run directories
        }
        if eigen is not None:
            entry["top_eigenvalue"] = summarize([eigen(r.out) for r in mine])
        out[optimizer] = entry
    return out


def _mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _interval(summary: Summary) -> tuple[float, float] | None:
    """The 95% Student-t interval of a mean (None below two values)."""
    if summary.n < 2 or not math.isfinite(summary.std):
        return None
    half = t_quantile(0.975, summary.n - 1) * summary.std / math.sqrt(summary.n)
    return summary.mean - half, summary.mean + half


def paired(summaries: Mapping[str, dict]) -> list[dict]:
    """Every method against SGD, then against SAM; each unordered pair once (``sam - sgd``)."""
    rows, done = [], set()
    for ref in REFERENCES:
        if ref not in summaries:
            continue
        for name, entry in summaries.items():
            if name == ref or frozenset((name, ref)) in done:
                continue
            done.add(frozenset((name, ref)))
            diff = paired_difference(entry["per_seed"], summaries[ref]["per_seed"])
            rows.append(
                {"a": name, "b": ref, **diff.to_dict(), "statement": format_paired(diff, name, ref)}
            )
    return rows


def markdown(
    cc: CompareConfig,
    summaries: Mapping[str, dict],
    paired: list[dict],
    tuning: dict | None,
    metric: str,
) -> str:
    """comparison.md: the summary table, the paired differences and the tuning grid."""
    t = cc.train
    lines = [
        f"# Optimizer comparison: {t.dataset} / {t.model}",
        "",
        f"noise rate {t.noise_rate:g}, {t.epochs} epochs, batch {t.batch_size}, lr {t.lr:g}; "
        f"seeds {', '.join(map(str, cc.seeds))}. "
        "Accuracies in percent, mean ± sample std over seeds.",
        "",
    ]
    lines += _summary_table(cc, summaries, metric)
    machines = sorted({m for e in summaries.values() for m in e.get("machines", [])})
    budget = ("every method the same epochs" if t.budget == "epochs" else
              f"every method the forward + backward work of {t.budget_reference} in "
              f"{t.epochs} epochs")
    lines += [
        "",
        f"Budget: {budget}. Work per run: the forward + backward passes the trainer counted, in "
        f"batches; seconds per run on {'; '.join(machines) or 'n/a'}.",
        "",
        f"## Paired differences of final {metric} accuracy (same seeds, 95% Student-t CI)",
        "",
    ]
    lines += [f"- {p['statement']}" for p in paired] or [
        "- (nothing to pair: needs sgd or sam and at least one other optimizer)"
    ]
    if tuning is not None:
        lines += _tuning_table(cc, tuning)
    root = Path(cast(str, cc.train.out))  # load_compare_config sets it
    lines += ["", "## Runs", ""]
    for name, e in summaries.items():
        links = ", ".join(f"[{Path(r).name}]({_relative(r, root)})" for r in e["runs"])
        lines.append(f"- {name}: {links}")
    return "\n".join(lines) + "\n"


def _summary_table(cc: CompareConfig, summaries: Mapping[str, dict], metric: str) -> list[str]:
    """One row per optimizer: accuracies over the seeds, seconds and work per run, the 95%
    interval of the final accuracy and, with ``cc.hessian``, the top Hessian eigenvalue."""
    lines = [
        f"| optimizer | radius | final {metric} acc | best {metric} acc | n | seconds/run | "
        f"final acc 95% CI | work/run (batches) |"
        + (" top Hessian eigenvalue |" if cc.hessian else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if cc.hessian else ""),
    ]
    for name, e in summaries.items():
        ci = _interval(e["final_test_acc"])
        work = e.get("work_per_run")
        row = (
            f"| {name} | {e['radius']} | {format_mean_std(e['final_test_acc'])} | "
            f"{format_mean_std(e['best_test_acc'])} | {e['final_test_acc'].n} | "
            f"{e['seconds_per_run'].mean:.2f} | "
            f"{'n/a' if ci is None else f'[{ci[0]:.2f}, {ci[1]:.2f}]'} | "
            f"{'n/a' if work is None else f'{work:.0f}'} |"
        )
        if cc.hessian:
            row += f" {format_mean_std(e['top_eigenvalue'], digits=3)} |"
        lines.append(row)
    return lines


def _tuning_table(cc: CompareConfig, tuning: dict) -> list[str]:
    """The radius tuning section: mean held-out accuracy per candidate radius, and the choice."""
    cands = tuning["candidates"]
    lines = [
        "",
        f"## Radius tuning on a held-out {tuning['val_fraction']:g} of the training set "
        "(test set unused)",
        "",
        f"Mean final validation accuracy per candidate radius (Agnostic-SAM: rho1 = r, rho2 = "
        f"{cc.rho2_ratio:g} r); the best mean wins, ties go to the smaller radius.",
        "",
        "| optimizer | " + " | ".join(f"r={r:g}" for r in cands) + " | chosen |",
        "|---|" + "---|" * (len(cands) + 1),
    ]
    for name, grid in tuning["grid"].items():
        cells = " | ".join(format_mean_std(grid[r]) if grid[r].n else "diverged" for r in cands)
        lines.append(f"| {name} | {cells} | {tuning['chosen'][name]:g} |")
    return lines


def _relative(run_dir: str, root: Path) -> str:
    """The run directory as a link relative to the report (absolute when outside it)."""
    try:
        return str(Path(run_dir).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(Path(run_dir).resolve())


def jsonable(value: Any) -> Any:
    """``value`` with Summaries and dataclasses turned into plain dicts, keys into strings."""
    if isinstance(value, Summary):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _cost_figure(cc: CompareConfig, per_optimizer: Mapping[str, dict], root: Path,
                 again: str) -> Path | None:
    """accuracy_vs_cost.png: final accuracy (95% interval) against work per run."""
    from agnostic_sam.analysis.plots import plot_frontier

    points = {}
    for name, e in per_optimizer.items():
        if e.get("work_per_run") is None:
            continue
        ci = _interval(e["final_test_acc"]) or (e["final_test_acc"].mean,) * 2
        points[name] = (e["work_per_run"], e["final_test_acc"].mean, ci[0], ci[1])
    if not points:
        return None
    path = root / "accuracy_vs_cost.png"
    label = f"budget {cc.train.budget}" + (f" ({cc.train.budget_reference})"
                                           if cc.train.budget == "passes" else "")
    return report_write(path, lambda: plot_frontier(
        {label: points}, path, title=f"{cc.train.dataset} / {cc.train.model}: accuracy against "
        "cost"), again)


def write_report(
    cc: CompareConfig,
    runs: Sequence[PlannedRun],
    tuning: dict | None,
    metric: str,
    settings: Mapping[str, Any],
    *,
    print_report: bool = True,
) -> dict:
    """Summarize the finished final ``runs``, write comparison.{json,md} and the curve plot
    into ``cc.train.out``; returns comparison.json's content. ``metric`` is "test" or
    "validation"; ``settings`` is the comparison's own config, saved in the JSON."""
    root = Path(cast(str, cc.train.out))
    eigen = None
    if cc.hessian:
        from agnostic_sam.analysis import top_eigenvalue_of_run

        def eigen(run_dir: str) -> float:
            return float(top_eigenvalue_of_run(run_dir, device=cc.train.device))

    per_optimizer = summaries(cc, runs, eigen)
    pairs = paired(per_optimizer)
    page = markdown(cc, per_optimizer, pairs, tuning, metric)

    from agnostic_sam.analysis.plots import plot_accuracy_curves

    again = "run the same command with --report-only"
    report_write(root, lambda: root.mkdir(parents=True, exist_ok=True), again)
    png = report_write(root / "accuracy_curves.png", lambda: plot_accuracy_curves(
        {o: e["curves"] for o, e in per_optimizer.items()},
        root / "accuracy_curves.png",
        title=f"{cc.train.dataset} / {cc.train.model}: {metric} accuracy (mean ± std over seeds)",
        ylabel=f"{metric} accuracy (%)",
    ), again)
    cost_png = _cost_figure(cc, per_optimizer, root, again)
    report = {
        "metric": f"final_{metric}_acc",
        "config": jsonable(settings),
        "summary": jsonable(
            {o: {k: v for k, v in e.items() if k != "curves"} for o, e in per_optimizer.items()}
        ),
        "paired": pairs,
        "tuning": jsonable(tuning),
        "files": {"markdown": str(root / "comparison.md"), "curves": str(png),
                  "cost": str(cost_png) if cost_png is not None else None},
    }
    # Each file whole or not at all (atomic); the JSON last, as the mark of a complete report.
    report_write(root / "comparison.md", lambda: atomic_write_text(root / "comparison.md", page),
                 again)
    text = strict_json(report, indent=2) + "\n"
    report_write(root / "comparison.json",
                 lambda: atomic_write_text(root / "comparison.json", text), again)
    if print_report:
        print(page, end="")
        print(f"\nwrote {root / 'comparison.md'}, {root / 'comparison.json'}, {png}")
    return report
