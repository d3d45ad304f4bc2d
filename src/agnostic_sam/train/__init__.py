"""Training: the typed run config, the run directory, the loop, and atomic checkpoints.

    from agnostic_sam.train import load_config, train
    result = train(load_config("configs/demo.yaml", {"epochs": 5}))

The loop (which imports the data, model and optimizer packages) loads on first use, so reading
a config or a run directory stays light.
"""

from __future__ import annotations

from typing import Any

from agnostic_sam.train.checkpoint import load_checkpoint, save_checkpoint
from agnostic_sam.train.config import TrainConfig, load_config, save_config, validate_config
from agnostic_sam.train.rundir import RunDir, run_id, run_identity

__all__ = [
    "RunDir",
    "TrainConfig",
    "load_checkpoint",
    "load_config",
    "load_trained",
    "resolve_device",
    "run_id",
    "run_identity",
    "save_checkpoint",
    "save_config",
    "train",
    "validate_config",
]

_LOOP_NAMES = ("train", "load_trained", "resolve_device")


def __getattr__(name: str) -> Any:
    if name in _LOOP_NAMES:
        from agnostic_sam.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'agnostic_sam.train' has no attribute {name!r}")
