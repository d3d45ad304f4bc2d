"""The `agnostic-sam` command line: one sub-command per module, each with `register(subparsers)`.

The command line and its experiments need the ``cli`` extra (torchvision, scikit-learn, scipy,
pyyaml, tqdm, matplotlib); without it `main` says in one line what to install.

Each command imports what it runs: `main` imports only the module of the command it was given
(`COMMANDS` holds the others' one-line help), so ``agnostic-sam --help`` loads no torch and
``agnostic-sam train --help`` no torchvision, scipy or matplotlib.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Collection
from typing import NoReturn

from agnostic_sam.errors import EXIT_DIVERGED, EXIT_USAGE, TrainingDiverged, UsageError

__all__ = ["main", "build_parser"]

# Each command -> (the module under agnostic_sam.cli that registers it, its line in
# `agnostic-sam --help`). A module's register(subparsers) adds its commands and sets `func` on
# each parser to a function run(args) -> int. tests/test_architecture.py keeps these lines equal
# to the registered ones.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train one model with one method (SGD, SAM, Agnostic-SAM, ...)"),
    "compare": ("compare", "several optimizers x seeds: table, paired statistics, radius tuning"),
    "reproduce": ("reproduce",
                  "reproduce a table or figure of the paper and report ours next to the paper's"),
    "hessian": ("analysis", "top Hessian eigenvalues and trace of a trained model"),
    "landscape": ("analysis", "filter-normalized 2-D loss landscapes, several runs side by side"),
    "congruence": ("analysis", "plot cos(train grad, val grad) over epochs"),
    "bench": ("bench", "time one optimizer step of SGD, SAM and Agnostic-SAM (full, simpler)"),
    "methods": ("methods", "list the training methods and their settings"),
}
# Import names of the `cli` extra's packages.
CLI_PACKAGES = ("yaml", "tqdm", "torchvision", "sklearn", "scipy", "matplotlib")
# Where methods/plugins.py finds plugins (read here without importing torch).
PLUGINS_VARIABLE = "AGNOSTIC_SAM_PLUGINS"
PLUGINS_GROUP = "agnostic_sam.methods"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`prog: error: ...`) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def missing_cli_packages() -> list[str]:
    return [name for name in CLI_PACKAGES if importlib.util.find_spec(name) is None]


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser. ``commands``: those whose modules are imported and registered
    (None: all); every other command is listed by its help line only and cannot parse."""
    parser = OneLineParser(
        prog="agnostic-sam",
        description="Agnostic Sharpness-Aware Minimization: train, compare, reproduce, analyse.",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser
    )
    wanted = {COMMANDS[c][0] for c in (COMMANDS if commands is None else commands)}
    registered: set[str] = set()
    for name, (module, line) in COMMANDS.items():
        if module not in wanted:
            sub.add_parser(name, help=line, add_help=False)
        elif module not in registered:  # a module registers all of its commands at once
            registered.add(module)
            importlib.import_module(f"agnostic_sam.cli.{module}").register(sub)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first word that is not an option; the top level has
    only -h), or None when there is none or it is unknown."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def _plugins_declared() -> bool:
    if os.environ.get(PLUGINS_VARIABLE, "").strip():
        return True
    from importlib.metadata import entry_points

    return bool(entry_points(group=PLUGINS_GROUP))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    missing = missing_cli_packages()
    if missing:
        print(f"agnostic-sam: error: the command line needs the 'cli' extra ({', '.join(missing)} "
              "missing): pip install 'agnostic-sam[cli]'", file=sys.stderr)
        return EXIT_USAGE
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_of(argv)
    # `train --help` lists no method (`agnostic-sam methods` does): it needs no registry.
    light = command is None or (command == "train" and ("-h" in argv or "--help" in argv))
    if not light or _plugins_declared():
        try:
            # Plugins register methods the parser lists: a broken one is one line, even for
            # --help. (With no plugin declared, --help and train --help need no registry.)
            from agnostic_sam.methods import load_plugins

            load_plugins()
        except ValueError as exc:
            print(f"agnostic-sam: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
    parser = build_parser([] if command is None else [command])
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
