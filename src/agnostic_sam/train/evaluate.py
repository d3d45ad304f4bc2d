"""Evaluation of the model on the test (or held-out) set: mean loss and accuracy."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sized
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from agnostic_sam.train.distributed import DistInfo, all_reduce_sum, shard_bounds

__all__ = ["EVAL_BATCH", "evaluate"]

EVAL_BATCH = 512  # samples per evaluation forward pass


@torch.no_grad()
def evaluate(fwd: nn.Module, test_set: Dataset, device: torch.device,
             autocast: Callable[[], contextlib.AbstractContextManager[Any]],
             channels_last: bool, info: DistInfo) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in percent) on `test_set`; one host sync at the end.
    Under DDP each rank evaluates its contiguous share and the sums are all-reduced."""
    fwd.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    lo, hi = shard_bounds(len(cast(Sized, test_set)), info.rank, info.world_size)
    if isinstance(test_set, TensorDataset):
        x_all, y_all = (t[lo:hi] for t in test_set.tensors)
        chunks: Any = zip(x_all.split(EVAL_BATCH), y_all.split(EVAL_BATCH))
    else:
        part = Subset(test_set, range(lo, hi)) if info.distributed else test_set
        chunks = DataLoader(part, batch_size=EVAL_BATCH, shuffle=False)
    for x, y in chunks:
        x, y = x.to(device), torch.as_tensor(y).to(device)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = fwd(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
    fwd.train()
    sums = all_reduce_sum({"loss": loss_sum, "correct": correct.to(loss_sum.dtype),
                           "count": torch.tensor(float(count), device=device)})
    loss, acc, count = torch.stack(list(sums.values())).tolist()
    return loss / max(count, 1), 100.0 * acc / max(count, 1)
