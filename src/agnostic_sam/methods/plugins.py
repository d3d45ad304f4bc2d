"""Methods registered outside the package: modules named in ``$AGNOSTIC_SAM_PLUGINS``
(comma-separated) and the ``agnostic_sam.methods`` entry points, each imported once."""

from __future__ import annotations

import importlib
import os

__all__ = ["load_plugins"]

_PLUGINS_LOADED: set[str] = set()


def load_plugins() -> None:
    """Import the modules that register methods of their own: ``$AGNOSTIC_SAM_PLUGINS``
    (comma-separated module names) and the ``agnostic_sam.methods`` entry points. Each once."""
    names = [n.strip() for n in os.environ.get("AGNOSTIC_SAM_PLUGINS", "").split(",") if n.strip()]
    for name in names:
        if name not in _PLUGINS_LOADED:
            _PLUGINS_LOADED.add(name)
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ValueError(f"AGNOSTIC_SAM_PLUGINS: cannot import {name!r} ({exc})") from None
    if "<entry points>" not in _PLUGINS_LOADED:
        _PLUGINS_LOADED.add("<entry points>")
        from importlib.metadata import entry_points

        for ep in entry_points(group="agnostic_sam.methods"):
            ep.load()
