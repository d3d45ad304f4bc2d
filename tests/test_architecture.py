"""The package's shape as docs/architecture.md states it: every import allowed by the table
"What each part may import" (parsed from the page, so the page cannot drift), no import cycle
between modules or parts, no private name imported across modules, the optimizer core free of
the command line's packages, and each command importing only what it runs."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
DOC = SRC.parent / "docs" / "architecture.md"
PACKAGE = "agnostic_sam"
TABLE_TITLE = "## What each part may import"


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


@dataclass(frozen=True)
class Import:
    target: str  # the imported module (a package module, or a third party's dotted name)
    names: tuple[str, ...]  # names taken from it (`from target import names`)
    lazy: bool  # inside a function or under `if TYPE_CHECKING:`: not run on import


def _deferred(tree: ast.Module) -> set[int]:
    """ids of the nodes that do not run when the module is imported."""
    out: set[int] = set()
    for node in ast.walk(tree):
        body: list[ast.AST] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            body = [node]
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            body = list(node.body)
        for part in body:
            out.update(id(n) for n in ast.walk(part))
    return out


def _all_imports(path: Path, name: str) -> list[Import]:
    """Every import statement of a module, relative ones resolved, including those inside
    functions and under TYPE_CHECKING (a cycle there is still a cycle to a reader)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    deferred = _deferred(tree)
    found = []
    for node in ast.walk(tree):
        lazy = id(node) in deferred
        if isinstance(node, ast.Import):
            found += [Import(a.name, (), lazy) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.append(Import(target, tuple(a.name for a in node.names), lazy))
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported package module, names taken from it) for every import of a package module."""
    found = []
    for imp in _all_imports(path, name):
        if not imp.target.startswith(PACKAGE):
            continue
        # `from pkg import module` imports the module, not a name of pkg's __init__
        for n in imp.names:
            if f"{imp.target}.{n}" in modules:
                found.append((f"{imp.target}.{n}", []))
        found.append((imp.target, [n for n in imp.names if f"{imp.target}.{n}" not in modules]))
    return [(t, n) for t, n in found if t in modules]


def _part(module: str) -> str:
    """The part of the package a module belongs to: its first name under the package (the
    package's own __init__ is the part `agnostic_sam`)."""
    names = module.split(".")
    return names[1] if len(names) > 1 else names[0]


@dataclass
class Row:
    parts: dict[str, bool]  # part -> only lazily
    third: dict[str, bool]  # third-party package -> only lazily
    never: set[str]


def _table() -> dict[str, Row]:
    """The table under TABLE_TITLE: per part, what it may import. In the "may import" cell a
    `code` name is a part, a plain word a third-party package, "(lazily)" after one: only inside
    a function; "nothing" is no entry. The "never" cell's `code` names are parts it must not
    import (checked against the first cell, the prose is for the reader)."""
    lines = DOC.read_text().splitlines()
    start = lines.index(TABLE_TITLE)
    rows = []
    for line in lines[start + 1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert rows[0][:2] == ["part", "may import"], f"{DOC.name}: unexpected table header {rows[0]}"
    table: dict[str, Row] = {}
    for cells in rows[2:]:
        assert len(cells) == 3, f"{DOC.name}: a row of the import table needs 3 cells: {cells}"
        row = Row({}, {}, set(re.findall(r"`([^`]+)`", cells[2])))
        for item in filter(None, (i.strip() for i in cells[1].split(","))):
            if item == "nothing":
                continue
            lazy = item.endswith("(lazily)")
            word = item.removesuffix("(lazily)").strip()
            match = re.fullmatch(r"`([\w.]+)`", word)
            assert match or re.fullmatch(r"[\w.]+", word), f"{DOC.name}: cannot read {item!r}"
            (row.parts if match else row.third)[match[1] if match else word] = lazy
        for part in re.findall(r"`([^`]+)`", cells[0]):
            assert part not in table, f"{DOC.name}: two rows for `{part}`"
            table[part] = row
    return table


def test_every_part_has_one_row_in_the_import_table() -> None:
    parts = {_part(m) for m in _modules()}
    table = _table()
    assert sorted(parts - set(table)) == [], "parts without a row in docs/architecture.md"
    assert sorted(set(table) - parts) == [], "rows of docs/architecture.md without a part"
    for part, row in table.items():
        named = set(row.parts) | row.never
        assert named <= parts, f"row `{part}` names unknown parts {sorted(named - parts)}"
        assert not row.never & set(row.parts), f"row `{part}` allows what it says never"


def test_every_import_is_allowed_by_the_import_table() -> None:
    table = _table()
    bad = []
    for name, path in sorted(_modules().items()):
        part = _part(name)
        row = table[part]
        for imp in _all_imports(path, name):
            top = imp.target.split(".")[0]
            if top == PACKAGE:
                other, allowed = _part(imp.target), row.parts
            elif top in sys.stdlib_module_names:
                continue
            else:
                other, allowed = top, row.third
            if other == part:
                continue
            if other not in allowed:
                bad.append(f"{name} imports {imp.target}: `{part}` may not import {other}")
            elif allowed[other] and not imp.lazy:
                bad.append(f"{name} imports {imp.target} on import: `{part}` may only lazily")
    assert bad == [], "fix the import or its row in docs/architecture.md"


def test_the_import_table_has_no_cycle_between_parts() -> None:
    table = _table()
    graph = {part: set(row.parts) for part, row in table.items()}
    assert _cycles(graph) == []


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {t for t, _ in _imports(path, name, modules) if t != name}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle() -> None:
    # A package importing its own submodules (its __init__ re-exporting them) is not a cycle a
    # reader follows; every other edge counts.
    graph = {m: {t for t in ts if not m.startswith(t + ".") and not t.startswith(m + ".")}
             for m, ts in _graph().items()}
    assert _cycles(graph) == []


def test_no_private_name_is_imported_across_modules() -> None:
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for target, names in _imports(path, name, modules):
            for n in names:
                if n.startswith("_") and target != name and not target.endswith("._functional"):
                    bad.append(f"{name} imports {target}.{n}")
    assert bad == []


def test_tests_import_no_private_name() -> None:
    bad = []
    for path in (SRC.parent / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                bad += [f"{path.name}: {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_")]
    assert bad == []


def test_the_optimizer_core_imports_only_torch() -> None:
    # `import agnostic_sam` (the optimizers and the method registry) must work with the core
    # dependencies alone: none of the cli extra's packages may be loaded by it.
    # (torch itself may load tqdm for torch.hub: only what agnostic_sam adds counts.)
    code = ("import sys, torch; before = set(sys.modules); "
            "import agnostic_sam, agnostic_sam.methods; agnostic_sam.AgnosticSAM; "
            "extra = ('yaml', 'tqdm', 'torchvision', 'sklearn', 'scipy', 'matplotlib'); "
            "print([m for m in extra if m in sys.modules and m not in before])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- each command imports what it runs ---------------------------------------------------------

HEAVY = ("torchvision", "matplotlib", "scipy", "sklearn")
_HELP = """
import json, sys
from agnostic_sam.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(m.split(".")[0] for m in sys.modules)}))
"""


@pytest.mark.parametrize("argv, light", [(["--help"], ("torch",)),
                                         (["train", "--help"], ("torch",)),
                                         (["compare", "--help"], ()),
                                         (["reproduce", "--help"], ())],
                         ids=["help", "train-help", "compare-help", "reproduce-help"])
def test_help_imports_no_heavy_package(argv: list[str], light: tuple[str, ...]) -> None:
    # `agnostic-sam --help` and `train --help` load no torch (under a second: the method list is
    # `agnostic-sam methods`); `compare --help` needs the method registry, hence torch, but
    # nothing of the data, analysis or statistics extras.
    env = {k: v for k, v in os.environ.items() if k != "AGNOSTIC_SAM_PLUGINS"}
    done = subprocess.run([sys.executable, "-c", _HELP, *argv], capture_output=True, text=True,
                          check=True, env=env)
    *text, last = done.stdout.strip().splitlines()
    report = json.loads(last)
    assert report["code"] == 0 and "usage: agnostic-sam" in "\n".join(text)
    assert [m for m in HEAVY + light if m in report["modules"]] == []


def test_the_command_table_matches_the_registrations() -> None:
    # `agnostic-sam --help` shows COMMANDS' lines without importing the command modules: they
    # must be the lines those modules register, and each command must be its module's.
    from agnostic_sam.cli import COMMANDS, build_parser

    def commands(parser):  # name -> (help line, whether a module registered it)
        action = parser._subparsers._group_actions[0]
        lines = {a.dest: a.help for a in action._choices_actions}
        return {n: (lines[n], "func" in p._defaults) for n, p in action.choices.items()}

    full = commands(build_parser())
    assert full == {name: (line, True) for name, (_, line) in COMMANDS.items()}
    assert list(full) == list(COMMANDS)
    for name in COMMANDS:
        assert commands(build_parser([name]))[name] == full[name]
    assert not any(registered for _, registered in commands(build_parser([])).values())
