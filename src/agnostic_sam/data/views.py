"""A dataset view: a subset of a base dataset, with its own transform and optional label override.

One base dataset (images without transforms) then serves as the augmented training split, the
eval-transformed held-out split and the noisy-label training split, without loading it twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["LabeledView", "make_view"]


class LabeledView(Dataset):
    """``view[i] = (transform(base[indices[i]][0]), targets[i])``.

    Args:
        base: a map-style dataset of ``(sample, label)``.
        indices: positions in ``base`` (None: all of it, in order).
        transform: applied to the sample (None: unchanged).
        targets: labels for the *view's* positions (None: the base's labels). This is how noisy
            labels reach the training data.
    """

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int] | torch.Tensor | None = None,
        transform: Callable[[Any], Any] | None = None,
        targets: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        self.base = base
        self.indices = None if indices is None else [int(i) for i in indices]
        self.transform = transform
        n = len(self.indices) if self.indices is not None else len(base)  # type: ignore[arg-type]
        if targets is not None and len(targets) != n:
            raise ValueError(f"targets has {len(targets)} labels for a view of {n} samples")
        self.targets = None if targets is None else [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        sample, label = self.base[self.indices[i] if self.indices is not None else i]
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, int(label) if self.targets is None else self.targets[i]


def make_view(
    base: Dataset,
    indices: torch.Tensor | None = None,
    transform: Callable[[Any], Any] | None = None,
    targets: torch.Tensor | None = None,
) -> Dataset:
    """Like ``LabeledView``, but an in-memory ``TensorDataset`` without transform stays one.

    The trainer batches ``TensorDataset``s in memory (no DataLoader workers), so the digits and
    synthetic sets keep that fast path after subsetting and relabelling.
    """
    if isinstance(base, TensorDataset) and transform is None and len(base.tensors) == 2:
        x, y = base.tensors
        if indices is not None:
            x, y = x[indices], y[indices]
        if targets is not None:
            y = torch.as_tensor(targets, dtype=torch.long).clone()
        return TensorDataset(x, y)
    return LabeledView(base, indices, transform, targets)
