"""Statistics of repeated measurements (pure; unit tested): medians, spread, paired ratios, percentiles,
and the rate of a byte counter over time."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Median and spread of repeated measurements of one quantity."""

    n: int
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary | None:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return None
        return cls(len(finite), statistics.median(finite), min(finite), max(finite))

    @property
    def spread_pct(self) -> float:
        """(high - low) / median in percent: how much the repetitions disagree."""
        if self.median == 0:
            return 0.0 if self.high == self.low else math.inf
        return 100.0 * (self.high - self.low) / abs(self.median)


def paired_ratios(values: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """value_i / baseline_i for each repetition i run side by side (same conditions, same noise)."""
    return [v / b for v, b in zip(values, baseline, strict=False) if b > 0 and math.isfinite(v)]


def percentile(values: Sequence[float], pct: float) -> float:
    """The pct-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile {pct} outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def mean_rate(samples: Sequence[tuple[float, float]]) -> float | None:
    """Rate of a counter between its first and last sample ((time s, value) pairs); None if too short."""
    if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
        return None
    (t0, v0), (t1, v1) = samples[0], samples[-1]
    return (v1 - v0) / (t1 - t0)


def max_window_rate(samples: Sequence[tuple[float, float]], window_s: float) -> float | None:
    """Highest rate of a counter over any stretch of at least ``window_s`` seconds between two samples
    (each start sample paired with the first sample ``window_s`` or more after it); None if the samples
    span less than one window."""
    best: float | None = None
    j = 0
    for i, (ta, va) in enumerate(samples):
        j = max(j, i + 1)
        while j < len(samples) and samples[j][0] - ta < window_s:
            j += 1
        if j >= len(samples):
            break
        tb, vb = samples[j]
        rate = (vb - va) / (tb - ta)
        best = rate if best is None else max(best, rate)
    return best


def active_span(samples: Sequence[tuple[float, float]], floor: float = 0.0) -> list[tuple[float, float]]:
    """The samples from the last one before the counter first moves (by more than ``floor``: a file's
    metadata is not its data) to the first one at its final value: the stretch in which the counter is
    actually advancing (leading and trailing flat parts removed)."""
    if len(samples) < 2:
        return list(samples)
    first_value, last_value = samples[0][1], samples[-1][1]
    start = next((i for i, (_t, v) in enumerate(samples) if abs(v - first_value) > floor), len(samples)) - 1
    end = next(i for i, (_t, v) in enumerate(samples) if v == last_value)
    start = max(start, 0)
    return list(samples[start : end + 1]) if end > start else []


def jain(shares: Sequence[float]) -> float | None:
    """Jain's fairness index of ``shares``: 1.0 when all are equal, 1/n when one takes everything; None
    when there is nothing to share."""
    if not shares or not any(shares):
        return None
    return sum(shares) ** 2 / (len(shares) * sum(s * s for s in shares))
