"""Progress accounting: monotonic percent, 100 only at the end, growing totals, smoothed speed and ETA."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.tasks.progress import MAX_UNFINISHED_PERCENT, ProgressSnapshot, ProgressTracker

GIB = 1024**3


def test_percent_and_bytes_across_items() -> None:
    tracker = ProgressTracker()
    tracker.update("vdb", 0, 1000, now=0.0)
    tracker.update("vda", 250, 1000, now=0.0)
    snap = tracker.snapshot()
    assert (snap.bytes_done, snap.bytes_total, snap.percent) == (250, 2000, 12.5)
    assert [item.to_json()["percent"] for item in snap.items] == [0.0, 25.0]


def test_percent_holds_when_the_memory_phase_appears_late() -> None:
    tracker = ProgressTracker()
    tracker.update("vda", 900, 1000, now=0.0)
    assert tracker.snapshot().percent == 90.0
    tracker.update("memory", 0, 1000, now=1.0)  # raw percent would drop to 45
    assert tracker.snapshot().percent == 90.0
    tracker.update("memory", 950, 1000, now=2.0)
    assert tracker.snapshot().percent == 92.5


def test_restarted_counter_neither_drops_percent_nor_counts_bytes() -> None:
    tracker = ProgressTracker()
    assert tracker.update("vda", 980, 1000, now=0.0) == 980
    assert tracker.update("vda", 100, 1000, now=1.0) == 0  # libvirt's phase restarted from zero
    assert tracker.snapshot().percent == 98.0
    assert tracker.update("vda", 300, 1000, now=2.0) == 200


def test_never_100_before_complete_then_exactly_100() -> None:
    tracker = ProgressTracker()
    tracker.update("vda", 1000, 1000, now=0.0)
    assert tracker.snapshot().percent == MAX_UNFINISHED_PERCENT
    tracker.update("vda", 5000, 1000, now=1.0)  # over-reporting is clamped
    assert tracker.snapshot().percent == MAX_UNFINISHED_PERCENT
    assert tracker.snapshot().bytes_done == 1000
    tracker.mark_complete()
    snap = tracker.snapshot()
    assert (snap.percent, snap.eta_seconds) == (100.0, 0.0)
    tracker.update("vda", 0, 1000, now=2.0)
    assert tracker.snapshot().percent == 100.0


def test_percent_floors_rather_than_rounds_up() -> None:
    tracker = ProgressTracker()
    tracker.update("vda", 9996, 10000, now=0.0)
    assert tracker.snapshot().percent == 99.9
    tracker2 = ProgressTracker()
    tracker2.update("vda", 1, 3, now=0.0)
    assert tracker2.snapshot().percent == 33.3


def test_speed_converges_to_the_steady_rate_and_gives_eta() -> None:
    tracker = ProgressTracker()
    rate = 100 * 1024 * 1024
    for second in range(0, 61):
        tracker.update("vda", rate * second, 100 * GIB, now=float(second))
    snap = tracker.snapshot()
    assert snap.bytes_per_second == pytest.approx(rate, rel=0.01)
    remaining = 100 * GIB - rate * 60
    assert snap.eta_seconds == pytest.approx(remaining / rate, rel=0.01)


def test_speed_is_smoothed_not_jumpy() -> None:
    tracker = ProgressTracker()
    for second in range(0, 31):
        tracker.update("vda", 1000 * second, 10**9, now=float(second))
    tracker.update("vda", 1000 * 30 + 1_000_000, 10**9, now=31.0)  # one burst of 1000x the rate
    speed = tracker.snapshot().bytes_per_second
    assert speed is not None
    assert 1000 < speed < 1_000_000 * 0.5


def test_no_speed_or_eta_before_enough_time() -> None:
    tracker = ProgressTracker()
    tracker.update("vda", 10, 100, now=0.0)
    tracker.update("vda", 20, 100, now=0.1)
    snap = tracker.snapshot()
    assert snap.bytes_per_second is None and snap.eta_seconds is None


def test_restore_keeps_the_floor() -> None:
    tracker = ProgressTracker()
    tracker.restore({"vda": (400, 1000), "memory": (0, 1000)}, percent=70.0)
    assert tracker.snapshot().percent == 70.0
    assert tracker.update("vda", 500, 1000, now=0.0) == 100
    assert tracker.snapshot().percent == 70.0


def test_snapshot_is_frozen_and_serialises() -> None:
    tracker = ProgressTracker()
    tracker.update("vda", 1, 2, now=0.0)
    snap = tracker.snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.percent = 1.0  # type: ignore[misc]
    assert set(snap.to_json()) == {"percent", "bytesDone", "bytesTotal", "bytesPerSecond", "etaSeconds"}
    assert isinstance(snap, ProgressSnapshot)


reports = st.lists(
    st.tuples(
        st.sampled_from(["vda", "vdb", "memory"]),
        st.integers(min_value=-10, max_value=10**12),
        st.integers(min_value=0, max_value=10**12),
        st.floats(min_value=0.0, max_value=5.0, allow_nan=False),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(reports)
def test_any_report_sequence_keeps_the_invariants(sequence: list[tuple[str, int, int, float]]) -> None:
    tracker = ProgressTracker()
    now = 0.0
    last = 0.0
    moved_total = 0
    for item, done, total, dt in sequence:
        now += dt
        moved = tracker.update(item, done, total, now)
        moved_total += moved
        snap = tracker.snapshot()
        assert moved >= 0
        assert last <= snap.percent <= MAX_UNFINISHED_PERCENT
        assert 0 <= snap.bytes_done <= snap.bytes_total
        assert snap.eta_seconds is None or snap.eta_seconds >= 0
        assert snap.bytes_per_second is None or snap.bytes_per_second >= 0
        last = snap.percent
    tracker.mark_complete()
    assert tracker.snapshot().percent == 100.0
