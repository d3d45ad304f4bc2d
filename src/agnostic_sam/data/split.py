"""Index splits: the fixed non-overlapping S^t / S^v split (paper Section 5, "Non-overlap")
and the stratified held-out validation part used for tuning (``val_fraction``)."""

from __future__ import annotations

import torch

from agnostic_sam.errors import UsageError

__all__ = ["fixed_split", "stratified_holdout"]


def fixed_split(n: int, ratio: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Split ``range(n)`` into disjoint ``(idx_t, idx_v)`` with
    :math:`|S^t| = \mathrm{round}(r n)`.

    The paper's non-overlap setting trains on :math:`S^t` batches and perturbs with
    :math:`S^v` batches drawn from a fixed partition :math:`S = S^t \cup S^v`. Both index
    tensors are sorted LongTensors; the permutation comes from a generator seeded by ``seed``.
    """
    if not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"split ratio must be in (0, 1), got {ratio!r}")
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    n = int(n)
    n_t = round(ratio * n)
    if n_t == 0 or n_t == n:
        raise ValueError(f"fixed_split(n={n}, ratio={ratio}) leaves an empty part "
                         f"(|S^t|={n_t}, |S^v|={n - n_t})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:n_t].sort().values, perm[n_t:].sort().values


def stratified_holdout(
    targets: torch.Tensor, fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(idx_keep, idx_held)``: a class-stratified held-out part of about ``fraction * N``.

    Uses scikit-learn's stratified shuffle split, so every class keeps its proportion. A class
    with a single example cannot be stratified: that raises ``UsageError``.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction!r}")
    targets = torch.as_tensor(targets, dtype=torch.long)
    index = torch.arange(targets.numel()).numpy()
    try:
        keep, held = train_test_split(
            index, test_size=float(fraction), stratify=targets.numpy(), random_state=int(seed)
        )
    except ValueError as exc:
        raise UsageError(
            f"cannot hold out val_fraction={fraction} stratified by class: {exc}"
        ) from exc
    return torch.as_tensor(keep).sort().values, torch.as_tensor(held).sort().values
