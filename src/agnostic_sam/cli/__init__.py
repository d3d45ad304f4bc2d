"""The `agnostic-sam` command line: one sub-command per module, each with `register(subparsers)`.

The command line and its experiments need the ``cli`` extra (torchvision, scikit-learn, scipy,
pyyaml, tqdm, matplotlib); without it `main` says in one line what to install.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import NoReturn

from agnostic_sam.errors import EXIT_DIVERGED, EXIT_USAGE, TrainingDiverged, UsageError

__all__ = ["main"]

# Sub-command modules under agnostic_sam.cli; each defines register(subparsers) and sets
# `func` on its parser to a function run(args) -> int.
COMMANDS = ["train", "compare", "reproduce", "analysis", "bench", "methods"]
# Import names of the `cli` extra's packages.
CLI_PACKAGES = ("yaml", "tqdm", "torchvision", "sklearn", "scipy", "matplotlib")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`prog: error: ...`) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def missing_cli_packages() -> list[str]:
    return [name for name in CLI_PACKAGES if importlib.util.find_spec(name) is None]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="agnostic-sam",
        description="Agnostic Sharpness-Aware Minimization: train, compare, reproduce, analyse.",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser
    )
    for name in COMMANDS:
        importlib.import_module(f"agnostic_sam.cli.{name}").register(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    missing = missing_cli_packages()
    if missing:
        print(f"agnostic-sam: error: the command line needs the 'cli' extra ({', '.join(missing)} "
              "missing): pip install 'agnostic-sam[cli]'", file=sys.stderr)
        return EXIT_USAGE
    try:
        # Plugins register methods the parser lists: a broken one is one line, even for --help.
        from agnostic_sam.methods import load_plugins

        load_plugins()
    except ValueError as exc:
        print(f"agnostic-sam: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError) as exc:
        # One line naming the problem, no traceback; argparse uses the same prefix and status.
        print(f"agnostic-sam: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a file the checks before could not foresee (a full disk, a race)
        where = f"{str(exc.filename)[:80]}: " if exc.filename else ""
        print(f"agnostic-sam: error: {where}{exc.strerror or _one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as exc:
        print(f"agnostic-sam: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("agnostic-sam: interrupted", file=sys.stderr)
        return 130
