"""Symmetric label noise for the noisy-label experiments (paper Section 4.3, Table 4).

A fraction ``p`` of the training labels is corrupted: exactly ``round(p * N)`` examples, chosen
uniformly without replacement by a seeded generator, each get a label drawn uniformly from the
``C - 1`` *other* classes. Test labels are never touched (see ``build_data``).
"""

from __future__ import annotations

import torch

__all__ = ["symmetric_label_noise"]


def symmetric_label_noise(
    targets: torch.Tensor, rate: float, num_classes: int, *, seed: int = 0
) -> tuple[torch.Tensor, float]:
    r"""Return ``(noisy_targets, realized_rate)`` with exactly ``round(rate * N)`` labels flipped.

    For each chosen index :math:`i`, :math:`\tilde y_i = (y_i + k_i) \bmod C` with
    :math:`k_i \sim \mathcal U\{1, \dots, C-1\}`, which is uniform over the classes
    :math:`\neq y_i`. ``realized_rate`` is the fraction of labels that differ (= k / N).

    Args:
        targets: LongTensor (N,) of clean labels in ``[0, num_classes)``; not modified.
        rate: noise rate p in [0, 1).
        num_classes: C, at least 2 when any label is flipped.
        seed: seeds a private ``torch.Generator``: same seed, same flips.
    """
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise_rate must be in [0, 1), got {rate!r}")
    targets = torch.as_tensor(targets, dtype=torch.long)
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-D, got shape {tuple(targets.shape)}")
    n = targets.numel()
    n_flip = round(rate * n)
    if n_flip == 0:
        return targets.clone(), 0.0
    if num_classes < 2:
        raise ValueError(f"label noise needs num_classes >= 2, got {num_classes!r}")
    if n and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes}), got range "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    gen = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(n, generator=gen)[:n_flip]
    # A shift in 1..C-1 modulo C never returns the original class and hits each other class once.
    shift = torch.randint(1, num_classes, (n_flip,), generator=gen)
    noisy = targets.clone()
    noisy[chosen] = (targets[chosen] + shift) % num_classes
    return noisy, n_flip / n
