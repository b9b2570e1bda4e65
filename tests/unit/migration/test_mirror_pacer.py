"""The shared mirror pacer (agent.migration.pacer): real bytes from job figures, the two budget rules, the
speeds worth setting, the budget meter and the figures in the task's details."""

from __future__ import annotations

import logging
from typing import Any

from agent.migration.hotdisk import BudgetMeter, DiskWatch, Mode
from agent.migration.pacer import (
    BY_REMAINING,
    EQUAL_SHARES,
    JobFigures,
    MirrorPacer,
    PacedMirror,
    judge_budget,
)
from agent.migration.pacing import POSITIONAL_SLACK, SPEED_SLACK, AllocationIndex, MirrorSample, SteeringClock

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
