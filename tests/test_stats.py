"""Closed-form checks of the seed statistics (numbers worked out by hand in the comments)."""

import math

import pytest

from agnostic_sam.stats import (
    format_mean_std,
    format_paired,
    paired_difference,
    summarize,
    t_quantile,
)


def test_summarize_sample_std():
    # values 1, 2, 4: mean 7/3; squared deviations 16/9, 1/9, 25/9 -> sum 42/9; / (n-1)=2 -> 7/3
    s = summarize([1.0, 2.0, 4.0])
    assert s.n == 3
    assert s.mean == pytest.approx(7.0 / 3.0, abs=1e-12)
    assert s.std == pytest.approx(math.sqrt(7.0 / 3.0), abs=1e-12)


def test_summarize_single_value_has_no_spread():
    s = summarize([97.5])
    assert s.mean == 97.5 and s.n == 1 and math.isnan(s.std)
    assert format_mean_std(s) == "97.50"
    assert s.to_dict() == {"mean": 97.5, "std": None, "n": 1}


def test_t_quantiles_match_table():
    # Standard two-sided 95% table values.
    assert t_quantile(0.975, 1) == pytest.approx(12.7062047, abs=1e-6)
    assert t_quantile(0.975, 2) == pytest.approx(4.3026527, abs=1e-6)
    assert t_quantile(0.975, 3) == pytest.approx(3.1824463, abs=1e-6)


def test_paired_ci_hand_computed_contains_zero():
    # a - b per seed = 2, 1, 3 -> mean 2, s_d = 1, se = 1/sqrt(3) = 0.5773503,
    # half width = 4.3026527 * 0.5773503 = 2.4841377 -> CI [-0.4841377, 4.4841377].
    a = {0: 80.0, 1: 82.0, 2: 85.0}
    b = {0: 78.0, 1: 81.0, 2: 82.0}
    d = paired_difference(a, b)
    assert (d.mean, d.n, d.seeds) == (2.0, 3, (0, 1, 2))
    assert d.std == pytest.approx(1.0, abs=1e-12)
    assert d.low == pytest.approx(-0.4841377, abs=1e-6)
    assert d.high == pytest.approx(4.4841377, abs=1e-6)
    assert not d.significant
    line = format_paired(d, "agnostic-sam", "sam")
    assert "no significant difference at 95%" in line
    assert "[-0.48, +4.48]" in line and "n=3" in line


def test_paired_ci_hand_computed_significant_and_unpaired_seed_ignored():
    # diffs 1.0, 1.2, 0.8, 1.0 -> mean 1.0, s_d = sqrt(0.08/3) = 0.1632993, se = 0.0816497,
    # half width = 3.1824463 * 0.0816497 = 0.2598449 -> CI [0.7401551, 1.2598449].
    a = {0: 11.0, 1: 11.2, 2: 10.8, 3: 11.0, 9: 50.0}  # seed 9 has no partner in b
    b = {0: 10.0, 1: 10.0, 2: 10.0, 3: 10.0}
    d = paired_difference(a, b)
    assert d.n == 4 and d.seeds == (0, 1, 2, 3)
    assert d.mean == pytest.approx(1.0, abs=1e-12)
    assert d.low == pytest.approx(0.7401551, abs=1e-6)
    assert d.high == pytest.approx(1.2598449, abs=1e-6)
    assert d.significant
    assert "significant at 95% (x higher)" in format_paired(d, "x", "y")
    # Reversing the pair flips the interval.
    r = paired_difference(b, a)
    assert r.low == pytest.approx(-d.high) and r.high == pytest.approx(-d.low)
    assert "(x higher)" in format_paired(r, "y", "x")


def test_paired_single_seed_has_no_interval():
    d = paired_difference({0: 2.0}, {0: 1.0})
    assert d.n == 1 and math.isnan(d.low) and not d.significant
    assert "no confidence interval" in format_paired(d, "a", "b")
    assert d.to_dict()["low"] is None


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: summarize([]), "empty"),
        (lambda: paired_difference({0: 1.0}, {1: 1.0}), "no common seeds"),
        (lambda: paired_difference({0: 1.0}, {0: 1.0}, confidence=1.5), "1.5"),
        (lambda: t_quantile(0.975, 0), "0"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
