"""The method tables of the documentation, generated from the registry (docs/methods.md and the
README show them; tests/test_methods_docs.py keeps them equal to what this prints)."""

from __future__ import annotations

from agnostic_sam.methods import get_method
from agnostic_sam.methods.builtin import BUILT_IN
from agnostic_sam.methods.record import MethodInfo, Setting

__all__ = ["methods_page", "methods_table", "readme_table", "settings_table"]

RATIO = 0.7  # |B^t| / |B| for the cost of methods that split the batch


def _default(s: Setting) -> str:
    if s.default is None:
        return "null"
    if isinstance(s.default, bool):
        return str(s.default).lower()
    return f"{s.default:g}" if isinstance(s.default, float) else str(s.default)


def _cost(info: MethodInfo) -> str:
    cost = info.batch_equivalents(RATIO)
    text = f"{cost:.3g}"
    return text + " (mean)" if info.cost is not None else text


def methods_table(names: list[str] | None = None) -> str:
    """One row per method: passes per step, cost in batch-equivalents (r = 0.7), its settings
    with defaults (the tuned one in bold), state kept across steps, paper."""
    rows = ["| method | passes per step | cost (batches) | settings (defaults; **tuned**) | "
            "state across steps | paper |", "|---|---|---|---|---|---|"]
    for name in names or list(BUILT_IN):
        info = get_method(name)
        settings = ", ".join(
            (f"**{s.name}={_default(s)}**" if s.name == info.tune else f"{s.name}={_default(s)}")
            for s in info.settings) or "-"
        passes = " + ".join(info.passes) if info.closure == "loss" else \
            " + ".join(info.passes) + " (per-sample closure)"
        rows.append(f"| `{name}` | {passes} | {_cost(info)} | {settings} | "
                    f"{', '.join(info.state) or '-'} | {info.paper or '-'} |")
    return "\n".join(rows) + "\n"


def settings_table(name: str) -> str:
    """A method's settings: name, type, default, range, help."""
    info = get_method(name)
    rows = ["| setting | type | default | range | meaning |", "|---|---|---|---|---|"]
    for s in info.settings:
        rows.append(f"| `{s.name}` | {s.kind.__name__} | {_default(s)} | {s.range_text()} | "
                    f"{s.help} |")
    return "\n".join(rows) + "\n"


def _notes(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "-"


def methods_page() -> str:
    """docs/methods.md, whole: the table, each method's settings, and its notes."""
    parts = [
        "# Methods\n",
        "Generated from the method registry (`python -m agnostic_sam.methods.docs > "
        "docs/methods.md`; `tests/test_methods_docs.py` checks it). Passes are forward + "
        "backward passes per step on the batch B or its parts B^t / B^v; cost is the mean "
        f"forward + backward work of one step in batches (r = |B^t|/|B| = {RATIO}), which "
        "`compare --budget passes` uses; `agnostic-sam bench` times them all. Norms are global "
        "over every parameter with a gradient, every denominator gets `perturb_eps` (1e-12), "
        "weights are restored bit for bit, weight decay is the base optimizer's, and with "
        "`model=` BatchNorm statistics move only in passes at theta.\n",
        methods_table(),
        "## Where each implementation differs from the authors' code and from "
        "pytorch_optimizer\n",
        "| method | description | differences, and why |",
        "|---|---|---|",
    ]
    for name in BUILT_IN:
        info = get_method(name)
        parts.append(f"| `{name}` | {_notes(info.description)} | {_notes(info.notes)} |")
    parts.append("")
    for name in BUILT_IN:
        info = get_method(name)
        if info.settings:
            parts += [f"## `{name}` settings\n", settings_table(name)]
    return "\n".join(parts)


def readme_table() -> str:
    """The README's short table: method, passes, cost, tuned setting."""
    rows = ["| method | passes per step | cost (batches) | `--tune` searches |",
            "|---|---|---|---|"]
    for name in BUILT_IN:
        info = get_method(name)
        rows.append(f"| `{name}` | {len(info.passes)} | {_cost(info)} | {info.tune or '-'} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(methods_page(), end="")
