"""TensorBoard and Weights & Biases loggers for a training run (``--log tensorboard wandb``).

`make_logger(kinds, run_dir, cfg_dict)` returns one `Logger` that writes to every backend asked
for (a no-op one for none). The loop calls::

    log_step(step, {"lr": ..., "loss_train": ..., "cos_train_val": ..., "grad_norm_train": ...})
    log_epoch(epoch, row)        # the metrics.jsonl row: train/test loss and accuracy, lr, ...
    close()

Tags: ``step/<name>`` against the global optimizer step, ``epoch/<name>`` against the epoch.

TensorBoard: event files in ``<run_dir>/tensorboard/``. A resumed run (``cfg_dict["resume"]``)
opens its writer with ``purge_step`` = its first logged step, so the steps a killed process
logged after its last checkpoint are dropped by TensorBoard's reader and the curves show each
step once.

W&B: offline (``WANDB_MODE`` unless set otherwise), files in ``<run_dir>/wandb/``; the run id
is derived from the run directory's absolute path, so a resumed run continues the same W&B run
(``wandb sync <run_dir>/wandb/offline-run-*`` uploads it where a network exists).

Both packages are optional (extras ``tensorboard`` and ``wandb``) and imported only here, when
asked for.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agnostic_sam.errors import UsageError

__all__ = ["LOGGER_KINDS", "Logger", "make_logger", "wandb_run_id"]

LOGGER_KINDS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
WANDB_PROJECT = "agnostic-sam"


def _scalars(values: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The numbers of ``values`` as floats (bools, strings and skipped keys out)."""
    out = {}
    for key, value in values.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = float(value)
    return out


class Logger:
    """Writes a run's scalars to every backend it holds; with none, does nothing."""

    def __init__(self, backends: Sequence[Any] = ()) -> None:
        self.backends = list(backends)

    def log_step(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = _scalars(scalars)
        for b in self.backends:
            b.log_step(int(step), values)

    def log_epoch(self, epoch: int, row: Mapping[str, Any]) -> None:
        values = _scalars(row, skip=("epoch",))
        for b in self.backends:
            b.log_epoch(int(epoch), values)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []


class _TensorBoard:
    """torch.utils.tensorboard's SummaryWriter, opened at the first
    scalar (see module docstring)."""

    def __init__(self, run_dir: Path, resumed: bool) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--log tensorboard needs tensorboard: "
                             "pip install 'agnostic-sam[tensorboard]'") from None
        self._writer_class = SummaryWriter
        self.log_dir = run_dir / TENSORBOARD_DIR
        self.resumed = resumed
        self.writer: Any = None

    def _open(self, step: int | None) -> Any:
        if self.writer is None:
            purge = step if self.resumed and step is not None else None
            self.writer = self._writer_class(log_dir=str(self.log_dir), purge_step=purge)
        return self.writer

    def log_step(self, step: int, values: dict[str, float]) -> None:
        writer = self._open(step)
        for key, value in values.items():
            writer.add_scalar(f"step/{key}", value, global_step=step)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        writer = self._open(None)
        for key, value in values.items():
            writer.add_scalar(f"epoch/{key}", value, global_step=epoch)
        writer.flush()  # an epoch is the unit a resume keeps: make it visible now

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def wandb_run_id(run_dir: str | Path) -> str:
    """The W&B run id of a run directory: 16 hex digits of its absolute path's SHA-256."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


class _WandB:
    """An offline W&B run in ``<run_dir>/wandb/``, resumed by its id."""

    def __init__(self, run_dir: Path, cfg_dict: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise UsageError("--log wandb needs wandb: pip install 'agnostic-sam[wandb]'") from None
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
            name=run_dir.name,
            id=wandb_run_id(run_dir),
            resume="allow",
            dir=str(run_dir),  # wandb writes <dir>/wandb/
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]  # wandb checks it
            config=dict(cfg_dict),
            settings=wandb.Settings(silent=True, console="off"),
        )
        # Two x-axes: optimizer steps and epochs (W&B's own step counter stays internal).
        self.run.define_metric("global_step")
        self.run.define_metric("step/*", step_metric="global_step")
        self.run.define_metric("epoch")
        self.run.define_metric("epoch/*", step_metric="epoch")

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"global_step": step, **{f"step/{k}": v for k, v in values.items()}})

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        self.run.log({"epoch": epoch, **{f"epoch/{k}": v for k, v in values.items()}})

    def close(self) -> None:
        self.run.finish()


def make_logger(kinds: Sequence[str] | None, run_dir: str | Path,
                cfg_dict: Mapping[str, Any]) -> Logger:
    """A Logger writing to each of ``kinds`` (a subset of `LOGGER_KINDS`) for the run in
    ``run_dir`` with resolved config ``cfg_dict``; no kinds: a no-op Logger. A missing package
    is a one-line UsageError naming the extra that installs it."""
    kinds = list(dict.fromkeys(kinds or ()))
    unknown = [k for k in kinds if k not in LOGGER_KINDS]
    if unknown:
        raise UsageError(f"unknown logger '{unknown[0]}'; choose from {', '.join(LOGGER_KINDS)}")
    run_dir = Path(run_dir)
    backends: list[Any] = []
    try:
        for kind in kinds:
            if kind == "tensorboard":
                backends.append(_TensorBoard(run_dir, bool(cfg_dict.get("resume"))))
            else:
                backends.append(_WandB(run_dir, cfg_dict))
    except BaseException:
        Logger(backends).close()
        raise
    return Logger(backends)
