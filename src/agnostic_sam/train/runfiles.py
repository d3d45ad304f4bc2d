"""What the run directory's files must be, apart from the directory itself: strict JSON on
writing (`strict_json`) and on reading (`read_strict`), one-line errors for a file that cannot
be written, and the checks on a path before anything is created (`check_path_names`).

Strict JSON has no NaN or Infinity: non-finite numbers are written as ``null`` and refused on
reading, so any strict JSON parser reads every file a run writes. `RunDir` (`rundir.py`) is the
one caller for the run files; the reports and the analyses write their own JSON with
`strict_json` too.
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any

from agnostic_sam.errors import UsageError

__all__ = [
    "NAME_MAX",
    "PATH_MAX",
    "check_path_names",
    "json_kind",
    "json_safe",
    "read_strict",
    "strict_json",
    "write_error",
]


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (containers walked)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """JSON text of ``value`` that strict parsers accept (non-finite numbers as null)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, for an error message (``null``, ``a JSON list``, ...)."""
    return "null" if value is None else f"a JSON {type(value).__name__}"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not strict JSON")


def read_strict(path: Path, read: Any, *, parse: bool = True, where: int | None = None) -> Any:
    """``read()`` (text), parsed as strict JSON unless ``parse`` is false; UsageError naming
    ``path`` (and line ``where``) for a folder, unreadable bytes or anything but strict JSON."""
    at = f"{path}" if where is None else f"{path}: line {where}"
    try:
        text = read()
        return json.loads(text, parse_constant=_refuse_constant) if parse else text
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not a file; remove it") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text; it is damaged: delete it") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{at} is not JSON ({exc.msg}); it is damaged: delete it") from None
    except ValueError as exc:
        raise UsageError(f"{at} is not strict JSON ({exc}); delete it") from None
    except OSError as exc:
        raise UsageError(f"{path} is unreadable ({exc.strerror or exc})") from None


def write_error(path: Path, exc: OSError) -> UsageError:
    """The one-line error for a failed write of ``path``; a full disk says how to go on."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return UsageError(f"cannot write {path}: {reason}; the previous checkpoint is intact, "
                          "free some space and continue with --resume")
    return UsageError(f"cannot write {path}: {reason}")


def _limit(name: str, default: int) -> int:
    try:
        return int(os.pathconf("/", name))
    except (OSError, ValueError):
        return default


# Longest file name and path (bytes) the file system takes; beyond them every call fails with
# ENAMETOOLONG, so a path is refused before anything is created.
NAME_MAX = _limit("PC_NAME_MAX", 255)
PATH_MAX = _limit("PC_PATH_MAX", 4096)


def check_path_names(flag: str, path: str | Path) -> None:
    """UsageError (one line) for a path no file system takes or no user means: a name longer than
    NAME_MAX, a path longer than PATH_MAX, a dangling symbolic link or a loop of them on it."""
    text = os.fspath(path)
    for part in Path(text).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UsageError(f"{flag}: the name {part[:24]}... is {len(os.fsencode(part))} bytes "
                             f"long, the file system takes at most {NAME_MAX}")
    if len(os.fsencode(os.path.abspath(text))) >= PATH_MAX:
        raise UsageError(f"{flag}: the path is longer than the file system takes ({PATH_MAX} "
                         "bytes); choose a shorter one")
    for link in (p for p in (Path(text), *Path(text).parents) if p.is_symlink()):
        try:
            link.resolve(strict=True)
        except FileNotFoundError:
            raise UsageError(f"{flag} {text}: {link} is a dangling symbolic link (to "
                             f"{os.readlink(link)}); create its target or remove it") from None
        except (OSError, RuntimeError):  # ELOOP; Python < 3.13 raises RuntimeError
            raise UsageError(f"{flag} {text}: {link} is a loop of symbolic links; "
                             "remove it") from None
