r"""Summary statistics for comparing optimizers over random seeds.

Two things are reported for a set of runs:

* per method, the sample mean and the sample standard deviation (``ddof=1``) of a metric over
  seeds, with the number of seeds ``n``;
* per pair of methods trained with the *same* seeds, the paired difference
  ``d_s = a_s - b_s`` (seed ``s`` fixes the initialisation, the data order and the label noise
  for both methods, so pairing removes that shared variation) with a Student-t confidence interval

  .. math::  \bar d \pm t_{1-\alpha/2,\,n-1}\; s_d / \sqrt{n},

  where :math:`s_d` is the sample standard deviation of the differences. When the interval
  contains zero the data do not show a difference at that confidence level.

With three seeds (the paper's protocol) ``t_{0.975, 2} = 4.30``, so only large, consistent
differences are significant; the report says so plainly rather than ranking noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = [
    "Summary",
    "PairedDifference",
    "summarize",
    "t_quantile",
    "paired_difference",
    "format_mean_std",
    "format_paired",
]


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (ddof=1; NaN when ``n < 2``) of ``n`` values."""

    mean: float
    std: float
    n: int

    def to_dict(self) -> dict:
        return _finite_or_none(asdict(self))


@dataclass(frozen=True)
class PairedDifference:
    """Paired difference ``a - b`` over common seeds with a two-sided Student-t interval.

    ``low``/``high`` are NaN when ``n < 2`` (no spread to estimate). ``significant`` is True
    only when the interval excludes zero.
    """

    mean: float
    std: float
    n: int
    low: float
    high: float
    confidence: float
    seeds: tuple[int, ...]

    @property
    def significant(self) -> bool:
        return self.n >= 2 and (self.low > 0.0 or self.high < 0.0)

    def to_dict(self) -> dict:
        out = _finite_or_none(asdict(self))
        out["seeds"] = list(self.seeds)
        out["significant"] = self.significant
        return out


def _finite_or_none(d: dict) -> dict:
    # JSON has no NaN; undefined quantities (std of one value) are written as null.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def summarize(values: Sequence[float]) -> Summary:
    """Mean and sample standard deviation (divisor ``n - 1``) of ``values``."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("summarize needs at least one value, got an empty sequence")
    mean = math.fsum(xs) / n
    if n < 2:
        return Summary(mean, math.nan, n)
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return Summary(mean, math.sqrt(var), n)


def t_quantile(p: float, df: int) -> float:
    """Quantile ``t_{p, df}`` of Student's t distribution
    (e.g. ``t_quantile(0.975, 2) = 4.303``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    from scipy.stats import t as student_t  # on first use: `reproduce --help` stays light

    return float(student_t.ppf(p, df))


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95
) -> PairedDifference:
    """Paired difference ``a[s] - b[s]`` over the seeds ``s`` present in both mappings.

    ``a`` and ``b`` map seed -> metric. Seeds present in only one of them are ignored (a
    missing run cannot be paired). Raises ``ValueError`` when no seed is common.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError(f"no common seeds to pair: {sorted(a)} vs {sorted(b)}")
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    summary = summarize(diffs)
    if summary.n < 2:
        low = high = math.nan
    else:
        half = (
            t_quantile(0.5 + confidence / 2.0, summary.n - 1) * summary.std / math.sqrt(summary.n)
        )
        low, high = summary.mean - half, summary.mean + half
    return PairedDifference(summary.mean, summary.std, summary.n, low, high, confidence, seeds)


def format_mean_std(summary: Summary, digits: int = 2) -> str:
    """``"97.31 ± 0.42"``; the ``±`` part is omitted when the spread is undefined (``n = 1``)."""
    if math.isfinite(summary.std):
        return f"{summary.mean:.{digits}f} ± {summary.std:.{digits}f}"
    return f"{summary.mean:.{digits}f}"


def format_paired(diff: PairedDifference, name_a: str, name_b: str, unit: str = "pp") -> str:
    """One line: the mean difference, its interval, ``n`` and a plain verdict."""
    level = f"{100.0 * diff.confidence:g}%"
    head = f"{name_a} - {name_b}: {diff.mean:+.2f} {unit}"
    if diff.n < 2:
        return f"{head} (n=1: no confidence interval with a single seed)"
    interval = f"{level} CI [{diff.low:+.2f}, {diff.high:+.2f}], n={diff.n}"
    if diff.significant:
        better = name_a if diff.mean > 0 else name_b
        verdict = f"significant at {level} ({better} higher)"
    else:
        verdict = f"no significant difference at {level}"
    return f"{head}, {interval}: {verdict}"
