"""Agnostic Sharpness-Aware Minimization (Nguyen et al.) for PyTorch.

    from agnostic_sam import AgnosticSAM, split_batch
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agnostic_sam.amp import LossScaler
    from agnostic_sam.optim import (
        ESAM,
        GSAM,
        RWP,
        SAM,
        WSAM,
        AgnosticSAM,
        FriendlySAM,
        KwonASAM,
        LookbehindSAM,
        LookSAM,
        MomentumSAM,
        Plain,
        VaSSO,
        accumulate,
        split_batch,
        split_sizes,
    )

__version__ = "0.3.0"

__all__ = [
    "AgnosticSAM", "SAM", "Plain", "GSAM", "FriendlySAM", "LookSAM", "ESAM", "MomentumSAM", "RWP",
    "LookbehindSAM", "VaSSO", "WSAM", "KwonASAM", "LossScaler", "accumulate", "split_batch",
    "split_sizes", "__version__",
]
_FAMILY = __all__[3:13]

# The public names load on first use (they import torch), so `agnostic_sam.errors` and the
# command line's `--help` stay light. Name -> the module that defines it.
_LAZY = {"LossScaler": "agnostic_sam.amp", "AgnosticSAM": "agnostic_sam.optim",
         "SAM": "agnostic_sam.optim", "Plain": "agnostic_sam.optim",
         "accumulate": "agnostic_sam.optim", "split_batch": "agnostic_sam.optim",
         "split_sizes": "agnostic_sam.optim", **dict.fromkeys(_FAMILY, "agnostic_sam.optim")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("__"):  # `agnostic_sam.optim` without importing it first, as before
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
