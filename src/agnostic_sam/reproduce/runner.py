"""Run a table's training runs (skipping finished ones, resuming partial ones) and write the report.

Layout under ``out`` (default ``runs/reproduce``)::

    out/runs/<run id>/      one training run (config.yaml, metrics.jsonl, result.json, checkpoint.pt)
    out/report.md           the paper's numbers next to ours, one table per paper table
    out/report.json         the same as data
    out/smoke_weights/      --smoke only: *_mini state dicts standing in for pretrained weights
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from agnostic_sam.errors import UsageError
from agnostic_sam.reproduce.report import build_report, write_report
from agnostic_sam.reproduce.tables import (
    NOT_IDENTITY,
    SMOKE_WEIGHTS,
    Run,
    format_plan,
    plan,
    unique_runs,
)

__all__ = ["run_state", "check_data", "reproduce"]


def run_state(run_dir: str | Path, overrides: dict[str, Any]) -> str:
    """``"new"``, ``"partial"`` (a checkpoint, no result) or ``"complete"`` (result.json written).

    A directory whose saved config disagrees with the planned run on a field that changes results
    raises UsageError: it holds some other run, and reusing it would mix results.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        return "new"
    saved = yaml.safe_load(config_path.read_text()) or {}
    for key, value in overrides.items():
        if key not in NOT_IDENTITY and saved.get(key) != value:
            raise UsageError(
                f"{run_dir} holds a run with {key}={saved.get(key)!r}, not {value!r}; "
                "delete it or choose another --out"
            )
    if (run_dir / "result.json").exists():
        return "complete"
    return "partial" if (run_dir / "checkpoint.pt").exists() else "new"


def check_data(runs: list[Run], *, data_dir: str | None, download: bool) -> None:
    """Open every data set and weights file the runs need before any training starts.

    A missing data set raises the data module's one-line UsageError naming the folder, the
    files it expects, and that ``--download`` fetches them where a network exists; missing
    pretrained weights raise the models module's line naming the file to fetch.
    """
    from agnostic_sam.data import build_data
    from agnostic_sam.models import resolve_weights

    datasets = {r.overrides.get("dataset", "digits"): r.overrides.get("image_size") for r in runs}
    for name, image_size in datasets.items():
        build_data(name, data_dir=data_dir, download=download, image_size=image_size)
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
        model = create_model(overrides["model"], num_classes=1000, in_channels=3, image_size=size)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)


def reproduce(
    table: str,
    *,
    out: str | Path = "runs/reproduce",
    data_dir: str | None = None,
    download: bool = False,
    seeds: list[int] | None = None,
    smoke: bool = False,
    device: str = "auto",
    dry_run: bool = False,
    report_only: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Train every run of ``table`` (``table1``..``table6``, ``figure1`` or ``all``), then report.

    Finished runs (result.json present, config matching) are skipped, partial ones resumed from
    their checkpoint. ``dry_run`` only logs the plan and returns None; ``report_only`` writes the
    report from whatever runs exist. Returns the report dict.
    """
    from agnostic_sam.train import load_config, train

    out = Path(out)
    runs = plan(table, seeds=seeds, smoke=smoke)
    todo = unique_runs(runs)
    if dry_run:
        log(format_plan(runs))
        return None
    runs_root = out / "runs"
    if not report_only:
        effective = {run.run_id: _effective(run, out) for run in todo}
        states = {rid: run_state(runs_root / rid, overrides) for rid, overrides in effective.items()}
        check_data([r for r in todo if states[r.run_id] != "complete"], data_dir=data_dir, download=download)
        for i, run in enumerate(todo, 1):
            state = states[run.run_id]
            cells = ", ".join(f"{r.table}:{r.cell}" for r in runs if r.run_id == run.run_id)
            if state == "complete":
                log(f"[{i}/{len(todo)}] done     {run.run_id} ({cells})")
                continue
            log(f"[{i}/{len(todo)}] {'resume' if state == 'partial' else 'train '}   {run.run_id} ({cells})")
            overrides = effective[run.run_id]
            if run.overrides.get("weights") == SMOKE_WEIGHTS:
                _write_smoke_weights(overrides)
            cfg = load_config(None, {
                **overrides, "out": str(runs_root / run.run_id), "resume": state == "partial",
                "device": device, "data_dir": data_dir, "download": download, "progress": progress,
            })
            train(cfg)
    report = build_report(runs, runs_root)
    report["smoke"] = smoke
    md, js = write_report(report, out)
    log(f"wrote {md} and {js}")
    return report

