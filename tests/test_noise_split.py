"""Label noise and index splits: exact counts, reproducibility, error inputs."""

from __future__ import annotations

import pytest
import torch

from agnostic_sam.data import fixed_split, stratified_holdout, symmetric_label_noise
from agnostic_sam.errors import UsageError


def _labels(n: int = 1000, c: int = 10, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.4, 0.8, 0.333])
@pytest.mark.parametrize("n", [1000, 37])
def test_noise_flips_exactly_round_pn_labels_all_to_another_class(rate: float, n: int) -> None:
    clean = _labels(n)
    noisy, realized = symmetric_label_noise(clean, rate, 10, seed=5)
    flipped = noisy != clean
    assert int(flipped.sum()) == round(rate * n)
    assert realized == pytest.approx(round(rate * n) / n)
    assert noisy.min() >= 0 and noisy.max() < 10
    assert torch.equal(clean, _labels(n))  # input untouched


def test_noise_is_reproducible_per_seed_and_differs_across_seeds() -> None:
    clean = _labels()
    a, _ = symmetric_label_noise(clean, 0.4, 10, seed=1)
    b, _ = symmetric_label_noise(clean, 0.4, 10, seed=1)
    c, _ = symmetric_label_noise(clean, 0.4, 10, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a != clean, c != clean)  # different examples chosen


def test_noise_new_label_is_uniform_over_the_other_classes() -> None:
    # 30000 labels of class 0, 90% flipped: each of the 4 other classes gets ~1/4 of the flips.
    clean = torch.zeros(30000, dtype=torch.long)
    noisy, _ = symmetric_label_noise(clean, 0.9, 5, seed=0)
    counts = torch.bincount(noisy[noisy != 0], minlength=5)[1:].float()
    assert counts.sum() == 27000
    # 5 sigma of a binomial(27000, 1/4) is ~356.
    assert (counts - 6750).abs().max() < 356


def test_zero_noise_is_the_identity() -> None:
    clean = _labels()
    noisy, realized = symmetric_label_noise(clean, 0.0, 10, seed=3)
    assert torch.equal(noisy, clean) and realized == 0.0


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_noise_rate_outside_unit_interval_is_a_value_error_naming_it(rate: float) -> None:
    with pytest.raises(ValueError, match=f"noise_rate.*{rate}"):
        symmetric_label_noise(_labels(), rate, 10)


def test_noise_rejects_labels_outside_the_classes() -> None:
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        symmetric_label_noise(torch.tensor([0, 1, 5]), 0.5, 3)


@pytest.mark.parametrize(("n", "ratio"), [(10, 0.7), (1000, 0.7), (7, 0.5), (3, 0.34)])
def test_fixed_split_is_disjoint_covers_and_has_the_ratio(n: int, ratio: float) -> None:
    idx_t, idx_v = fixed_split(n, ratio, seed=0)
    assert len(idx_t) == round(ratio * n)
    assert set(idx_t.tolist()).isdisjoint(idx_v.tolist())
    assert sorted(idx_t.tolist() + idx_v.tolist()) == list(range(n))
    assert idx_t.dtype == torch.long and idx_v.dtype == torch.long


def test_fixed_split_is_seeded() -> None:
    a, b, c = fixed_split(100, 0.7, 1), fixed_split(100, 0.7, 1), fixed_split(100, 0.7, 2)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize(("n", "ratio"), [(1, 0.5), (2, 0.1), (10, 0.99), (0, 0.5)])
def test_fixed_split_with_an_empty_part_is_a_value_error(n: int, ratio: float) -> None:
    with pytest.raises(ValueError, match="empty part"):
        fixed_split(n, ratio, 0)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.3])
def test_fixed_split_ratio_outside_open_interval_is_a_value_error(ratio: float) -> None:
    with pytest.raises(ValueError, match=f"ratio.*{ratio}"):
        fixed_split(10, ratio, 0)


def test_stratified_holdout_keeps_class_proportions() -> None:
    targets = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    keep, held = stratified_holdout(targets, 0.2, seed=0)
    assert sorted(keep.tolist() + held.tolist()) == list(range(100))
    assert torch.bincount(targets[held]).tolist() == [12, 6, 2]


def test_stratified_holdout_of_a_singleton_class_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="val_fraction"):
        stratified_holdout(torch.tensor([0, 0, 0, 1]), 0.5)
