"""`agnostic-sam reproduce TABLE`: train a paper table's runs and report them next to the paper."""

from __future__ import annotations

import argparse
import contextlib

from agnostic_sam.cli.launcher import add_launcher_arguments, launcher_from_args
from agnostic_sam.reproduce.tables import STUDIES, TABLES
from agnostic_sam.train.config import LOGGERS

__all__ = ["register", "run"]


def _jobs(text: str) -> int:
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"--jobs takes an integer >= 1, got {text!r}")
    return jobs


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:  # a seed twice would plan the same run twice and count it twice in a cell
        raise argparse.ArgumentTypeError(
            f"seeds listed twice in {text!r}: {', '.join(map(str, twice))}; give each once")
    return seeds


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reproduce",
        help="reproduce a table or figure of the paper and report ours next to the paper's",
        description=(
            "Train every run of a paper table (configs shipped in agnostic_sam/reproduce/configs), "
            "skipping finished runs and resuming partial ones, then write report.md and "
            "report.json "
            "with the paper's number, ours (mean ± std, n), the difference and seconds per epoch."
        ),
    )
    p.add_argument("table", choices=(*TABLES, "all", *STUDIES),
                   help="which table or figure (all: every paper table); table4-digits and "
                        "table2-digits: the paper's protocols on the digits data, fixed and "
                        "tuned radii")
    p.add_argument("--out", default="runs/reproduce",
                   help="output folder (default: runs/reproduce)")
    p.add_argument("--data-dir", default=None, help="folder holding the data sets")
    p.add_argument("--download", action="store_true",
                   help="let torchvision fetch missing data sets")
    p.add_argument("--seeds", type=_seeds, default=None, metavar="S1,S2,..",
                   help="replace every config's seeds (e.g. 0 for a single-seed pass)")
    p.add_argument("--tune-seeds", type=_seeds, default=None, metavar="S1,S2,..",
                   help="replace the seeds of the radius-tuning runs (digits studies)")
    p.add_argument("--jobs", type=_jobs, default=None,
                   help="runs trained at once in local worker processes (--launcher local; default "
                        "1, or one per GPU); numbers do not depend on it")
    p.add_argument("--threads", type=_jobs, default=None,
                   help="CPU threads per run (default 1)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="list the runs with epochs, steps per epoch and total steps; "
                           "train nothing")
    mode.add_argument("--report-only", action="store_true",
                      help="write the report from the runs already in --out; train nothing")
    p.add_argument("--smoke", action="store_true",
                   help="every run for 2 steps: *_mini models on synthetic data of the real shapes")
    p.add_argument("--log", nargs="+", choices=LOGGERS, default=[],
                   help="every run also logs to TensorBoard and/or Weights & Biases")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_launcher_arguments(p, jobs=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agnostic_sam.reproduce import reproduce
    from agnostic_sam.train.rundir import RunDir

    launcher = launcher_from_args(args)
    root = RunDir(args.out)
    root.check_writable()  # an impossible --out stops here, before any plan is made
    # One reproduction per --out at a time: a second one would train or report the same runs.
    with contextlib.nullcontext() if args.dry_run else root.lock():
        reproduce(
            args.table, out=args.out, data_dir=args.data_dir, download=args.download,
            seeds=args.seeds, tune_seeds=args.tune_seeds, smoke=args.smoke, device=args.device,
            dry_run=args.dry_run, report_only=args.report_only, jobs=launcher.jobs or 1,
            threads=args.threads, progress=args.progress and not args.smoke, launcher=launcher,
            log_to=args.log,
        )
    return 0
