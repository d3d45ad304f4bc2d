"""Splitting a mini-batch B into B^t and B^v on the fly (Algorithm 1, Sec. 5.1)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["split_batch", "split_sizes"]


def split_sizes(batch_size: int, ratio: float, world_size: int = 1) -> tuple[int, int]:
    """(|B^t|, |B^v|) with |B^t| = round(ratio * |B|); ValueError when either would be empty.

    Under data parallelism each of `world_size` processes splits its own |B| / world samples, so
    the global sizes are world * round(ratio * |B| / world) and the rest (the single-process
    sizes for world_size = 1).
    """
    if not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(f"invalid split ratio {ratio!r}: must be in (0, 1)")
    if world_size < 1 or batch_size % world_size != 0:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} processes")
    local = batch_size // world_size
    n_t = round(ratio * local)
    if n_t < 1 or n_t > local - 1:
        if world_size == 1:
            raise ValueError(
                f"a batch of {batch_size} is too small to split with ratio {ratio}: "
                f"|B^t|={n_t}, |B^v|={batch_size - n_t}; both must be >= 1"
            )
        raise ValueError(
            f"each of the {world_size} processes gets {local} samples per batch, too few to split "
            f"with split_ratio {ratio} (|B^t|={n_t}, |B^v|={local - n_t} per rank); "
            "raise batch_size"
        )
    return world_size * n_t, world_size * (local - n_t)


def split_batch(
    inputs: Tensor,
    targets: Tensor,
    ratio: float = 0.7,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Randomly split a mini-batch into (x_t, y_t, x_v, y_v), |B^t| = round(ratio * |B|).

    The permutation is drawn from `generator` (on its device; CPU by default), so a seeded
    generator makes the split reproducible and its state can be checkpointed.
    """
    n = inputs.shape[0]
    if targets.shape[0] != n:
        raise ValueError(f"inputs and targets differ in batch size: {n} vs {targets.shape[0]}")
    n_t, _ = split_sizes(n, ratio)
    device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(n, generator=generator, device=device).to(inputs.device)
    idx_t, idx_v = perm[:n_t], perm[n_t:]
    return (
        inputs[idx_t],
        targets[idx_t.to(targets.device)],
        inputs[idx_v],
        targets[idx_v.to(targets.device)],
    )
