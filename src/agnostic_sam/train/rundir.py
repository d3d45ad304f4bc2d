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

Run identity (`identity.py`): two configs describe the same run when they agree on every field
that changes the numbers (`IDENTITY_FIELDS`); `run_id` names a run by a hash of the identity
fields that differ from `TrainConfig`'s defaults. Both are re-exported here, with the strict
JSON helpers and path checks of `runfiles.py`, so callers import them from this module.

Every file is written atomically (see `checkpoint.py`) and every JSON file strictly: no NaN or
Infinity (non-finite numbers become ``null``), so any strict JSON parser reads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agnostic_sam.errors import UsageError
from agnostic_sam.train.checkpoint import (
    CHECKPOINT_NAME,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from agnostic_sam.train.config import TrainConfig, config_yaml, load_config
from agnostic_sam.train.identity import IDENTITY_FIELDS, run_id, run_identity
from agnostic_sam.train.runfiles import (
    check_path_names,
    json_kind,
    json_safe,
    read_strict,
    strict_json,
    write_error,
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
        result = read_strict(self.result_path, self.result_path.read_text)
        if not isinstance(result, dict):
            raise UsageError(f"{self.result_path} holds {json_kind(result)}, not a JSON object; "
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
        text = read_strict(self.metrics_path, self.metrics_path.read_text, parse=False)
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                row = read_strict(self.metrics_path, lambda line=line: line, where=number)
                if not isinstance(row, dict):
                    raise UsageError(f"{self.metrics_path}: line {number} holds {json_kind(row)}, "
                                     "not a JSON object")
                rows.append(row)
        return rows

    def load_checkpoint(self) -> dict[str, Any]:
        return load_checkpoint(self.checkpoint_path)

    def _write(self, path: Path, write: Any) -> None:
        try:
            write()
        except OSError as exc:
            raise write_error(path, exc) from None

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
