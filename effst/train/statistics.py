"""Paired comparisons over seeds: mean difference, Student-t confidence interval, verdict.

Reports never claim "X beat Y" from means alone: each seed gives one paired difference
(X − Y on the same seed, the same pruned model), the interval is the two-sided Student-t
interval over those differences, and the verdict is "inconclusive" whenever the interval
contains 0 (or there is only one seed, which shows no spread at all). The t quantile is computed
here (regularised incomplete beta by continued fraction, inverted by bisection) so that numpy
and torch are all a report needs.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                          -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df: expected > 0, got {df!r}")
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(probability: float, df: float) -> float:
    """The t with P(T <= t) = ``probability`` (bisection to 1e-12)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability: expected a number in (0, 1), got {probability!r}")
    if probability < 0.5:
        return -student_t_quantile(1.0 - probability, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < probability:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if student_t_cdf(mid, df) < probability:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class PairedComparison:
    """X − Y over paired runs: mean, t-interval (None with fewer than 2 pairs) and verdict."""

    differences: tuple[float, ...]
    mean: Optional[float]
    low: Optional[float]
    high: Optional[float]
    confidence: float

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def verdict(self) -> str:
        """'yes' (interval above 0), 'no' (below 0) or 'inconclusive' (contains 0, or < 2 pairs)."""
        if self.low is None or self.high is None:
            return "inconclusive"
        if self.low > 0:
            return "yes"
        if self.high < 0:
            return "no"
        return "inconclusive"

    def describe(self, scale: float = 100.0, unit: str = " points") -> str:
        """E.g. '+0.35 points (95 % CI −1.20 to +1.90, 3 seeds)' or '… (1 seed: no interval)'."""
        if self.mean is None:
            return "no paired runs"
        text = f"{scale * self.mean:+.2f}{unit}"
        if self.low is None:
            return f"{text} (1 seed: no spread, no interval)"
        return (f"{text} ({100 * self.confidence:g} % CI {scale * self.low:+.2f} to {scale * self.high:+.2f}, "
                f"{self.n} seeds)")

    def to_dict(self) -> dict:
        return {"differences": list(self.differences), "mean": self.mean, "ci_low": self.low, "ci_high": self.high,
                "confidence": self.confidence, "n": self.n, "verdict": self.verdict}


def paired_comparison(x: Sequence[Optional[float]], y: Sequence[Optional[float]],
                      confidence: float = 0.95) -> PairedComparison:
    """Compare ``x`` and ``y`` pairwise (index = seed); pairs with a missing side are left out."""
    if len(x) != len(y):
        raise ValueError(f"x, y: expected paired sequences of one length, got {len(x)} and {len(y)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence!r}")
    diffs = tuple(float(a) - float(b) for a, b in zip(x, y) if a is not None and b is not None)
    return difference_interval(diffs, confidence)


def difference_interval(differences: Sequence[float], confidence: float = 0.95) -> PairedComparison:
    """Mean and two-sided Student-t interval of already-paired differences."""
    diffs = tuple(float(d) for d in differences)
    if any(not math.isfinite(d) for d in diffs):
        raise ValueError(f"differences: expected finite numbers, got {diffs!r}")
    if not diffs:
        return PairedComparison(diffs, None, None, None, confidence)
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedComparison(diffs, mean, None, None, confidence)
    half = student_t_quantile(0.5 + confidence / 2.0, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedComparison(diffs, mean, mean - half, mean + half, confidence)


def mean_spread(values: Sequence[Optional[float]], scale: float = 100.0, digits: int = 2) -> str:
    """'m ± sd' over seeds, or just 'm' for one seed (one run shows no spread), '—' for none."""
    present = [v for v in values if v is not None]
    if not present:
        return "—"
    mean = statistics.fmean(present)
    if len(present) == 1:
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * statistics.stdev(present):.{digits}f}"


def at_chance(accuracy: float, num_classes: int, samples: int, z: float = 3.0) -> bool:
    """True when ``accuracy`` on ``samples`` test samples is within z binomial standard errors
    of guessing (1 / num_classes): such a model has learned nothing to compare against."""
    chance = 1.0 / num_classes
    return accuracy <= chance + z * math.sqrt(chance * (1.0 - chance) / max(samples, 1))
