"""The package's shape as docs/architecture.md states it: no import cycle between modules, no
private name imported across modules, the optimizer core free of the command line's packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "agnostic_sam"


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import of a package module, including
    those inside functions and under TYPE_CHECKING (a cycle there is still a cycle to a reader)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith(PACKAGE)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith(PACKAGE):
                continue
            names = [a.name for a in node.names]
            # `from pkg import module` imports the module, not a name of pkg's __init__
            for n in names:
                if f"{target}.{n}" in modules:
                    found.append((f"{target}.{n}", []))
            found.append((target, [n for n in names if f"{target}.{n}" not in modules]))
    return [(t, n) for t, n in found if t in modules]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {t for t, _ in _imports(path, name, modules) if t != name}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
            "import agnostic_sam, agnostic_sam.methods; "
            "extra = ('yaml', 'tqdm', 'torchvision', 'sklearn', 'scipy', 'matplotlib'); "
            "print([m for m in extra if m in sys.modules and m not in before])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
