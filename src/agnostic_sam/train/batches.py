"""The training batches of every epoch: an index matrix, then (x, y) on the device.

Every epoch is an index matrix of shape (steps, |B|) drawn from a generator seeded by
(seed, epoch), so an epoch's batches do not depend on what ran before it (exact resume):
  * split="batch": a permutation of the training set, cut into full batches of |B|; the
    Agnostic-SAM family splits each batch into B^t / B^v with `split_batch(ratio, generator)`.
  * split="fixed" (Agnostic-SAM family): the training set is split once into S^t / S^v by
    `fixed_split`; row k holds |B^t| = round(r |B|) indices of a pass over S^t, then
    |B^v| = |B| - |B^t| indices cycling through permutations of S^v. An epoch is one pass over S^t.
The last incomplete batch is dropped, so every step sees a full batch that can be split.
Under DDP each rank splits its own columns, so |B^t| = world * round(r |B| / world).

In-memory training sets (`TensorDataset`s: no random augmentation) live on the device and are
indexed there; any other set goes through a DataLoader whose batch sampler is the index matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from agnostic_sam.train.config import TrainConfig
from agnostic_sam.train.distributed import global_split_sizes

__all__ = ["RANK_SEED_STRIDE", "batches", "device_tensors", "epoch_generator", "epoch_index"]

# Ranks > 0 offset their seeds by this (dropout, augmentation): the same stream on every rank would
# correlate them. Rank 0 keeps the single-process seeds.
RANK_SEED_STRIDE = 100_003


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # A distinct, reproducible stream per (seed, epoch): epoch e's batches never depend on e-1.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _seed_worker(worker_id: int) -> None:
    # torch seeds python `random` and torch in each worker; numpy must be seeded by hand.
    np.random.seed(torch.initial_seed() % 2**32)


def epoch_index(cfg: TrainConfig, n: int, fixed: tuple[Tensor, Tensor] | None, epoch: int,
                world: int = 1) -> Tensor:
    """LongTensor (steps, |B|) of training-set indices for `epoch` (see the module docstring),
    the same on every rank; `world` sets the global |B^t| / |B^v| of the fixed split."""
    g = epoch_generator(cfg.seed, epoch)
    if fixed is None:
        steps = n // cfg.batch_size
        return torch.randperm(n, generator=g)[: steps * cfg.batch_size].view(steps, cfg.batch_size)
    idx_t, idx_v = fixed
    n_t, n_v = global_split_sizes(cfg.batch_size, cfg.split_ratio, world)
    steps = len(idx_t) // n_t
    rows_t = idx_t[torch.randperm(len(idx_t), generator=g)][: steps * n_t].view(steps, n_t)
    cycles = math.ceil(steps * n_v / len(idx_v))
    val = torch.cat([idx_v[torch.randperm(len(idx_v), generator=g)] for _ in range(cycles)])
    return torch.cat([rows_t, val[: steps * n_v].view(steps, n_v)], dim=1)


def device_tensors(train_set: Dataset, device: torch.device) -> tuple[Tensor, Tensor] | None:
    """(images, int64 labels) of an in-memory training set, moved to `device`; None otherwise."""
    if not isinstance(train_set, TensorDataset):
        return None
    x_all, y_all = train_set.tensors
    return x_all.to(device), y_all.long().to(device)


def batches(train_set: Dataset, tensors: tuple[Tensor, Tensor] | None, index: Tensor,
            cfg: TrainConfig, epoch: int, device: torch.device,
            rank: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (x, y) on `device` for each row of `index` (this rank's columns)."""
    if tensors is not None:  # in-memory fast path: the whole training set already lives on device
        x_all, y_all = tensors
        rows = index.to(device)
        for row in rows:
            yield x_all[row], y_all[row]
        return
    loader = DataLoader(
        train_set, batch_sampler=index.tolist(), num_workers=cfg.workers,
        generator=epoch_generator(cfg.seed + 1 + RANK_SEED_STRIDE * rank, epoch),
        worker_init_fn=_seed_worker,
        pin_memory=device.type == "cuda",
    )
    for x, y in loader:
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
