"""The real-bytes bandwidth steering: allocation index arithmetic and job speeds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.migration.mirrors.speeds import (
    HORIZON_TICKS,
    UNLIMITED_SPEED,
    AllocationIndex,
    MirrorSample,
    SteeringClock,
    job_speed,
    real_bytes_done,
    split_by_remaining,
    worth_changing,
)

MiB = 1024 * 1024


def test_index_merges_and_counts() -> None:
    index = AllocationIndex([(10, 10), (0, 5), (15, 10), (100, 1)])
    assert index.total == 5 + 15 + 1
    assert index.below(0) == 0
    assert index.below(5) == 5
    assert index.below(12) == 7
    assert index.below(1000) == 21


def test_offset_after_skips_holes() -> None:
    index = AllocationIndex([(0, MiB), (100 * MiB, MiB)])
    assert index.offset_after(0, MiB // 2) == MiB // 2
    # Half a MiB from the first extent, then the rest comes from the second one far away.
    assert index.offset_after(MiB // 2, MiB) == 100 * MiB + MiB // 2
    assert index.offset_after(0, 3 * MiB) is None


@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 500)), max_size=30),
    st.integers(0, 12_000),
    st.integers(0, 3_000),
)
def test_offset_after_inverts_below(extents: list[tuple[int, int]], offset: int, real: int) -> None:
    index = AllocationIndex(extents)
    after = index.offset_after(offset, real)
    if after is None:
        assert index.below(offset) + real > index.total
    else:
        assert after >= offset
        assert index.below(after) - index.below(offset) == real
        if after > offset:
            assert index.below(after - 1) - index.below(offset) < real


def test_thin_disk_crosses_holes_fast_and_data_at_share() -> None:
    # 1 GiB disk, 200 MiB of data at the start, then nothing.
    index = AllocationIndex([(0, 200 * MiB)])
    in_data = MirrorSample(cur=0, end=1024 * MiB, virtual_size=1024 * MiB, index=index, ready=False)
    assert job_speed(in_data, 50 * MiB, 0.5) == 50 * MiB
    past_data = MirrorSample(cur=300 * MiB, end=1024 * MiB, virtual_size=1024 * MiB, index=index, ready=False)
    assert job_speed(past_data, 50 * MiB, 0.5) == UNLIMITED_SPEED
    assert job_speed(in_data, None, 0.5) == 0


def test_closes_in_on_data_behind_a_large_hole_without_racing_into_it() -> None:
    # 512 MiB of hole, then 64 MiB of data: each tick covers half of the way to the data (plus one tick's
    # share), so even a tick that comes twice late cannot carry the job deep into the data at hole speed.
    index = AllocationIndex([(512 * MiB, 64 * MiB)])
    cur, tick, share = 0, 0.25, 10 * MiB
    for _ in range(16):
        sample = MirrorSample(cur=cur, end=1024 * MiB, virtual_size=1024 * MiB, index=index, ready=False)
        covered = int(job_speed(sample, share, tick * HORIZON_TICKS) * tick)
        assert index.below(cur + 2 * covered) - index.below(cur) <= 2 * share * tick * 2 + 1
        cur += covered
    assert cur > 500 * MiB, "it must still cross the hole quickly"


def _cross(index: AllocationIndex, share: int, latency: float, clock: SteeringClock) -> list[int]:
    """Simulate a mirror steered by speed changes that each take ``latency`` seconds to land (the old speed
    holds meanwhile). Returns the real bytes moved between two landings."""
    cur, moved = 0, []
    for _ in range(40):
        sample = MirrorSample(cur=cur, end=1024 * MiB, virtual_size=1024 * MiB, index=index, ready=False)
        speed = job_speed(sample, share, clock.horizon_s)
        new = min(cur + int(speed * latency), 1024 * MiB)
        moved.append(index.below(new) - index.below(cur))
        cur = new
        clock.landed(latency)
    return moved


def test_slow_speed_changes_do_not_carry_the_job_into_the_data_at_hole_speed() -> None:
    # 512 MiB of hole, then 192 MiB of data; every speed change lands 5 s late (libvirt's QMP passthrough
    # at its slowest): no interval may move much more than the share for its length.
    index = AllocationIndex([(512 * MiB, 192 * MiB)])
    share, tick = 16 * MiB, 0.25
    moved = _cross(index, share, 5.0, SteeringClock(tick, first_s=5.0))
    assert max(moved) <= share * 5.0 * 1.05
    assert sum(moved) == 192 * MiB, "it must still get through"
    # The same with a clock that assumes changes land at once: the first late one overshoots by far.
    naive = _cross(index, share, 5.0, SteeringClock(tick, first_s=0.0, margin=1.0, keep=0))
    assert max(naive) > 2 * share * 5.0  # all 192 MiB at once


def test_the_last_data_is_paced_too_when_less_than_a_horizon_is_left() -> None:
    # 40 MiB of data left at 16 MiB/s: 2.5 s of it, whatever the horizon; past it, at once.
    index = AllocationIndex([(512 * MiB, 192 * MiB)])
    near_end = MirrorSample(cur=664 * MiB, end=1024 * MiB, virtual_size=1024 * MiB, index=index, ready=False)
    assert job_speed(near_end, 16 * MiB, 8.0) == 16 * MiB
    small = AllocationIndex([(512 * MiB, 8 * MiB)])
    before = MirrorSample(cur=0, end=1024 * MiB, virtual_size=1024 * MiB, index=small, ready=False)
    assert job_speed(before, 16 * MiB, 8.0) == int(520 * MiB / 0.5)  # 520 MiB of disk in 8 MiB / 16 MiB/s
    past = MirrorSample(cur=600 * MiB, end=1024 * MiB, virtual_size=1024 * MiB, index=small, ready=False)
    assert job_speed(past, 16 * MiB, 8.0) == UNLIMITED_SPEED


def test_clock_plans_for_the_slowest_recent_change() -> None:
    clock = SteeringClock(0.25, first_s=5.0)
    assert clock.horizon_s == 1.5 * 5.25  # nothing timed yet: the assumed latency, a tick, the margin
    for _ in range(4):
        clock.landed(0.01)
    assert clock.horizon_s == 0.5  # changes land at once: two ticks
    clock.landed(5.0)
    assert clock.horizon_s == 1.5 * 5.25  # one slow change: plan for it while it is among the last four
    for _ in range(4):
        clock.landed(0.02)
    assert clock.horizon_s == 0.5


def test_sparse_data_speeds_up_through_gaps() -> None:
    # 1 MiB of data every 10 MiB: 50 MiB/s of real data means crossing about 500 MiB/s of disk.
    index = AllocationIndex([(i * 10 * MiB, MiB) for i in range(100)])
    sample = MirrorSample(cur=0, end=1000 * MiB, virtual_size=1000 * MiB, index=index, ready=False)
    speed = job_speed(sample, 50 * MiB, 0.5)
    assert 450 * MiB < speed < 550 * MiB


def test_real_bytes_done_counts_position_and_rewrites() -> None:
    index = AllocationIndex([(0, 100 * MiB)])
    sample = MirrorSample(cur=50 * MiB, end=1024 * MiB, virtual_size=1024 * MiB, index=index, ready=False)
    assert real_bytes_done(sample) == (50 * MiB, 100 * MiB)
    # Guest writes grew the job beyond one pass; those bytes count on both sides.
    grown = MirrorSample(cur=1030 * MiB, end=1034 * MiB, virtual_size=1024 * MiB, index=index, ready=False)
    assert real_bytes_done(grown) == (106 * MiB, 110 * MiB)
    ready = MirrorSample(cur=1034 * MiB, end=1034 * MiB, virtual_size=1024 * MiB, index=index, ready=True)
    assert real_bytes_done(ready) == (110 * MiB, 110 * MiB)


def test_split_by_remaining_finishes_together() -> None:
    shares = split_by_remaining(60 * MiB, {"vda": 300 * MiB, "vdb": 100 * MiB, "vdc": 0})
    assert sum(v or 0 for v in shares.values()) <= 60 * MiB
    # vdc (its first pass done, guest writes may follow) keeps a small share.
    assert 0 < (shares["vdc"] or 0) < 3 * MiB
    assert shares["vda"] is not None and shares["vdb"] is not None
    assert 2.5 < shares["vda"] / shares["vdb"] < 3  # about what each has left: they finish together
    # One progress report (16 MiB) apart is not worth a change of speed.
    even = split_by_remaining(48 * MiB, {"vda": 112 * MiB, "vdb": 96 * MiB})
    assert not worth_changing(24 * MiB, even["vda"] or 0) and not worth_changing(24 * MiB, even["vdb"] or 0)
    assert split_by_remaining(None, {"vda": 1}) == {"vda": None}
    assert split_by_remaining(10, {}) == {}


@given(st.dictionaries(st.sampled_from(["vda", "vdb", "vdc", "vdd"]), st.integers(0, 2**34), min_size=1))
def test_split_by_remaining_never_exceeds_the_budget(left: dict[str, int]) -> None:
    shares = split_by_remaining(50 * MiB, left)
    assert set(shares) == set(left)
    assert all(v is not None and v >= 1 for v in shares.values())
    assert sum(v or 0 for v in shares.values()) <= 50 * MiB


def test_worth_changing() -> None:
    assert worth_changing(None, 5)
    assert not worth_changing(100 * MiB, 120 * MiB)
    assert worth_changing(100 * MiB, 130 * MiB)
    assert worth_changing(0, 5 * MiB) and worth_changing(5 * MiB, 0)
    assert not worth_changing(0, 0)
