"""Reproduce the paper: every table and figure as configs, the paper's numbers, and a report.

``reproduce("table1")`` trains Table 1's runs (skipping finished ones) and writes ``report.md`` /
``report.json`` with the paper's value, ours (mean ± std, n), the difference and seconds per
epoch for every cell. The configs live in ``configs/*.yaml`` (schema: ``tables`` module docstring),
the paper's numbers in ``paper_numbers.json``. ``reproduce("table4-digits")`` and
``reproduce("table2-digits")`` run two of the paper's protocols on the embedded digits data with
fixed and held-out-tuned radii, and report paired differences to SGD and SAM with verdicts.
"""

from agnostic_sam.reproduce.listing import TRAIN_SIZES, format_plan, steps_per_epoch
from agnostic_sam.reproduce.report import build_report, paper_numbers, render_markdown, write_report
from agnostic_sam.reproduce.runner import check_data, reproduce, run_state
from agnostic_sam.reproduce.spec import STUDIES, TABLES, load_specs, spec_of
from agnostic_sam.reproduce.study import figure_series, verdict
from agnostic_sam.reproduce.tables import Run, plan, smoke_overrides, unique_runs
from agnostic_sam.reproduce.tuning import choose, resolve, tune_plan

__all__ = [
    "STUDIES",
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
    "choose",
    "figure_series",
    "resolve",
    "run_state",
    "smoke_overrides",
    "spec_of",
    "steps_per_epoch",
    "tune_plan",
    "unique_runs",
    "verdict",
    "write_report",
]
