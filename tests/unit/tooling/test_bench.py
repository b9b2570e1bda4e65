"""The benchmark harness's pure parts (bench/stats.py, bench/table.py): statistics and table rendering.
The bench itself runs on the lab (scripts/bench), never in the test suite."""

from __future__ import annotations

import math

import pytest

from bench.stats import Summary, active_span, jain, max_window_rate, mean_rate, paired_ratios, percentile
from bench.table import Row, Target, fmt, render_markdown, verdicts


def test_summary_median_and_spread() -> None:
    s = Summary.of([3.0, 1.0, 2.0, 10.0])
    assert s == Summary(n=4, median=2.5, low=1.0, high=10.0)
    assert s.spread_pct == pytest.approx(360.0)
    assert Summary.of([]) is None
    assert Summary.of([float("nan")]) is None
    assert Summary.of([float("nan"), 4.0]) == Summary(1, 4.0, 4.0, 4.0)


def test_paired_ratios_skip_missing_and_zero_baselines() -> None:
    assert paired_ratios([2.0, 3.0, 4.0], [1.0, 0.0, 2.0]) == [2.0, 2.0]
    assert paired_ratios([2.0], [1.0, 5.0]) == [2.0]
    assert paired_ratios([math.nan], [1.0]) == []


@pytest.mark.parametrize(
    ("pct", "expected"), [(0, 1.0), (50, 50.5), (99, 99.01), (100, 100.0)]
)  # fmt: skip
def test_percentile_interpolates_like_numpy(pct: float, expected: float) -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert percentile(values, pct) == pytest.approx(expected)


def test_percentile_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_mean_rate_and_windows() -> None:
    # 10 units/s for 10 s, then a burst of 100 in one second.
    samples = [(float(t), 10.0 * t) for t in range(11)] + [(11.0, 200.0)]
    assert mean_rate(samples[:11]) == pytest.approx(10.0)
    assert mean_rate(samples[:1]) is None
    assert max_window_rate(samples[:11], 5.0) == pytest.approx(10.0)
    assert max_window_rate(samples, 5.0) == pytest.approx((200.0 - 60.0) / 5.0)
    assert max_window_rate(samples[:3], 5.0) is None


def test_active_span_drops_flat_ends() -> None:
    samples = [(0.0, 0.0), (1.0, 0.0), (2.0, 5.0), (3.0, 10.0), (4.0, 10.0), (5.0, 10.0)]
    assert active_span(samples) == [(1.0, 0.0), (2.0, 5.0), (3.0, 10.0)]
    assert active_span([(0.0, 1.0), (1.0, 1.0)]) == []
    assert active_span([(0.0, 1.0)]) == [(0.0, 1.0)]


def test_targets_on_ratio_or_value() -> None:
    assert Target(high=1.1).text == "ratio <= 1.10"
    assert Target(0.9, 1.1, on="value").text == "value 0.9-1.10"
    assert Target(low=0.9).met(0.95) and not Target(low=0.9).met(0.85)
    row = Row(
        "1", "t", "agent", "time", "s", [11.0, 12.0, 13.0], baseline="virsh", baseline_values=[10, 10, 10]
    )
    row.target = Target(high=1.10)
    assert row.ratio == Summary(3, 1.2, 1.1, 1.3)
    assert row.met is False
    row.target = Target(high=13.0, on="value")
    assert row.met is True
    assert Row("1", "t", "x", "m", "s").met is None


def test_fmt_three_significant_figures() -> None:
    assert [fmt(x) for x in (1234.5, 12.345, 1.2345, 0.012345, 0.0)] == [
        "1234",
        "12.3",
        "1.23",
        "0.0123",
        "0",
    ]
    assert fmt(float("inf")) == "inf"


def test_markdown_table_groups_cases_and_numbers_notes() -> None:
    rows = [
        Row("1", "same-host", "agent", "time", "s", [4.0, 5.0], baseline="virsh", baseline_values=[4.0, 4.0],
            target=Target(high=1.10), note="phases"),
        Row("1", "same-host", "virsh", "time", "s", [4.0, 4.0]),
        Row("3", "transfer", "transfer | service", "rate", "MiB/s", not_measured="not merged"),
    ]  # fmt: skip
    text = render_markdown(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| Case | Subject | Metric | Median |")
    assert lines[2] == (
        "| 1. same-host | agent | time | 4.50 s | 4.00-5.00 | 2 | virsh | 1.12 (1.00-1.25) | ratio <= 1.10 "
        "| **no** [1] |"
    )
    assert lines[3].startswith("|  | virsh | time | 4.00 s | 4.00-4.00 | 2 |")
    assert "| 3. transfer | transfer \\| service | rate | not measured: not merged |" in lines[4]
    assert lines[-1] == "[1] phases  "
    assert verdicts(rows) == ["case 1 agent time: 1.12 (target ratio <= 1.10): NOT met"]


def test_row_json_carries_figures_and_verdict() -> None:
    row = Row("2", "cap", "agent", "rate / cap", "x", [0.95, 1.0, 1.05], target=Target(0.9, 1.1, on="value"))
    doc = row.to_json()
    assert doc["median"] == 1.0 and doc["min"] == 0.95 and doc["n"] == 3
    assert doc["met"] is True and doc["target"] == "value 0.9-1.10"
    assert doc["ratios"] == [] and doc["ratioMedian"] is None


def test_jain_index_is_one_for_equal_shares_and_one_over_n_for_a_hog() -> None:
    assert jain([10.0, 10.0, 10.0, 10.0]) == pytest.approx(1.0)
    assert jain([40.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain([20.0, 10.0]) == pytest.approx(0.9)
    assert jain([]) is None and jain([0.0, 0.0]) is None


def test_active_span_starts_past_a_floor() -> None:
    """A file's metadata written before its data does not start the span."""
    samples = [(0.0, 0.0), (1.0, 0.2), (2.0, 0.2), (3.0, 5.0), (4.0, 10.0), (5.0, 10.0)]
    assert active_span(samples) == [(0.0, 0.0), (1.0, 0.2), (2.0, 0.2), (3.0, 5.0), (4.0, 10.0)]
    assert active_span(samples, floor=1.0) == [(2.0, 0.2), (3.0, 5.0), (4.0, 10.0)]
