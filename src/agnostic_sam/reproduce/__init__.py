"""Reproduce the paper: every table and figure as configs, the paper's numbers, and a report.

``reproduce("table1")`` trains Table 1's runs (skipping finished ones) and writes ``report.md`` /
``report.json`` with the paper's value, ours (mean ± std, n), the difference and seconds per
epoch for every cell. The configs live in ``configs/*.yaml`` (schema: ``tables`` module docstring),
the paper's numbers in ``paper_numbers.json``.
"""

from agnostic_sam.reproduce.report import build_report, paper_numbers, render_markdown, write_report
from agnostic_sam.reproduce.runner import check_data, reproduce, run_state
from agnostic_sam.reproduce.tables import (
    TABLES,
    TRAIN_SIZES,
    Run,
    format_plan,
    load_specs,
    plan,
    run_id,
    smoke_overrides,
    steps_per_epoch,
    unique_runs,
)

__all__ = [
    "TABLES",
    "TRAIN_SIZES",
    "Run",
    "build_report",
    "check_data",
    "format_plan",
    "load_specs",
    "paper_numbers",
    "plan",
    "render_markdown",
    "reproduce",
    "run_id",
    "run_state",
    "smoke_overrides",
    "steps_per_epoch",
    "unique_runs",
    "write_report",
]
