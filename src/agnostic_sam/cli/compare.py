"""`agnostic-sam compare`: several optimizers x seeds with paired statistics and radius tuning.

Every `agnostic-sam train` flag applies to all runs; `--optimizers`, `--seeds`, `--jobs`,
`--tune`, `--rho2-ratio` and `--hessian` (or the same keys in `--config FILE.yaml`) shape the
comparison; `--launcher inline|local|slurm` (or a `launcher:` mapping in the YAML) says where the
runs train, `--dry-run` shows the plan and `--report-only` reports what has finished. `--out` is
the comparison folder (runs go to OUT/<optimizer>/seed<k>/).
"""

from __future__ import annotations

import argparse
import dataclasses

from agnostic_sam.cli.launcher import add_launcher_arguments, launcher_from_args
from agnostic_sam.cli.train import add_train_arguments, overrides_from_args
from agnostic_sam.errors import UsageError
from agnostic_sam.methods import list_methods

__all__ = ["register", "run"]


def _radius_list(text: str) -> list[float]:
    # "--tune 0.05 0.1" and "--tune 0.05,0.1" both work.
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a radius list: {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="several optimizers x seeds: table, paired statistics, radius tuning",
        description="Train every optimizer with every seed (same data, same settings), "
        "then print final "
        "test accuracy (mean ± std, n), paired differences with 95%% Student-t intervals, and "
        "write OUT/comparison.md, comparison.json and accuracy_curves.png. Finished runs with "
        "the same config are reused.",
    )
    add_train_arguments(p)
    g = p.add_argument_group("comparison")
    g.add_argument(
        "--optimizers",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"methods to compare (default: every registered one: {' '.join(list_methods())})",
    )
    g.add_argument(
        "--seeds", nargs="+", type=int, default=None, metavar="K", help="run seeds (default: 0 1 2)"
    )
    g.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="runs in parallel worker processes (default 1); numbers are identical for any N",
    )
    g.add_argument(
        "--tune",
        nargs="+",
        type=_radius_list,
        default=None,
        metavar="RHO",
        help="candidate radii (SAM rho; Agnostic-SAM rho1 with rho2 = rho1 * --rho2-ratio), chosen "
        "by mean validation accuracy on a held-out part of the training set (--val-fraction, "
        "default 0.1); then every optimizer is retrained and tested once",
    )
    g.add_argument(
        "--rho2-ratio",
        type=float,
        default=None,
        metavar="R",
        help="Agnostic-SAM rho2 / rho1 while tuning (default 0.5, as in the paper)",
    )
    g.add_argument(
        "--hessian",
        action="store_true",
        default=None,
        help="add each final model's top Hessian eigenvalue (mean over seeds) to the table",
    )
    g.add_argument("--dry-run", action="store_true",
                   help="print what would be trained (for slurm: the job array), train nothing")
    g.add_argument("--report-only", action="store_true",
                   help="train nothing; report the finished runs and say how many are missing")
    add_launcher_arguments(p, jobs=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agnostic_sam.compare import compare, load_compare_config

    train_overrides = overrides_from_args(args)
    for key in ("optimizer", "seed"):
        if train_overrides.get(key) is not None:
            raise UsageError(f"compare sets --{key} per run; use --{key}s instead")
    tune = None if args.tune is None else [r for group in args.tune for r in group]
    compare_overrides = {
        "optimizers": args.optimizers,
        "seeds": args.seeds,
        "jobs": args.jobs,
        "tune": tune,
        "rho2_ratio": args.rho2_ratio,
        "hessian": args.hessian,
    }
    cc = load_compare_config(args.config, compare_overrides, train_overrides)
    cc.launcher = launcher_from_args(args, base=dataclasses.asdict(cc.launcher))
    compare(cc, dry_run=args.dry_run, report_only=args.report_only)
    return 0
