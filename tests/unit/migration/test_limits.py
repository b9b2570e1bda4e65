"""The rules of ``agent.migration.limits`` (one test each, numbered as in its docstring), and the engines'
parts of them: the pacer's speeds under a budget, the cross-host knobs (uncapped is libvirt's largest
value, post-copy's own parameter, the controller's targets)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from service_fakes import FakeStreams

from agent.errors import LimitsNotApplied
from agent.migration import convergence
from agent.migration.crosshost.streams import MigrationStreams
from agent.migration.limits import KEEP, UNCAPPED_MIB, Effective, LiveLimits, Targets
from agent.migration.mirrors.hotdisk import BudgetMeter, DiskWatch
from agent.migration.mirrors.pacer import BY_REMAINING, EQUAL_SHARES, MirrorPacer, PacedMirror
from agent.migration.mirrors.speeds import AllocationIndex, MirrorSample, SteeringClock
from agent.migration.request import MigrationRequest

MiB = 1024 * 1024
GiB = 1024 * MiB
STORAGE = "5c8e2a1f0b3d4e6f8a9b1c2d3e4f5a6b"


class Ctx:
    def __init__(self, bandwidth: int | None = 2 * MiB, *, strategy: str = "auto", postcopy: bool = False):
        self.vm_uuid = "vm"
        self.bandwidth = bandwidth
        self.host_share: int | None = None
        self.downtime_ms = 300
        self.deadline = None
        self.request = MigrationRequest.model_validate(
            {
                "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": STORAGE, "strategy": strategy},
                "allowPostCopy": postcopy,
            }
        )
        self.log = logging.LoggerAdapter(logging.getLogger("test.limits"), {})
        self.notes: dict[str, Any] = {}
        self.noted = 0

    def note(self, key: str, value: Any) -> None:
        self.notes[key] = value
        self.noted += 1

    def progress(self, item: str, done: int, total: int) -> None:
        pass


def limits_of(ctx: Ctx, streams: FakeStreams) -> LiveLimits:
    return LiveLimits(ctx, streams)  # type: ignore[arg-type]


# -- rule 1 ----------------------------------------------------------------------------------------------


async def test_rule1_the_budget_is_the_smallest_of_the_cap_and_the_host_share() -> None:
    streams = FakeStreams()
    limits = limits_of(Ctx(bandwidth=20 * MiB), streams)
    assert limits.budget == 20 * MiB
    await limits.retune(host_share=8 * MiB)
    assert limits.budget == 8 * MiB and streams.asked[-1] == (8 * MiB, 300)
    await limits.retune(cap=4 * MiB)
    assert limits.budget == 4 * MiB
    await limits.retune(cap=None, host_share=None)
    assert limits.budget is None
    await limits.retune(cap=0)  # 0 is no cap too, never a speed of 0
    assert limits.cap is None and limits.budget is None


# -- rule 2 ----------------------------------------------------------------------------------------------


async def test_rule2_a_retune_applies_what_the_engine_plans_under_the_new_budget_to_every_stream() -> None:
    streams = FakeStreams()
    limits = limits_of(Ctx(bandwidth=2 * MiB), streams)
    view = await limits.retune(cap=None, downtime_ms=500)
    assert streams.asked == [(None, 500)]
    assert sorted(streams.calls, key=str) == sorted(
        [("vda", 0), ("vdb", 0), ("stream", None), ("downtime", 500)], key=str
    )
    effective = view["effective"]
    assert effective["disks"] == {"vda": {"bytesPerSecond": 0}, "vdb": {"bytesPerSecond": 0}}
    assert effective["migrationBytesPerSecond"] is None and effective["downtimeLimitMs"] == 500
    assert view["budgetBytesPerSecond"] is None and view["asked"]["downTimeMs"] == 500


def _pacer(rule: Any, budget: int | None) -> MirrorPacer:
    ctx = Ctx(bandwidth=budget)
    mirrors = {
        t: PacedMirror(t, AllocationIndex([(0, size)]), GiB, watch=DiskWatch(t))
        for t, size in (("vda", 300 * MiB), ("vdb", 100 * MiB))
    }
    pacer = MirrorPacer(ctx, rule, SteeringClock(0.25, 0.25), mirrors, BudgetMeter())  # type: ignore[arg-type]
    pacer.last_samples = {t: MirrorSample(0, m.index.total, GiB, m.index, False) for t, m in mirrors.items()}
    return pacer


@pytest.mark.parametrize("rule", [EQUAL_SHARES, BY_REMAINING])
def test_rule2_uncapped_every_mirror_runs_without_a_limit_and_capped_within_the_budget(rule: Any) -> None:
    pacer = _pacer(rule, None)
    assert pacer.speeds(None) == {"vda": 0, "vdb": 0}
    speeds = pacer.speeds(4 * MiB)
    assert set(speeds) == {"vda", "vdb"} and all(s > 0 for s in speeds.values())
    assert sum(speeds.values()) <= 4 * MiB


class FakeHost:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def set_migration_speed(self, vm: str, mib: int, *, postcopy: bool = False) -> None:
        self.calls.append(("speed", mib, postcopy))

    async def qmp(self, vm: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.calls.append((command, arguments))
        if command == "query-migrate-parameters":
            return {"max-bandwidth": UNCAPPED_MIB * MiB, "downtime-limit": 70, "max-postcopy-bandwidth": 0}
        return [{"device": "drive-virtio-disk0", "speed": 0, "offset": 0, "len": 1}]


def _migration_streams(
    ctx: Ctx, host: FakeHost
) -> tuple[MigrationStreams, convergence.ConvergenceController]:
    policy = convergence.ConvergencePolicy.from_request(ctx.request, time_left_s=None)
    controller = convergence.ConvergenceController(policy)
    pacer = _pacer(BY_REMAINING, ctx.bandwidth)
    streams = MigrationStreams(
        host,  # type: ignore[arg-type]
        ctx,  # type: ignore[arg-type]
        pacer,
        controller,
        {"vda": "virtio-disk0", "vdb": "virtio-disk1"},
        last_reading=lambda: None,
        on_note=lambda note: None,
    )
    return streams, controller


@pytest.mark.parametrize("postcopy", [False, True])
async def test_rule2_uncapped_the_stream_gets_libvirts_largest_speed_and_post_copy_its_own(
    postcopy: bool,
) -> None:
    host = FakeHost()
    streams, _ = _migration_streams(Ctx(postcopy=postcopy), host)
    await streams.set_stream_speed(None)
    await streams.set_stream_speed(3 * MiB)
    expected: list[tuple[Any, ...]] = [("speed", UNCAPPED_MIB, False)]
    expected += [("migrate-set-parameters", {"max-postcopy-bandwidth": 0})] if postcopy else []
    expected += [("speed", 3, False)]
    expected += [("migrate-set-parameters", {"max-postcopy-bandwidth": 3 * MiB})] if postcopy else []
    assert host.calls == expected
    effective = await streams.read()
    assert effective.stream is None and effective.downtime_ms == 70  # read back: libvirt's largest = none
    assert effective.disks == {"vda": 0}


def test_rule2_the_controller_takes_its_new_targets_from_a_retune() -> None:
    streams, controller = _migration_streams(Ctx(bandwidth=2 * MiB), FakeHost())
    targets = streams.targets(None, 900)
    assert controller.policy.bandwidth is None and controller.policy.max_downtime_ms == 900
    assert targets.stream is None and targets.disks == {"vda": 0, "vdb": 0}
    assert targets.downtime_ms is KEEP  # not started: the controller's start sets it


# -- rule 3 ----------------------------------------------------------------------------------------------


async def test_rule3_a_knob_qemu_already_reports_at_the_value_is_not_set_again() -> None:
    streams = FakeStreams()
    limits = limits_of(Ctx(), streams)
    await limits.refresh()
    assert await limits.apply(Targets(disks={"vda": MiB, "vdb": 0}, stream=2 * MiB, downtime_ms=50)) == []
    assert streams.calls == [("vdb", 0)]


# -- rule 4 ----------------------------------------------------------------------------------------------


async def test_rule4_a_change_made_under_an_older_budget_is_dropped_and_one_knob_never_overlaps() -> None:
    streams = FakeStreams()
    limits = limits_of(Ctx(bandwidth=2 * MiB), streams)
    streams.gate = asyncio.Event()
    generation = limits.generation
    in_flight = asyncio.ensure_future(limits.apply(Targets(disks={"vda": 3 * MiB}), generation))
    await asyncio.sleep(0)
    queued = asyncio.ensure_future(limits.apply(Targets(disks={"vda": 5 * MiB}), generation))
    retune = asyncio.ensure_future(limits.retune(cap=None))
    await asyncio.sleep(0.01)
    # The retune's other knobs went ahead; its vda waits for the change of vda in flight.
    assert [c for c in streams.calls if c[0] == "vda"] == [("vda", 3 * MiB)]
    streams.gate.set()
    await asyncio.gather(in_flight, queued, retune)
    vda = [value for knob, value in streams.calls if knob == "vda"]
    assert vda == [3 * MiB, 0]  # the queued 5 MiB/s, made under the old budget, was dropped
    assert streams.qemu.disks["vda"] == 0


# -- rule 5 ----------------------------------------------------------------------------------------------


async def test_rule5_a_failed_change_is_logged_retried_once_counted_and_never_pretended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    streams = FakeStreams()
    ctx = Ctx()
    limits = limits_of(ctx, streams)
    streams.fail = {"vdb": 2, "downtime": 1}
    with pytest.raises(LimitsNotApplied) as raised:
        await limits.retune(cap=None, downtime_ms=400)
    assert raised.value.http_status == 503
    assert "disk vdb to 0" in raised.value.description and "cannot set vdb" in raised.value.description
    assert [c for c in streams.calls if c[0] == "vdb"] == [("vdb", 0), ("vdb", 0)]  # tried twice
    assert [c for c in streams.calls if c[0] == "downtime"] == [("downtime", 400)] * 2  # the retry took
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("disk vdb to 0 failed (attempt 2 of 2)" in w for w in warnings)
    view = ctx.notes["limits"]
    assert view["failedChanges"] == 3
    assert view["unapplied"][0]["knob"] == "disk vdb" and view["unapplied"][0]["value"] == 0
    assert view["effective"]["disks"]["vdb"] == {"bytesPerSecond": MiB}  # what QEMU still runs
    assert view["effective"]["downtimeLimitMs"] == 400


# -- rule 6 ----------------------------------------------------------------------------------------------


async def test_rule6_the_view_is_what_qemu_reports_and_the_details_change_only_with_it() -> None:
    streams = FakeStreams()
    ctx = Ctx()
    limits = limits_of(ctx, streams)
    streams.qemu = Effective(disks={"vda": 7}, has_stream=True, stream=None, downtime_ms=80, read_at=1.0)
    await limits.refresh()
    assert ctx.notes["limits"]["effective"]["disks"] == {"vda": {"bytesPerSecond": 7}}
    noted = ctx.noted
    limits.observe(Effective(disks={"vda": 7}, read_at=2.0))  # the same limits, read again
    assert ctx.noted == noted
    limits.observe(Effective(disks={"vda": 9}, read_at=3.0))
    assert ctx.noted == noted + 1 and ctx.notes["limits"]["effective"]["disks"]["vda"] == {
        "bytesPerSecond": 9
    }
    assert ctx.notes["limits"]["effective"]["migrationBytesPerSecond"] is None
