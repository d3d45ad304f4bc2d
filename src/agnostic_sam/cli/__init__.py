"""The `agnostic-sam` command line: one sub-command per module, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from agnostic_sam.errors import UsageError

__all__ = ["main"]

# Sub-command modules under agnostic_sam.cli; each defines register(subparsers) and sets
# `func` on its parser to a function run(args) -> int.
COMMANDS = ["train", "compare", "reproduce", "analysis", "bench"]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`prog: error: ...`) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="agnostic-sam",
        description="Agnostic Sharpness-Aware Minimization: train, compare, reproduce, analyse.",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser
    )
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"agnostic_sam.cli.{name}")
        except ModuleNotFoundError as exc:  # a command whose module is not written yet
            if exc.name != f"agnostic_sam.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError) as exc:
        # One line naming the problem, no traceback; argparse uses the same prefix and status.
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"agnostic-sam: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("agnostic-sam: interrupted", file=sys.stderr)
        return 130
