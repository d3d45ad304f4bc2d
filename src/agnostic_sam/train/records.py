"""What a run shows and notes about itself: the per-epoch progress bar and line, the machine it
ran on, the code version. (Its files belong to `rundir.RunDir`.)"""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from agnostic_sam.train.config import TrainConfig

__all__ = ["cpu_model", "format_row", "git_commit", "machine_info", "progress"]


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), e.g. "AMD EPYC 7B13"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """What decides whether two runs can be bit-identical: CPU model and thread count (and, in
    the result, the torch version and device). Results repeat bit for bit on one machine with
    the same threads and library versions, not across CPU families or GPUs."""
    return {"cpu": cpu_model(), "threads": torch.get_num_threads()}


def progress(cfg: TrainConfig, is_main: bool, total: int, epoch: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                disable=not (cfg.progress and is_main), dynamic_ncols=True)


def format_row(row: dict[str, Any], epochs: int) -> str:
    text = (f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.4g}  train {row['train_loss']:.4f} / "
            f"{row['train_acc']:.2f}%  test {row['test_loss']:.4f} / {row['test_acc']:.2f}%  "
            f"{row['epoch_seconds']:.1f}s")
    if "cos_train_val" in row:
        text += f"  cos {row['cos_train_val']:.3f}"
    return text
