"""What a run records and shows: the files of its run directory, the per-epoch progress bar and
line, and the trained model read back from a run directory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agnostic_sam.errors import UsageError
from agnostic_sam.models import create_model
from agnostic_sam.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from agnostic_sam.train.config import TrainConfig, load_config

__all__ = [
    "CONFIG_NAME",
    "METRICS_NAME",
    "RESULT_NAME",
    "format_row",
    "git_commit",
    "load_trained",
    "metrics_text",
    "progress",
]

METRICS_NAME = "metrics.jsonl"
RESULT_NAME = "result.json"
CONFIG_NAME = "config.yaml"


def metrics_text(metrics: list[dict[str, Any]]) -> str:
    """metrics.jsonl: one JSON object per finished epoch."""
    return "".join(json.dumps(m) + "\n" for m in metrics)


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


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The model of a finished (or interrupted) run, rebuilt from config.yaml with the
    checkpoint's weights, in eval mode on `device`; and its config."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise UsageError(f"{run_dir} is not a run directory (no {CONFIG_NAME})")
    cfg = load_config(config_path, {})
    ckpt = load_checkpoint(run_dir / CHECKPOINT_NAME)
    meta = ckpt.get("model_meta")
    if meta is None:
        raise UsageError(f"checkpoint in {run_dir} lacks model_meta; it was not written by train()")
    model = create_model(cfg.model, **meta)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg
