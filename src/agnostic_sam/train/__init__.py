"""Training: the typed run config, the run directory, the loop, and atomic checkpoints.

    from agnostic_sam.train import load_config, train
    result = train(load_config("configs/demo.yaml", {"epochs": 5}))

The loop (which imports the data, model and optimizer packages), the checkpoints and the run
directory load on first use, so reading a config stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from agnostic_sam.train.config import TrainConfig, load_config, save_config, validate_config

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

# name -> its module, imported on first use (the checkpoints and the run directory import torch;
# the config alone does not, so `agnostic-sam train --help` stays light)
_LAZY = {
    "train": "loop", "load_trained": "loop", "resolve_device": "loop",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "RunDir": "rundir", "run_id": "rundir", "run_identity": "rundir",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"agnostic_sam.train.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'agnostic_sam.train' has no attribute {name!r}")
