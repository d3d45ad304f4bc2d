"""Where a run stands (`RunState`) and what its checkpoint holds: `checkpoint_state` writes the
state of the parts and the run into one dict, `restore_state` loads such a dict back into freshly
built parts. The two sit side by side so that every field written is a field read: a resumed run
continues bit for bit where the checkpoint left off (tests/test_resume.py).

The checks a resume must pass first (the same run, world size and thread count) are the loop's
(`loop._restore_or_start`); they read the ``world_size`` and ``threads`` saved here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from agnostic_sam.train.build import RunParts
from agnostic_sam.train.checkpoint import restore_rng
from agnostic_sam.train.config import config_to_dict

__all__ = ["RunState", "checkpoint_state", "restore_state"]


@dataclass
class RunState:
    """Where the run stands: what a checkpoint restores and the next epoch continues."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    elapsed: float = 0.0  # seconds of training before this process started
    metrics: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.started


def checkpoint_state(parts: RunParts, state: RunState, rng: dict[str, Any],
                     rng_ranks: list[Any] | None) -> dict[str, Any]:
    """checkpoint.pt's content: weights, optimizer, schedule, scaler, the RNG streams captured at
    the epoch's end (``rng``: this rank's; ``rng_ranks``: every rank's under torchrun), where the
    run stands, and what a resume must agree with."""
    return {
        "model": parts.model.state_dict(),
        "optimizer": parts.opt.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "loss_scaler": parts.loss_scaler.state_dict() if parts.loss_scaler is not None else None,
        "epoch": state.epoch,
        "step": state.step,
        "rng": rng,
        "rng_ranks": rng_ranks,  # every rank's streams (None for one process)
        "world_size": parts.info.world_size,
        "threads": torch.get_num_threads(),  # a resume must use as many (loop._restore_or_start)
        "config": config_to_dict(parts.cfg),
        "metrics": state.metrics,
        "model_meta": parts.model_meta,
        "elapsed": state.seconds(),
    }


def restore_state(parts: RunParts, ckpt: dict[str, Any] | None) -> RunState:
    """A fresh state, or the checkpoint's: weights, optimizer, schedule, scaler, RNG streams."""
    if ckpt is None:
        return RunState()
    parts.model.load_state_dict(ckpt["model"])
    parts.opt.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    if parts.loss_scaler is not None:
        scaler = ckpt.get("loss_scaler")
        if scaler is None and ckpt.get("grad_scaler") is not None:  # fp16 SGD before 0.2
            old = ckpt["grad_scaler"]
            scaler = {"scale": old["scale"], "growth_tracker": old["_growth_tracker"],
                      **{k: old[k] for k in ("growth_factor", "backoff_factor", "growth_interval")}}
        if scaler is not None:
            parts.loss_scaler.load_state_dict(scaler)
    restore_rng((ckpt.get("rng_ranks") or [ckpt["rng"]])[parts.info.rank],
                {"split": parts.split_gen})
    return RunState(epoch=int(ckpt["epoch"]), step=int(ckpt["step"]),
                    elapsed=float(ckpt.get("elapsed", 0.0)), metrics=list(ckpt["metrics"]))
