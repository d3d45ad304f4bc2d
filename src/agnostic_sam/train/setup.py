"""Before the loop: the device, the seeds, the plain module under wrappers, and the checks a run
must pass before it writes its first file."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn

from agnostic_sam.errors import UsageError
from agnostic_sam.train.config import (
    AGNOSTIC_OPTIMIZERS,
    RESULT_FIELDS,
    TrainConfig,
    config_to_dict,
)
from agnostic_sam.train.distributed import global_split_sizes, local_batch_size

__all__ = [
    "check_distributed",
    "check_same_run",
    "resolve_device",
    "seed_everything",
    "synthetic_options",
    "unwrap",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile / (Distributed)DataParallel wrappers."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; a malformed or unavailable device is a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device '{name}' requested but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device '{name}' does not exist ({torch.cuda.device_count()} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device '{name}' requested but MPS is not available; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def check_same_run(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """A resumed run must agree with the checkpoint on every field that changes the numbers."""
    now = config_to_dict(cfg)
    for key in RESULT_FIELDS:
        if key in saved and saved[key] != now[key]:
            raise UsageError(
                f"--resume: '{key}' is {now[key]!r} but the checkpoint was trained with {saved[key]!r}"
            )


def check_distributed(cfg: TrainConfig, world: int) -> None:
    """What a run over `world` processes cannot honour -> UsageError before any file is written."""
    local_batch_size(cfg.batch_size, world)
    agnostic = cfg.optimizer in AGNOSTIC_OPTIMIZERS
    parts = global_split_sizes(cfg.batch_size, cfg.split_ratio, world) if agnostic else (cfg.batch_size,)
    if min(parts) // world < cfg.accumulate:
        raise UsageError(
            f"accumulate {cfg.accumulate} exceeds the {min(parts) // world} samples each of the {world} "
            "processes holds of the smallest batch part"
        )


def synthetic_options(cfg: TrainConfig) -> dict[str, int]:
    """The shape options only `synthetic` takes; other data sets reject them."""
    keys = ("num_classes", "train_size", "test_size")
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None}
