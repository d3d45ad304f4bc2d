"""The longest functions and largest modules of a source tree, measured with ast.

    python benchmarks/code_size.py [SRC]          # default: src/

A function's length is its lines from `def` to its last statement (decorators not counted);
a module's, its lines. The house limits (STYLE.md): functions <= 60 lines, modules <= ~400.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FUNCTION_LIMIT = 60
MODULE_LIMIT = 400


def measure(root: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(function lengths, module lengths), each as (lines, where), longest first."""
    functions, modules = [], []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        where = str(path.relative_to(root))
        modules.append((len(text.splitlines()), where))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                functions.append((length, f"{where}:{node.lineno} {node.name}"))
    return sorted(functions, reverse=True), sorted(modules, reverse=True)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "src")
    functions, modules = measure(root)
    print("longest functions:")
    for length, where in functions[:5]:
        print(f"  {length:4d}  {where}")
    print("largest modules:")
    for length, where in modules[:5]:
        print(f"  {length:4d}  {where}")
    print(f"functions over {FUNCTION_LIMIT} lines: "
          f"{sum(n > FUNCTION_LIMIT for n, _ in functions)}; modules over {MODULE_LIMIT} lines: "
          f"{sum(n > MODULE_LIMIT for n, _ in modules)}")


if __name__ == "__main__":
    main()
