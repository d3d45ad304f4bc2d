"""Atomic checkpoints and run files, validated loading, and RNG state capture for exact resume.

Every file a run writes goes through a temporary file in the same folder, flushed and fsynced,
then `os.replace`d over the target: a kill at any moment leaves either the old or the new file,
never a half-written one.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch

from agnostic_sam.errors import UsageError

__all__ = [
    "CHECKPOINT_NAME",
    "REQUIRED_KEYS",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write_text",
    "atomic_write_json",
    "capture_rng",
    "restore_rng",
]

CHECKPOINT_NAME = "checkpoint.pt"
# A checkpoint without these keys was not written by this trainer (or is incomplete).
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "rng", "config", "metrics")


def _file_mode() -> int:
    # mkstemp creates 0600 files; give the final file the mode open() would (0666 minus umask).
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave the temporary file behind.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Make the rename itself durable (POSIX; best effort elsewhere).
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: str | Path, obj: dict[str, Any]) -> None:
    """`torch.save(obj)` to `path` atomically (serialised in memory, then tmp + fsync + replace)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; UsageError (one line) if it is unusable.

    Missing, unreadable, truncated, corrupt and foreign files (lacking `REQUIRED_KEYS`) all raise
    UsageError naming the file, so the CLI exits with status 2 instead of a traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}")
    try:
        # weights_only=True: tensors and plain containers only; a checkpoint cannot run code.
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/EOFError/UnpicklingError/... on bad files
        raise UsageError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}); "
            "delete it to start over"
        ) from None
    if not isinstance(obj, dict):
        raise UsageError(f"checkpoint {path} is not a training checkpoint (not a dict)")
    missing = [key for key in REQUIRED_KEYS if key not in obj]
    if missing:
        raise UsageError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return obj


def _numpy_state_to_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (
        str(name),
        torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        int(pos),
        int(has_gauss),
        float(cached),
    )


def _numpy_state_from_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached)


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random state a run consumes: python, numpy, torch CPU, all CUDA devices, and
    `generators`."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's state as plain values (its key array as a tensor) so that checkpoints load
        # with torch.load(weights_only=True): no pickled objects, no code run on load.
        "numpy": _numpy_state_to_plain(cast(tuple, np.random.get_state())),  # legacy: a tuple
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng(
    state: dict[str, Any], generators: dict[str, torch.Generator] | None = None
) -> None:
    """Inverse of `capture_rng`; generator states are restored into the given generator objects."""
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])
