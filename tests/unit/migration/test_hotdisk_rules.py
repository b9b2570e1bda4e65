"""Hot-disk judgement and budget split (agent.migration.mirrors.hotdisk) and the charge past a mirror's first
pass."""

from __future__ import annotations

from agent.errors import ConvergenceFailed
from agent.migration.mirrors.hotdisk import (
    JUDGE_AFTER_S,
    MIN_BACKGROUND,
    BudgetMeter,
    DiskWatch,
    Mode,
    Trend,
    background_budget,
    cannot_converge,
    disk_shares,
    disk_verdict,
    over_budget_note,
    start_write_blocking,
)
from agent.migration.mirrors.speeds import AllocationIndex, MirrorSample, job_speed

MiB = 1024 * 1024


def _watch(write_mib_s: float, remaining: list[int], *, mode: Mode = Mode.BACKGROUND, step: float = 1.0):
    watch = DiskWatch("vda", mode=mode)
    for i, left in enumerate(remaining):
        watch.observe(i * step, int(i * step * write_mib_s * MiB), left * MiB)
    return watch


def test_write_rate_and_trend_from_samples() -> None:
    gaining = _watch(4, [100, 90, 80, 70, 60, 50])
    assert abs(gaining.write_bps - 4 * MiB) < 1
    assert gaining.trend is Trend.GAINING and gaining.losing_for(5) == 0
    losing = _watch(20, [60, 61, 59, 60, 62, 60, 61, 60, 60, 61, 60])
    assert losing.trend is Trend.LOSING
    assert losing.losing_for(10) >= JUDGE_AFTER_S
    assert _watch(20, [60, 60]).trend is Trend.UNKNOWN  # not watched long enough


def test_a_losing_background_mirror_cannot_converge_only_when_the_guest_writes_near_its_share() -> None:
    losing = _watch(20, [60] * 11)
    assert cannot_converge(losing, 8 * MiB, 10)
    assert not cannot_converge(losing, 40 * MiB, 10)  # writes well under the share: keep watching
    assert not cannot_converge(losing, None, 10)  # uncapped: nothing to judge
    blocking = _watch(20, [60] * 11, mode=Mode.WRITE_BLOCKING)
    assert not cannot_converge(blocking, 8 * MiB, 10)


def test_auto_starts_write_blocking_from_the_measured_rate() -> None:
    assert start_write_blocking(20 * MiB, 8 * MiB)
    assert start_write_blocking(4 * MiB, 8 * MiB)
    assert not start_write_blocking(1 * MiB, 8 * MiB)
    assert not start_write_blocking(100 * MiB, None)


def test_guest_writes_are_charged_before_the_background_copy() -> None:
    quiet = _watch(0, [100, 90, 80, 70, 60])
    hot = _watch(6, [100, 90, 80, 70, 60], mode=Mode.WRITE_BLOCKING)
    shares = disk_shares(20 * MiB, {"vda": hot, "vdb": quiet}, set())
    assert shares == {"vda": 7 * MiB, "vdb": 7 * MiB}
    # A guest leaving the copies less than MIN_BACKGROUND of the budget takes the task over its cap anyway:
    # the copies then share the whole budget, the shortest time over it.
    hotter = _watch(50, [100, 90, 80, 70, 60], mode=Mode.WRITE_BLOCKING)
    assert disk_shares(20 * MiB, {"vda": hotter, "vdb": quiet}, set()) == {"vda": 10 * MiB, "vdb": 10 * MiB}
    edge = _watch(15, [100, 90, 80, 70, 60], mode=Mode.WRITE_BLOCKING)  # leaves exactly the fraction
    assert int(MIN_BACKGROUND * 20 * MiB) == 5 * MiB
    assert disk_shares(20 * MiB, {"vda": edge, "vdb": quiet}, set()) == {
        "vda": 5 * MiB // 2,
        "vdb": 5 * MiB // 2,
    }
    assert background_budget(20 * MiB, 15.5 * MiB) == 20 * MiB
    # A READY background mirror keeps up with its guest's writes; the rest goes to the one still copying.
    ready = _watch(4, [0, 0, 0, 0, 0])
    shares = disk_shares(20 * MiB, {"vda": ready, "vdb": quiet}, {"vda"})
    assert shares["vda"] == 5 * MiB and shares["vdb"] == 16 * MiB
    assert disk_shares(None, {"vda": hot}, set()) == {"vda": None}


def test_the_precopy_verdict_names_the_disk_and_the_figures() -> None:
    err = disk_verdict(_watch(20, [60] * 11), 8 * MiB, 8 * MiB, 1)
    assert isinstance(err, ConvergenceFailed) and err.code == "AGENT.CONVERGENCE_FAILED"
    assert "vda" in err.description and "20.0 MiB/s" in err.description and "8.0 MiB/s" in err.description
    assert err.extra["disk"] == "vda" and err.extra["budgetNeededBytesPerSecond"] == 25 * MiB
    assert err.details and "strategy auto" in err.details


def test_the_budget_meter_says_when_the_task_went_over_its_cap() -> None:
    meter = BudgetMeter()
    for second in range(11):
        meter.add(float(second), 0 if second == 0 else 22 * MiB)
    assert abs(meter.rate - 22 * MiB) < 1
    assert meter.over(8 * MiB) and not meter.over(20 * MiB)
    note = over_budget_note(meter, 8 * MiB, {"vda": _watch(20, [60] * 5, mode=Mode.WRITE_BLOCKING)})
    assert note["writeBlocking"] == ["vda"] and note["guestWriteBytesPerSecond"]["vda"] == 20 * MiB
    assert "2.75 x the cap" in note["message"]
    # A quiet move of a few seconds: QEMU's first buffer per mirror goes at once, not held against the cap.
    short = BudgetMeter()
    short.start(0.0)
    short.add(1.6, 40 * MiB)
    assert not short.over(6 * MiB, mirrors=2) and short.over(6 * MiB, mirrors=1)


def test_past_the_first_pass_a_full_mirror_is_charged_its_share() -> None:
    index = AllocationIndex([(0, 100 * MiB)])
    trailing_holes = MirrorSample(500 * MiB, 1024 * MiB, 1024 * MiB, index, ready=False)
    assert job_speed(trailing_holes, 8 * MiB, 0.5) > 1000 * MiB  # holes to the end: at once
    recopying = MirrorSample(1100 * MiB, 1200 * MiB, 1024 * MiB, index, ready=False)
    assert job_speed(recopying, 8 * MiB, 0.5) == 8 * MiB  # the guest's rewrites: real bytes
