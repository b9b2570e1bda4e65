"""The cross-host steering's disk part (agent.migration.crosshost.steering) on the shared mirror pacer: the
NBD mirrors read through QMP, shares by what each has left, speed changes in the background that the
steering owns and awaits, and a mirror that failed ending the migration."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from agent.errors import MigrationFailed, VirtError
from agent.migration import convergence
from agent.migration.crosshost.steering import Steering
from agent.migration.mirrors.speeds import AllocationIndex
from agent.migration.plan import DiskPlan, MigrationPlan
from agent.migration.request import MigrationRequest

VM = "0f6b2c1e-8d7a-4c39-9a57-3e2d1c0b9a88"
STORAGE = "5c8e2a1f0b3d4e6f8a9b1c2d3e4f5a6b"
MiB = 1024 * 1024
GiB = 1024 * MiB


def disk(target: str) -> DiskPlan:
    src = str(Path("/src") / f"{target}.qcow2")
    return DiskPlan(
        target=target,
        volume_uuid=f"vol-{target}",
        role="Data",
        src_top=src,
        src_format="qcow2",
        dst_top=str(Path("/dst") / f"{target}.qcow2"),
        dst_format="qcow2",
        virtual_size=GiB,
        flatten=False,
        lower_layers=(),
        dst_backing=None,
        dst_backing_format=None,
        src_chain=(src,),
        estimated_bytes=300 * MiB,
    )


class Ctx:
    def __init__(self, bandwidth: int | None) -> None:
        self.vm_uuid = VM
        self.bandwidth = bandwidth
        self.host_share: int | None = None
        self.downtime_ms = 300
        self.deadline = None
        self.request = MigrationRequest.model_validate(
            {"primaryStorageMigrateVm": {"dstPrimaryStorageUuid": STORAGE, "strategy": "auto"}}
        )
        self.log = logging.LoggerAdapter(logging.getLogger("test"), {})
        self.progressed: dict[str, tuple[int, int]] = {}
        self.notes: dict[str, Any] = {}

    def progress(self, item: str, done: int, total: int) -> None:
        self.progressed[item] = (done, total)

    def note(self, key: str, value: Any) -> None:
        self.notes[key] = value

    def attach_limits(self, limits: Any) -> None:
        self.limits = limits


class FakeHost:
    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.jobs = jobs
        self.set: list[tuple[str, int]] = []
        self.aborted = 0
        self.speed_calls = asyncio.Event()
        self.release = asyncio.Event()
        self.fail = 0  # speed changes that fail before one succeeds
        self.tries = 0

    async def qmp(self, vm_uuid: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if command == "query-block-jobs":
            return self.jobs
        assert command == "block-job-set-speed" and arguments is not None
        self.speed_calls.set()
        await self.release.wait()  # a busy libvirtd: the change is still on its way
        self.tries += 1
        if self.fail:
            self.fail -= 1
            raise VirtError("libvirt: the job is busy")
        self.set.append((arguments["device"], arguments["speed"]))
        return {}

    async def block_writes(self, vm_uuid: str, disks: list[str]) -> dict[str, int]:
        return {d: 0 for d in disks}

    async def abort_job(self, vm_uuid: str) -> None:
        self.aborted += 1


def steering(host: FakeHost, ctx: Ctx) -> Steering:
    plan = MigrationPlan(VM, STORAGE, (disk("vda"), disk("vdb")), ())
    indexes = {"vda": AllocationIndex([(0, 300 * MiB)]), "vdb": AllocationIndex([(0, 100 * MiB)])}
    policy = convergence.ConvergencePolicy.from_request(ctx.request, time_left_s=None)
    steer = Steering(
        host,  # type: ignore[arg-type]
        ctx,  # type: ignore[arg-type]
        plan,
        indexes,
        convergence.ConvergenceController(policy),
        aliases={"vda": "virtio-disk0", "vdb": "virtio-disk1"},
        tick_s=0.01,
    )
    steer.watch_disks({"vda": 0, "vdb": 0}, {}, write_blocking=False)
    return steer


def job(device: str, offset: int, length: int, **more: Any) -> dict[str, Any]:
    return {"device": device, "offset": offset, "len": length, "ready": False, **more}


async def test_shares_follow_what_each_mirror_has_left_and_changes_are_awaited_on_close() -> None:
    host = FakeHost([job("drive-virtio-disk0", 0, 300 * MiB), job("drive-virtio-disk1", 0, 100 * MiB)])
    ctx = Ctx(bandwidth=40 * MiB)
    steer = steering(host, ctx)
    await steer._disks()
    await asyncio.wait_for(host.speed_calls.wait(), 5)
    pending = list(steer.changing.values())
    assert len(pending) == 2 and not any(t.done() for t in pending)
    await steer._disks()  # a change still on its way is not asked again
    assert list(steer.changing.values()) == pending
    host.release.set()
    await asyncio.sleep(0)
    await steer.close()
    assert all(t.done() for t in pending) and steer.changing == {}
    speeds = dict(host.set)
    assert speeds["drive-virtio-disk0"] > 2 * speeds["drive-virtio-disk1"]
    assert speeds["drive-virtio-disk0"] + speeds["drive-virtio-disk1"] <= 40 * MiB
    assert steer.mirrors["vda"].speed == speeds["drive-virtio-disk0"]
    assert ctx.progressed["disk:vda"] == (0, 300 * MiB)


async def test_close_cancels_and_awaits_the_changes_still_on_their_way() -> None:
    host = FakeHost([job("drive-virtio-disk0", 0, 300 * MiB), job("drive-virtio-disk1", 0, 100 * MiB)])
    steer = steering(host, Ctx(bandwidth=40 * MiB))
    await steer._disks()
    pending = list(steer.changing.values())
    await steer.close()
    assert all(t.cancelled() for t in pending)
    assert host.set == []


async def test_a_mirror_that_failed_ends_the_migration() -> None:
    host = FakeHost(
        [
            job("drive-virtio-disk0", 0, 300 * MiB, status="concluded", error="Input/output error"),
            job("drive-virtio-disk1", 0, 100 * MiB),
        ]
    )
    steer = steering(host, Ctx(bandwidth=40 * MiB))
    await steer._disks()
    assert isinstance(steer.verdict, MigrationFailed)
    assert steer.verdict.code == "AGENT.DISK_COPY_FAILED"
    assert host.aborted == 1
    assert steer.changing == {}


@pytest.mark.parametrize("memory_phase", [False, True])
async def test_the_disks_budget_counts_only_their_own_phase(memory_phase: bool) -> None:
    host = FakeHost([job("drive-virtio-disk0", 0, 300 * MiB), job("drive-virtio-disk1", 0, 100 * MiB)])
    host.release.set()
    steer = steering(host, Ctx(bandwidth=None))
    await steer._disks()
    steer.pacer.counting = not memory_phase
    host.jobs = [
        job("drive-virtio-disk0", 30 * MiB, 300 * MiB),
        job("drive-virtio-disk1", 10 * MiB, 100 * MiB),
    ]
    await steer._disks()
    await steer.close()
    assert steer.pacer.meter.bytes == (0 if memory_phase else 40 * MiB)


async def test_a_cap_lifted_before_the_first_tick_is_lifted_in_qemu() -> None:
    """libvirt started the mirrors at 1 MiB/s; the cap was lifted before the steering began (issue 27): the
    speed in effect is the one QEMU reports, so the mirrors are set to 0 (no limit)."""
    host = FakeHost(
        [
            job("drive-virtio-disk0", 0, 300 * MiB, speed=MiB),
            job("drive-virtio-disk1", 0, 100 * MiB, speed=MiB),
        ]
    )
    host.release.set()
    ctx = Ctx(bandwidth=None)
    steer = steering(host, ctx)
    await steer._disks()
    await asyncio.gather(*steer.changing.values())
    await steer.close()
    assert sorted(host.set) == [("drive-virtio-disk0", 0), ("drive-virtio-disk1", 0)]
    assert ctx.notes["limits"]["effective"]["disks"] == {
        "vda": {"bytesPerSecond": 0},
        "vdb": {"bytesPerSecond": 0},
    }


async def test_a_failed_speed_change_is_logged_retried_once_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = FakeHost([job("drive-virtio-disk0", 0, 300 * MiB, speed=MiB)])
    host.release.set()
    host.fail = 2
    ctx = Ctx(bandwidth=None)
    steer = steering(host, ctx)
    await steer._disks()
    await asyncio.gather(*steer.changing.values())
    await steer.close()
    assert host.tries == 2 and host.set == []
    assert any("disk vda to 0 failed (attempt 2 of 2)" in r.getMessage() for r in caplog.records)
    limits = ctx.notes["limits"]
    assert limits["failedChanges"] == 2 and limits["effective"]["disks"]["vda"] == {"bytesPerSecond": MiB}
