"""Methods registered outside the package: modules named in ``$AGNOSTIC_SAM_PLUGINS``
(comma-separated) and the ``agnostic_sam.methods`` entry points, each imported once.

A plugin that cannot be loaded is never skipped in silence: a missing module, a syntax error, an
exception (or a ``sys.exit``) while it is imported, or a method name it registers a second time
raises one ``ValueError`` line naming the plugin, and the registry is left as it was before the
plugin ran. A failed plugin is not marked loaded, so every later call raises again.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["load_plugins"]

_PLUGINS_LOADED: set[str] = set()
_ENTRY_POINTS = "<entry points>"


def _problem(name: str, load: Callable[[], Any]) -> str | None:
    """Run ``load()`` (the import of plugin ``name``); what went wrong, in words, or None."""
    try:
        load()
    except SystemExit as exc:  # a plugin must not end the program that imports it
        return f"called sys.exit({exc.code!r}) while being imported"
    except SyntaxError as exc:
        return f"has a syntax error ({exc.filename}, line {exc.lineno}: {exc.msg})"
    except ModuleNotFoundError as exc:
        if exc.name is not None and (exc.name == name or name.startswith(exc.name + ".")):
            return "cannot be found (is it installed, or its folder on PYTHONPATH?)"
        return f"needs a module that is missing ({exc.name})"
    except Exception as exc:  # any error of the plugin's own code
        text = str(exc).strip().splitlines()
        return f"raised {type(exc).__name__} while being imported" + (f": {text[0]}" if text
                                                                     else "")
    return None


def _load(name: str, label: str, load: Callable[[], Any]) -> None:
    """Load one plugin; ValueError (one line) naming it when that fails or when it registers a
    name that was already registered. The registry is restored after a failure."""
    from agnostic_sam.methods import METHODS

    before = dict(METHODS)
    problem = _problem(name, load)
    if problem is None:
        replaced = [n for n, info in before.items() if METHODS.get(n) is not info]
        if not replaced:
            _PLUGINS_LOADED.add(name)
            return
        problem = (f"registers the method {replaced[0]!r}, which is already registered; "
                   "give its method another name")
    METHODS.clear()
    METHODS.update(before)
    sys.modules.pop(name, None)  # a retry imports it again (and fails again) rather than pass
    raise ValueError(f"{label} {name!r} {problem}")


def load_plugins() -> None:
    """Import the modules that register methods of their own: ``$AGNOSTIC_SAM_PLUGINS``
    (comma-separated module names) and the ``agnostic_sam.methods`` entry points. Each once;
    ValueError naming the plugin when one cannot be loaded (see the module docstring)."""
    names = [n.strip() for n in os.environ.get("AGNOSTIC_SAM_PLUGINS", "").split(",") if n.strip()]
    for name in names:
        if name not in _PLUGINS_LOADED:
            _load(name, "AGNOSTIC_SAM_PLUGINS:", functools.partial(importlib.import_module, name))
    if _ENTRY_POINTS not in _PLUGINS_LOADED:
        from importlib.metadata import entry_points

        for ep in entry_points(group="agnostic_sam.methods"):
            if ep.value not in _PLUGINS_LOADED:
                _load(ep.value, "the agnostic_sam.methods entry point", ep.load)
        _PLUGINS_LOADED.add(_ENTRY_POINTS)
