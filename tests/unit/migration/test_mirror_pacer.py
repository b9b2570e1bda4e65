"""The shared mirror pacer (agent.migration.mirrors.pacer): real bytes from job figures, the two budget rules,
the speeds worth setting, the budget meter and the figures in the task's details."""

from __future__ import annotations

import logging
from typing import Any

from agent.migration.mirrors.hotdisk import BudgetMeter, DiskWatch, Mode
from agent.migration.mirrors.pacer import (
    BY_REMAINING,
    EQUAL_SHARES,
    JobFigures,
    MirrorPacer,
    PacedMirror,
    judge_budget,
)
from agent.migration.mirrors.speeds import (
    POSITIONAL_SLACK,
    SPEED_SLACK,
    AllocationIndex,
    MirrorSample,
    SteeringClock,
)

MiB = 1024 * 1024
GiB = 1024 * MiB


class Ctx:
    """The slice of TaskContext the pacer uses: the budget, progress, notes and a log."""

    def __init__(self, bandwidth: int | None) -> None:
        self.bandwidth = bandwidth
        self.host_share: int | None = None
        self.progressed: dict[str, tuple[int, int]] = {}
        self.notes: dict[str, Any] = {}
        self.log = logging.LoggerAdapter(logging.getLogger("test"), {})

    def progress(self, item: str, done: int, total: int) -> None:
        self.progressed[item] = (done, total)

    def note(self, key: str, value: Any) -> None:
        self.notes[key] = value


def mirror(target: str, data: int, *, mode: Mode = Mode.BACKGROUND, size: int = GiB) -> PacedMirror:
    """A thin disk of ``size`` whose first ``data`` bytes are allocated."""
    return PacedMirror(target, AllocationIndex([(0, data)]), size, watch=DiskWatch(target, mode=mode))


def pacer(ctx: Ctx, mirrors: dict[str, PacedMirror], rule: Any = EQUAL_SHARES) -> MirrorPacer:
    return MirrorPacer(ctx, rule, SteeringClock(0.25, first_s=0.25, margin=1.0), mirrors, BudgetMeter())  # type: ignore[arg-type]


def test_a_full_copy_counts_the_data_below_its_position_and_charges_it() -> None:
    ctx = Ctx(40 * MiB)
    mirrors = {"vda": mirror("vda", 200 * MiB)}
    p = pacer(ctx, mirrors)
    p.start(100.0)
    p.observe(100.0, {"vda": JobFigures(0, GiB, False)}, {"vda": 0})
    samples = p.observe(101.0, {"vda": JobFigures(100 * MiB, GiB, False)}, {"vda": 0})
    assert samples["vda"].positional
    assert ctx.progressed["disk:vda"] == (100 * MiB, 200 * MiB)
    assert p.meter.bytes == 100 * MiB
    # Past the data, crossing holes: no more real bytes.
    p.observe(102.0, {"vda": JobFigures(600 * MiB, GiB, False)}, {"vda": 0})
    assert ctx.progressed["disk:vda"] == (200 * MiB, 200 * MiB)
    assert p.meter.bytes == 200 * MiB


def test_ready_completes_progress_but_the_meter_counts_what_the_background_moved() -> None:
    ctx = Ctx(None)
    mirrors = {"vda": mirror("vda", 200 * MiB)}
    p = pacer(ctx, mirrors)
    p.observe(1.0, {"vda": JobFigures(150 * MiB, GiB, True)}, {"vda": 0})
    assert mirrors["vda"].ready
    assert ctx.progressed["disk:vda"] == (200 * MiB, 200 * MiB)
    assert p.meter.bytes == 150 * MiB


def test_after_a_restart_what_was_copied_before_is_not_charged() -> None:
    ctx = Ctx(None)
    mirrors = {"vda": mirror("vda", 200 * MiB)}
    mirrors["vda"].copied = -1  # picked up after an agent restart
    p = pacer(ctx, mirrors)
    p.observe(1.0, {"vda": JobFigures(150 * MiB, GiB, False)}, {"vda": 0})
    assert p.meter.bytes == 0
    p.observe(2.0, {"vda": JobFigures(160 * MiB, GiB, False)}, {"vda": 0})
    assert p.meter.bytes == 10 * MiB


def test_write_blocking_progress_leaves_the_guest_writes_out_and_charges_them_apart() -> None:
    ctx = Ctx(None)
    mirrors = {"vda": mirror("vda", 64 * MiB, mode=Mode.WRITE_BLOCKING, size=64 * MiB)}
    mirrors["vda"].written_at_start = mirrors["vda"].written = 1000
    p = pacer(ctx, mirrors)
    # QEMU counts the guest's 8 MiB of synchronous copies as progress: cur and end grow by them.
    samples = p.observe(1.0, {"vda": JobFigures(40 * MiB, 72 * MiB, False)}, {"vda": 1000 + 8 * MiB})
    assert (samples["vda"].cur, samples["vda"].end) == (32 * MiB, 64 * MiB)
    assert p.meter.bytes == 32 * MiB + 8 * MiB


def test_without_the_guest_writes_a_disk_is_not_counted_that_tick() -> None:
    ctx = Ctx(None)
    mirrors = {"vda": mirror("vda", 200 * MiB)}
    p = pacer(ctx, mirrors)
    p.observe(1.0, {"vda": JobFigures(100 * MiB, GiB, False)}, {})
    assert ctx.progressed["disk:vda"] == (100 * MiB, 200 * MiB)
    assert p.meter.bytes == 0


def test_bytes_moved_outside_the_disk_phase_do_not_count() -> None:
    ctx = Ctx(None)
    mirrors = {"vda": mirror("vda", 200 * MiB)}
    p = pacer(ctx, mirrors)
    p.counting = False
    p.observe(1.0, {"vda": JobFigures(100 * MiB, GiB, False)}, {"vda": 0})
    assert p.meter.bytes == 0


def test_equal_shares_same_host_split_the_budget_among_the_mirrors_still_copying() -> None:
    ctx = Ctx(40 * MiB)
    mirrors = {"vda": mirror("vda", 300 * MiB), "vdb": mirror("vdb", 100 * MiB)}
    p = pacer(ctx, mirrors, EQUAL_SHARES)
    p.observe(1.0, {t: JobFigures(0, GiB, False) for t in mirrors}, {t: 0 for t in mirrors})
    assert p.shares(mirrors) == {"vda": 20 * MiB, "vdb": 20 * MiB}


def test_by_remaining_across_hosts_splits_in_proportion_to_what_is_left() -> None:
    ctx = Ctx(40 * MiB)
    mirrors = {"vda": mirror("vda", 300 * MiB), "vdb": mirror("vdb", 100 * MiB)}
    p = pacer(ctx, mirrors, BY_REMAINING)
    # Shallow mirrors: cur and end count real bytes.
    p.observe(1.0, {"vda": JobFigures(0, 300 * MiB, False), "vdb": JobFigures(0, 100 * MiB, False)}, {})
    shares = p.shares(["vda", "vdb"])
    assert shares["vda"] is not None and shares["vdb"] is not None
    assert shares["vda"] > 2 * shares["vdb"]
    assert shares["vda"] + shares["vdb"] <= 40 * MiB


def test_by_remaining_charges_write_blocking_guest_writes_first() -> None:
    ctx = Ctx(40 * MiB)
    mirrors = {"vda": mirror("vda", 100 * MiB, mode=Mode.WRITE_BLOCKING)}
    watch = mirrors["vda"].watch
    assert watch is not None
    watch.observe(0.0, 0, 100 * MiB)
    watch.observe(1.0, 20 * MiB, 100 * MiB)  # the guest writes 20 MiB/s
    p = pacer(ctx, mirrors, BY_REMAINING)
    p.observe(2.0, {"vda": JobFigures(0, 100 * MiB, False)}, {"vda": 40 * MiB})
    share = p.shares(["vda"])["vda"]
    assert share is not None and 19 * MiB <= share <= 20 * MiB


def _shallow(p: MirrorPacer, at: float, done: dict[str, int], ready: frozenset[str] = frozenset()) -> Any:
    """One tick of shallow mirrors (cur and end in real bytes) with ``done`` of each moved."""
    figures = {t: JobFigures(done[t], m.index.total, t in ready) for t, m in p.mirrors.items()}
    return p.observe(at, figures, {})


def test_by_remaining_speeds_follow_a_steady_split_that_one_burst_does_not_move() -> None:
    """A 16 MiB burst of one mirror moves the shares by far more than SPEED_SLACK; the speeds keep the split
    made under the budget, so the other mirror, asleep in QEMU, is not raised (which would wake it to burst
    early: issue 27)."""
    ctx = Ctx(4 * MiB)
    mirrors = {"vda": mirror("vda", 20 * MiB), "vdb": mirror("vdb", 20 * MiB)}
    p = pacer(ctx, mirrors, BY_REMAINING)
    samples = _shallow(p, 1.0, {"vda": 0, "vdb": 0})
    split = p.speed_shares(samples)
    assert split["vda"] == split["vdb"] and sum(s or 0 for s in split.values()) <= 4 * MiB
    for target, sample in samples.items():
        mirrors[target].speed = p.next_speed(target, sample, split[target])
    samples = _shallow(p, 9.0, {"vda": 16 * MiB, "vdb": 0})  # vda's burst
    fresh = p.shares(samples)
    assert fresh["vdb"] is not None and split["vdb"] is not None
    assert fresh["vdb"] > (1 + SPEED_SLACK) * split["vdb"]  # a re-split would raise vdb
    assert p.speed_shares(samples) == split
    assert all(p.next_speed(t, s, split[t]) is None for t, s in samples.items())
    # The speeds a retune sets under the same budget are the same split's too.
    assert set(p.speeds(4 * MiB).values()) == set(split.values())


def test_by_remaining_a_new_budget_a_ready_mirror_or_a_doubled_share_make_a_new_split() -> None:
    ctx = Ctx(4 * MiB)
    mirrors = {"vda": mirror("vda", 48 * MiB), "vdb": mirror("vdb", 48 * MiB)}
    p = pacer(ctx, mirrors, BY_REMAINING)
    samples = _shallow(p, 1.0, {"vda": 0, "vdb": 0})
    first = p.speed_shares(samples)
    lowered = p.speeds(2 * MiB)  # a retune: the split is made again under the new budget
    assert sum(lowered.values()) <= 2 * MiB and lowered["vda"] < (first["vda"] or 0)
    ctx.bandwidth = 2 * MiB
    assert p.speed_shares(samples) == lowered
    # vda READY: the mirror still copying takes the whole budget at once.
    samples = _shallow(p, 2.0, {"vda": 48 * MiB, "vdb": 16 * MiB}, ready=frozenset({"vda"}))
    assert p.speed_shares(samples)["vdb"] == 2 * MiB
    # A share that doubled (vda's disk written again, its remaining bytes grown) is split again.
    mirrors = {"vda": mirror("vda", 48 * MiB), "vdb": mirror("vdb", 48 * MiB)}
    p = pacer(Ctx(4 * MiB), mirrors, BY_REMAINING)
    kept = p.speed_shares(_shallow(p, 1.0, {"vda": 46 * MiB, "vdb": 0}))
    samples = _shallow(p, 2.0, {"vda": 0, "vdb": 0})
    assert p.speed_shares(samples) != kept and p.speed_shares(samples) == p.shares(samples)


def test_equal_shares_keep_no_split_same_host() -> None:
    ctx = Ctx(40 * MiB)
    mirrors = {"vda": mirror("vda", 300 * MiB), "vdb": mirror("vdb", 100 * MiB)}
    p = pacer(ctx, mirrors, EQUAL_SHARES)
    samples = p.observe(1.0, {t: JobFigures(0, GiB, False) for t in mirrors}, {t: 0 for t in mirrors})
    assert p.speed_shares(samples) == p.shares(samples)
    ctx.bandwidth = 20 * MiB
    assert p.speed_shares(samples) == {"vda": 10 * MiB, "vdb": 10 * MiB}


def test_the_rules_keep_their_slack() -> None:
    index = AllocationIndex([(0, MiB)])
    full = MirrorSample(0, GiB, GiB, index, False)
    shallow = MirrorSample(0, MiB, GiB, index, False)
    assert EQUAL_SHARES.slack(shallow) == POSITIONAL_SLACK
    assert BY_REMAINING.slack(full) == POSITIONAL_SLACK
    assert BY_REMAINING.slack(shallow) == SPEED_SLACK


def test_a_speed_close_to_the_one_in_effect_is_not_set_again() -> None:
    ctx = Ctx(40 * MiB)
    mirrors = {"vda": mirror("vda", 300 * MiB)}
    p = pacer(ctx, mirrors, BY_REMAINING)
    samples = p.observe(1.0, {"vda": JobFigures(0, 300 * MiB, False)}, {})
    assert p.next_speed("vda", samples["vda"], 40 * MiB) == 40 * MiB  # none in effect yet
    mirrors["vda"].speed = 38 * MiB
    assert p.next_speed("vda", samples["vda"], 40 * MiB) is None
    mirrors["vda"].speed = 20 * MiB
    assert p.next_speed("vda", samples["vda"], 40 * MiB) == 40 * MiB


def test_a_losing_background_mirror_is_named_and_a_ready_one_never() -> None:
    ctx = Ctx(20 * MiB)
    mirrors = {
        "vda": mirror("vda", 100 * MiB, size=100 * MiB),
        "vdb": mirror("vdb", 100 * MiB, size=100 * MiB),
    }
    p = pacer(ctx, mirrors)
    written = 0
    for second in range(12):  # remaining bytes stuck at 50 MiB while the guest writes 20 MiB/s
        written += 20 * MiB
        p.observe(
            float(second),
            {"vda": JobFigures(50 * MiB, 100 * MiB, False), "vdb": JobFigures(100 * MiB, 100 * MiB, True)},
            {"vda": written, "vdb": written},
        )
    shares = p.shares(mirrors)
    assert p.losing(shares, 11.0) == ["vda"]


def test_figures_and_copy_rates_each_second_then_the_budget_judgement() -> None:
    ctx = Ctx(10 * MiB)
    mirrors = {"vda": mirror("vda", 200 * MiB)}
    p = pacer(ctx, mirrors)
    p.start(10.0)
    p.observe(10.0, {"vda": JobFigures(0, GiB, False)}, {"vda": 0})
    p.observe(11.0, {"vda": JobFigures(30 * MiB, GiB, False)}, {"vda": 0})
    p.figures(11.0, {"vda": 10 * MiB})
    assert ctx.notes["disks"]["vda"]["shareBytesPerSecond"] == 10 * MiB
    assert ctx.notes["copyRates"][-1]["backgroundBytesPerSecond"] == 30 * MiB
    assert ctx.notes["copyRates"][-1]["capBytesPerSecond"] == 10 * MiB
    p.figures(11.5, {"vda": 10 * MiB})  # within the second: nothing new
    assert len(ctx.notes["copyRates"]) == 1
    p.observe(14.0, {"vda": JobFigures(100 * MiB, GiB, False)}, {"vda": 0})
    judge_budget(ctx, p.meter, p.watches, phase="disks")  # type: ignore[arg-type]
    assert ctx.notes["budget"]["realBytes"] == 100 * MiB
    assert ctx.notes["budget"]["phase"] == "disks"
    assert "overBudget" in ctx.notes  # 100 MiB in 4 s against 10 MiB/s, one 16 MiB buffer aside
