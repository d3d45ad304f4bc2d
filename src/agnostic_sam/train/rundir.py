"""The run directory: one type that owns its file names, reads and writes them, keeps one writer
at a time, and says whether it holds the run a config describes.

A run directory holds::

    config.yaml      the resolved TrainConfig (written when the run starts)
    checkpoint.pt    model, optimizer, scheduler, RNG streams, metrics: written at each epoch end
    metrics.jsonl    one JSON object per finished epoch (rewritten from the checkpoint, so it is
                     never ahead of it)
    result.json      written once at the end: the summary, ``"status": "finished"``, or
                     ``"status": "diverged"`` for a failed run (the checkpoint then is the last
                     good epoch)
    .lock            the advisory lock of the process writing the run (its PID inside)

Run identity: two configs describe the same run when they agree on every field that changes
the numbers (`IDENTITY_FIELDS`: all but where it is written, how it is shown and how many
threads compute it). `run_id` names a run by a hash of the identity fields that differ from
`TrainConfig`'s defaults, computed on the resolved config: spelling out a default gives the same
id, and a field added later with a default leaves every existing id unchanged.

Every file is written atomically (see `checkpoint.py`) and every JSON file strictly: no NaN or
Infinity (non-finite numbers become ``null``), so any strict JSON parser reads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agnostic_sam.errors import UsageError
from agnostic_sam.methods import SHORTHANDS, get_method
from agnostic_sam.train.checkpoint import (
    CHECKPOINT_NAME,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from agnostic_sam.train.config import (
    TrainConfig,
    budget_factor,
    config_to_dict,
    config_yaml,
    load_config,
    method_settings,
)

__all__ = [
    "CHECKPOINT_NAME",
    "CONFIG_NAME",
    "IDENTITY_FIELDS",
    "LOCK_NAME",
    "METRICS_NAME",
    "RESULT_NAME",
    "RUN_FILES",
    "RunDir",
    "check_path_names",
    "json_safe",
    "run_id",
    "run_identity",
    "strict_json",
]

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
RESULT_NAME = "result.json"
LOCK_NAME = ".lock"
RUN_FILES = (CONFIG_NAME, CHECKPOINT_NAME, METRICS_NAME, RESULT_NAME)

# Fields that do not change the numbers a run produces: where it is written, whether it resumes,
# how it is shown or logged, how many CPU threads compute it.
_NOT_IDENTITY = {"data_dir", "download", "threads", "out", "resume", "progress", "log"}
IDENTITY_FIELDS = tuple(
    f.name for f in dataclasses.fields(TrainConfig) if f.name not in _NOT_IDENTITY
)


# Values the radius fields had by default before they meant "the method's default" (0.2): a run
# that left one unset is identified by the value it trained with, or by this when its method has
# no such setting, so every 0.2 run keeps its identity and id.
_SHORTHAND_IDENTITY = {"rho": 0.05, "rho1": 0.1, "rho2": 0.05}


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that define which run it is (see the module docstring), with the
    method's settings canonical: an unset radius is the value the method used, and
    ``method_args`` holds exactly the settings (other than the shorthand fields) that differ
    from the method's defaults."""
    values = config_to_dict(cfg)
    identity = {key: values[key] for key in IDENTITY_FIELDS}
    try:
        info = get_method(cfg.optimizer)
        settings = method_settings(cfg)
    except ValueError:  # not a run any command will train; compared as written
        return identity
    if identity.get("budget") == "passes" and budget_factor(cfg) == 1.0:
        # the same steps as under an epochs budget (the reference itself, or a method of its
        # cost): the same run, trained once and shared by both budgets
        identity["budget"] = "epochs"
    if identity.get("budget") == "epochs":  # the reference only matters for a passes budget
        identity["budget_reference"] = TrainConfig.budget_reference
    for key, legacy in _SHORTHAND_IDENTITY.items():
        if identity[key] is None:
            identity[key] = settings.get(key, legacy)
    identity["method_args"] = {
        k: v for k, v in settings.items()
        if k not in SHORTHANDS and v != info.setting(k).default
    }
    return identity


def run_id(cfg: TrainConfig) -> str:
    """``<dataset>-<model>-<optimizer>-seed<k>-<hash>``, the hash over the identity fields that
    differ from the defaults."""
    defaults = run_identity(TrainConfig())
    changed = {k: v for k, v in run_identity(cfg).items() if v != defaults[k]}
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.dataset}-{cfg.model}-{cfg.optimizer}-seed{cfg.seed}-{digest}"


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


def _kind(value: Any) -> str:
    return "null" if value is None else f"a JSON {type(value).__name__}"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not strict JSON")


def _read_strict(path: Path, read: Any, *, parse: bool = True, where: int | None = None) -> Any:
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


def _write_error(path: Path, exc: OSError) -> UsageError:
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


class RunDir:
    """One training run's directory (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / CONFIG_NAME
        self.checkpoint_path = self.path / CHECKPOINT_NAME
        self.metrics_path = self.path / METRICS_NAME
        self.result_path = self.path / RESULT_NAME
        self.lock_path = self.path / LOCK_NAME

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- one writer ---------------------------------------------------------------------------

    def check_writable(self) -> None:
        """UsageError (one line) when the directory cannot be created or written: an existing
        file, a path under a file, a read-only or special file system, an impossible name."""
        check_path_names("--out", self.path)
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path} is a file, not a directory")
        ancestor = self.path
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise UsageError(f"--out {self.path}: {ancestor} is a file, not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise UsageError(f"--out {self.path}: cannot write to {ancestor} "
                             "(read-only or no permission)")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's advisory lock (``fcntl.flock`` on ``.lock``; the kernel releases it when
        the process dies, so kill -9 never leaves a stale lock). Another holder -> UsageError
        naming its PID. The lock file is removed on release, and a directory this call created
        is removed again if nothing was written to it."""
        import fcntl

        self.check_writable()
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot write to --out {self.path}: {exc.strerror or exc}") from None
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UsageError(
                    f"cannot write to --out {self.path}: {exc.strerror or exc}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UsageError(
                    f"{self.path} is in use by another agnostic-sam process (PID {pid}); "
                    "wait for it to finish or choose another --out"
                ) from None
            # The holder before us may have removed the file between our open and our lock:
            # then we locked a file nobody else will see, so open the current one again.
            try:
                if os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)  # still holding it: nobody else can be inside
                if created and not any(self.path.iterdir()):
                    self.path.rmdir()
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def locked_by_other(self) -> bool:
        """True while another process holds the lock (a run in progress)."""
        import fcntl

        if not self.lock_path.is_file():
            return False
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing also drops the shared lock just taken
        return False

    def remove_stale_temps(self) -> list[Path]:
        """Delete temporary files a kill during an atomic write left behind (hold the lock)."""
        removed = []
        for name in RUN_FILES:
            for tmp in self.path.glob(f".{name}.*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    removed.append(tmp)
        return removed

    # ---- what it holds ------------------------------------------------------------------------

    def has_results(self) -> bool:
        """Something a fresh run would destroy: a result, a checkpoint, or recorded epochs."""
        if self.result_path.exists() or self.checkpoint_path.exists():
            return True
        return self.metrics_path.is_file() and self.metrics_path.stat().st_size > 0

    def saved_config(self) -> TrainConfig | None:
        """The run's config: config.yaml, else the checkpoint's copy; None for neither."""
        if self.config_path.is_file():
            return load_config(self.config_path, {})
        if self.checkpoint_path.is_file():
            return load_config(None, {}, base=self.load_checkpoint()["config"])
        return None

    def check_holds(self, cfg: TrainConfig, saved: TrainConfig | None = None, *,
                    resume: bool = False) -> None:
        """UsageError when the directory holds a different run than ``cfg`` (``resume``: worded
        for `--resume`, which must continue the checkpoint's run)."""
        saved = saved if saved is not None else self.saved_config()
        if saved is None:
            return
        mine, theirs = run_identity(cfg), run_identity(saved)
        for key in IDENTITY_FIELDS:
            if mine[key] != theirs[key] and resume:
                raise UsageError(f"--resume: '{key}' is {mine[key]!r} but the checkpoint was "
                                 f"trained with {theirs[key]!r}")
            if mine[key] != theirs[key]:
                raise UsageError(
                    f"{self.path} holds a run with a different config "
                    f"({key}: {theirs[key]!r}, this run "
                    f"{mine[key]!r}); choose another --out or delete that folder"
                )

    def state(self, cfg: TrainConfig | None = None) -> str:
        """``"new"``, ``"running"`` (another process holds the lock), ``"partial"`` (a
        checkpoint, no result), ``"finished"`` or ``"failed"`` (a result saying it diverged).
        With ``cfg``: UsageError when the directory holds a different run."""
        if not self.path.is_dir():
            return "new"
        if self.locked_by_other():
            return "running"
        if cfg is not None:
            self.check_holds(cfg)
        result = self.read_result()
        if result is not None:
            return "failed" if result.get("status") == "diverged" else "finished"
        return "partial" if self.checkpoint_path.is_file() else "new"

    def check_fresh(self, cfg: TrainConfig) -> None:
        """A fresh run must not destroy another: UsageError when the directory holds any run
        file, except a start of this very run that has nothing to lose (its own config.yaml and
        an empty metrics.jsonl: killed before its first checkpoint), which it starts over."""
        held = [n for n in RUN_FILES if (self.path / n).exists()]
        restart = not self.has_results() and CONFIG_NAME in held
        if held and not restart:
            raise UsageError(f"{self.path} already holds a run ({', '.join(held)}); pass --resume "
                             "to continue it or choose another --out")
        self.check_holds(cfg)

    # ---- reading and writing ------------------------------------------------------------------

    def read_result(self) -> dict[str, Any] | None:
        """result.json (None when there is none); UsageError naming the file when it is not a
        strict JSON object (a folder, null, a list, a NaN literal, unreadable bytes)."""
        if not self.result_path.exists() and not self.result_path.is_symlink():
            return None
        result = _read_strict(self.result_path, self.result_path.read_text)
        if not isinstance(result, dict):
            raise UsageError(f"{self.result_path} holds {_kind(result)}, not a JSON object; "
                             "delete it (the run is then resumed or trained again)")
        return result

    def read_finished(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """result.json of a finished run whose ``keys`` are finite numbers; UsageError naming the
        file and the field otherwise (no result, a diverged run, a damaged file)."""
        result = self.read_result()
        if result is None:
            raise UsageError(f"{self.path} has no {RESULT_NAME} (not finished)")
        if result.get("status", "finished") != "finished":
            raise UsageError(f"{self.result_path}: status {result.get('status')!r}, not finished")
        for key in keys:
            value = result.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                what = f"{key} is {value!r}, not a number" if key in result else f"no {key}"
                raise UsageError(f"{self.result_path}: {what}; it is damaged: delete it")
        return result

    def read_metrics(self) -> list[dict[str, Any]]:
        """One dict per finished epoch ([] before the first), each line strict JSON."""
        if not self.metrics_path.exists() and not self.metrics_path.is_symlink():
            return []
        text = _read_strict(self.metrics_path, self.metrics_path.read_text, parse=False)
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                row = _read_strict(self.metrics_path, lambda line=line: line, where=number)
                if not isinstance(row, dict):
                    raise UsageError(f"{self.metrics_path}: line {number} holds {_kind(row)}, "
                                     "not a JSON object")
                rows.append(row)
        return rows

    def load_checkpoint(self) -> dict[str, Any]:
        return load_checkpoint(self.checkpoint_path)

    def _write(self, path: Path, write: Any) -> None:
        try:
            write()
        except OSError as exc:
            raise _write_error(path, exc) from None

    def write_config(self, cfg: TrainConfig) -> None:
        """config.yaml: the run's resolved config. `resume` is how this process started, not a
        setting of the run: saved as false, so `train --config <run>/config.yaml` starts anew."""
        text = config_yaml(dataclasses.replace(cfg, resume=False))
        self._write(self.config_path, lambda: atomic_write_text(self.config_path, text))

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        text = "".join(strict_json(row) + "\n" for row in rows)
        self._write(self.metrics_path, lambda: atomic_write_text(self.metrics_path, text))

    def write_result(self, result: dict[str, Any]) -> None:
        text = strict_json(result, indent=2) + "\n"
        self._write(self.result_path, lambda: atomic_write_text(self.result_path, text))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        self._write(self.checkpoint_path, lambda: save_checkpoint(self.checkpoint_path, state))

    def load_trained(self, device: Any = "cpu") -> tuple[Any, TrainConfig]:
        """The run's model rebuilt from its config with the checkpoint's weights, in eval mode on
        ``device``; and its config."""
        from agnostic_sam.models import create_model

        if not self.checkpoint_path.is_file():
            raise UsageError(f"{self.path} is not a run directory (no {CHECKPOINT_NAME})")
        cfg = self.saved_config()
        ckpt = self.load_checkpoint()
        meta = ckpt.get("model_meta")
        if cfg is None or meta is None:
            raise UsageError(f"checkpoint in {self.path} lacks its config or model_meta; "
                             "it was not written by train()")
        if self.config_path.is_file():  # the checkpoint must be this run's, as --resume checks
            self.check_checkpoint_of(cfg, ckpt)
        try:
            model = create_model(cfg.model, **meta)
            model.load_state_dict(ckpt["model"])
        except (TypeError, RuntimeError, AttributeError) as exc:
            raise UsageError(f"checkpoint in {self.path} does not fit its model {cfg.model!r} "
                             f"({type(exc).__name__}); it is damaged or another run's") from None
        return model.to(device).eval(), cfg

    def check_checkpoint_of(self, cfg: TrainConfig, ckpt: dict[str, Any]) -> None:
        """UsageError when ``ckpt`` (read from this directory) was trained by another run than
        ``cfg`` (its config.yaml): an analysis would report the other run's numbers."""
        try:
            theirs = run_identity(load_config(None, {}, base=ckpt["config"]))
        except (UsageError, TypeError, ValueError, AttributeError):
            raise UsageError(f"{self.checkpoint_path} holds no readable config; "
                             "it is damaged: delete it or train the run again") from None
        mine = run_identity(cfg)
        for key in mine:
            if mine[key] != theirs.get(key):
                raise UsageError(f"{self.checkpoint_path} belongs to another run ({key}: "
                                 f"{theirs[key]!r}, config.yaml {mine[key]!r}); put the run's "
                                 "own checkpoint back or analyse the run it came from")
