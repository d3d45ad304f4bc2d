"""`agnostic-sam methods [NAME]`: the registered methods (passes, cost, settings), or one
method's settings with their types, defaults and ranges."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "methods", help="list the training methods and their settings",
        description="Every registered method (built in, and plugins named in "
        "$AGNOSTIC_SAM_PLUGINS) as a Markdown table; with NAME, that method's settings "
        "(set them with --method-args KEY=VALUE).")
    p.add_argument("name", nargs="?", default=None, metavar="NAME", help="one method")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agnostic_sam.errors import UsageError
    from agnostic_sam.methods import get_method, list_methods
    from agnostic_sam.methods.docs import methods_table, settings_table

    if args.name is None:
        print(methods_table(list_methods()), end="")  # plugins' too (the docs: built-in)
        return 0
    try:
        info = get_method(args.name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"{info.name}: {info.description}\n")
    print(settings_table(info.name) if info.settings else "(no settings)\n", end="")
    return 0
