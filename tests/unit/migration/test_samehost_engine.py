"""The same-host engine's steps without libvirt (agent.migration.samehost): the journal's record, block-job
events, pacing until every mirror is READY, the switch and its rollback, a libvirtd outage at a pivot, and
a restart during the switch with the VM shut down."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent.errors import ConvergenceFailed, MigrationFailed, VirtError
from agent.migration.engine import Deadline, Step
from agent.migration.mirrors import hotdisk
from agent.migration.mirrors.hotdisk import DiskWatch, Mode
from agent.migration.mirrors.speeds import AllocationIndex
from agent.migration.plan import DiskPlan, MigrationPlan
from agent.migration.request import MigrationRequest
from agent.migration.samehost import resume, steering, switch
from agent.migration.samehost.mirrors import on_event
from agent.migration.samehost.work import Mirror, Work
from agent.storage.roots import StorageRoot, StorageRoots
from agent.virt.host import UNREACHABLE, BlockJob, DomainEvent

VM = "0f6b2c1e-8d7a-4c39-9a57-3e2d1c0b9a88"
STORAGE = "5c8e2a1f0b3d4e6f8a9b1c2d3e4f5a6b"
MiB = 1024 * 1024
GiB = 1024 * MiB


def disk(target: str, tmp_path: Path) -> DiskPlan:
    return DiskPlan(
        target=target,
        volume_uuid=f"vol-{target}",
        role="Data",
        src_top=str(tmp_path / f"src-{target}.qcow2"),
        src_format="qcow2",
        dst_top=str(tmp_path / f"dst-{target}.qcow2"),
        dst_format="qcow2",
        virtual_size=GiB,
        flatten=True,
        lower_layers=(),
        dst_backing=None,
        dst_backing_format=None,
        src_chain=(str(tmp_path / f"src-{target}.qcow2"),),
        estimated_bytes=100 * MiB,
    )


def work_of(tmp_path: Path, *targets: str, data: int = 100 * MiB) -> Work:
    disks = tuple(disk(t, tmp_path) for t in targets)
    work = Work(MigrationPlan(VM, "storage-b", disks, ()), StorageRoot("storage-b", tmp_path))
    for d in disks:
        work.mirrors[d.target] = Mirror.of(d, AllocationIndex([(0, data)]))
    return work


class Ctx:
    def __init__(self, bandwidth: int | None = None, strategy: str = "auto") -> None:
        self.vm_uuid = VM
        self.bandwidth = bandwidth
        self.host_share: int | None = None
        self.downtime_ms = 300
        self.request = MigrationRequest.model_validate(
            {"primaryStorageMigrateVm": {"dstPrimaryStorageUuid": STORAGE, "strategy": strategy}}
        )
        self.resume_data: dict[str, Any] | None = None
        self.log = logging.LoggerAdapter(logging.getLogger("test"), {})
        self.progressed: dict[str, tuple[int, int]] = {}
        self.notes: dict[str, Any] = {}
        self.checkpoints: list[dict[str, Any]] = []
        self.announced: list[Any] = []
        self.detaching = False
        self.cancel_requested = False
        self.deadline: Deadline | None = None

    def progress(self, item: str, done: int, total: int) -> None:
        self.progressed[item] = (done, total)

    def note(self, key: str, value: Any) -> None:
        self.notes[key] = value

    def attach_limits(self, limits: Any) -> None:
        self.limits = limits

    async def checkpoint(self, data: dict[str, Any]) -> None:
        self.checkpoints.append(dict(data))

    async def enter(self, state: Any, detail: str | None = None) -> None:
        self.announced.append(state)


def domain_xml(disks: dict[str, str], ready: set[str]) -> str:
    devices = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{src}'/>"
        f"<target dev='{t}' bus='virtio'/>"
        + ("<mirror ready='yes'><source file='x'/></mirror>" if t in ready else "")
        + "</disk>"
        for t, src in disks.items()
    )
    return f"<domain><devices>{devices}</devices></domain>"


class FakeHost:
    """Mirrors that advance ``step`` bytes a tick over a whole disk and are READY at its end."""

    def __init__(self, work: Work, *, step: int = GiB // 4, state: str = "running") -> None:
        self.work = work
        self.step = step
        self.state = state
        self.cur = {t: 0 for t in work.mirrors}
        self.gone: set[str] = set()
        self.speeds: list[tuple[str, int]] = []
        self.sources = {t: m.disk.src_top for t, m in work.mirrors.items()}
        self.ready_in_xml: set[str] = set()
        self.calls: list[str] = []
        self.fail_pivot: set[str] = set()
        self.unreachable_once: set[str] = set()

    async def block_writes(self, vm_uuid: str, disks: list[str]) -> dict[str, int]:
        return {d: 0 for d in disks}

    async def block_job(self, vm_uuid: str, target: str) -> BlockJob | None:
        if target in self.gone:
            return None
        self.cur[target] = min(self.cur[target] + self.step, GiB)
        return BlockJob(libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY, self.cur[target], GiB, 0)

    async def set_block_job_speed(self, vm_uuid: str, target: str, speed: int) -> None:
        self.speeds.append((target, speed))

    async def live_xml(self, vm_uuid: str) -> str:
        return domain_xml(self.sources, self.ready_in_xml)

    async def domain_state(self, vm_uuid: str) -> str:
        return self.state

    async def wait_reachable(self, within_s: float = 120.0) -> bool:
        return True

    async def abort_block_job_and_wait(self, vm_uuid: str, target: str) -> bool:
        await self.abort_block_job(vm_uuid, target)
        self.gone.add(target)
        return True

    async def abort_block_job(self, vm_uuid: str, target: str, *, pivot: bool = False) -> None:
        self.calls.append(f"{'pivot' if pivot else 'abort'} {target}")
        if pivot and target in self.unreachable_once:
            self.unreachable_once.discard(target)
            raise VirtError("libvirtd is gone", code=UNREACHABLE)
        if pivot and target in self.fail_pivot:
            raise VirtError(f"pivot of {target} refused")
        if pivot:
            self.sources[target] = (
                self.work.mirrors[target].disk.dst_top
                if self.sources[target] != self.work.mirrors[target].disk.dst_top
                else self.work.mirrors[target].disk.src_top
            )
        self.ready_in_xml.discard(target)

    async def block_copy(
        self, vm_uuid: str, target: str, dest: str, *, bandwidth: int | None, flags: int
    ) -> None:
        self.calls.append(f"copy {target}")
        self.ready_in_xml.add(target)


def test_the_journal_record_names_the_mirrors_and_their_modes(tmp_path: Path) -> None:
    work = work_of(tmp_path, "vdb", "vda")
    watch = work.mirrors["vdb"].watch
    assert watch is not None
    watch.mode = Mode.WRITE_BLOCKING
    work.created.append("/dst/x")
    data = work.checkpoint_data(Step.MIRRORING)
    assert data["engine"] == "same-host"
    assert data["step"] == Step.MIRRORING
    assert data["mirroring"] == ["vda", "vdb"]
    assert data["writeBlocking"] == ["vdb"]
    assert data["created"] == ["/dst/x"]
    assert MigrationPlan.from_dict(data["plan"]) == work.plan


def event(target: str, status: int) -> DomainEvent:
    return DomainEvent(
        "block-job", VM, disk=target, job_type=libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY, status=status
    )


def test_block_job_events_mark_ready_fail_or_are_ignored_after_a_restart(tmp_path: Path) -> None:
    work = work_of(tmp_path, "vda", "vdb")
    on_event(work, event("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_READY))
    assert work.ready == {"vda"}
    # libvirt may name the disk by its source path.
    on_event(work, event(work.mirrors["vdb"].disk.src_top, libvirt.VIR_DOMAIN_BLOCK_JOB_READY))
    assert work.ready == {"vda", "vdb"}
    on_event(work, event("vdz", libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED))  # not ours
    work.mirrors["vda"].ends_to_ignore = 1  # aborted on purpose to restart it
    on_event(work, event("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED))
    assert work.mirrors["vda"].ends_to_ignore == 0
    with pytest.raises(MigrationFailed) as failed:
        on_event(work, event("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED))
    assert failed.value.code == "AGENT.BLOCK_JOB_FAILED"


async def test_mirrors_are_paced_within_the_budget_until_every_one_is_ready(tmp_path: Path) -> None:
    work = work_of(tmp_path, "vda", "vdb")
    host = FakeHost(work)
    ctx = Ctx(bandwidth=40 * MiB)
    events: asyncio.Queue[DomainEvent] = asyncio.Queue()
    for target in ("vda", "vdb"):  # READY arrives as an event
        events.put_nowait(event(target, libvirt.VIR_DOMAIN_BLOCK_JOB_READY))
    await steering.pace(host, ctx, work, events, tick_s=0.01)  # type: ignore[arg-type]
    assert work.ready == {"vda", "vdb"}
    assert {t for t, _ in host.speeds} == {"vda", "vdb"}
    assert ctx.progressed["disk:vda"] == (100 * MiB, 100 * MiB)
    assert ctx.notes["disks"]["vda"]["remainingBytes"] == 0


async def test_a_lost_ready_event_is_read_from_the_live_xml(tmp_path: Path) -> None:
    work = work_of(tmp_path, "vda")
    host = FakeHost(work)
    host.ready_in_xml = {"vda"}
    events: asyncio.Queue[DomainEvent] = asyncio.Queue()
    await asyncio.wait_for(steering.pace(host, Ctx(), work, events, tick_s=0.01), 5)  # type: ignore[arg-type]
    assert work.ready == {"vda"}


@pytest.mark.parametrize(
    ("state", "code"), [("running", "AGENT.BLOCK_JOB_GONE"), ("shutoff", "AGENT.VM_STOPPED")]
)
async def test_a_mirror_that_disappears_fails_the_copy_and_says_why(
    tmp_path: Path, state: str, code: str
) -> None:
    work = work_of(tmp_path, "vda")
    host = FakeHost(work, state=state)
    host.gone = {"vda"}
    with pytest.raises(MigrationFailed) as failed:
        await steering.pace(host, Ctx(), work, asyncio.Queue(), tick_s=0.01)  # type: ignore[arg-type]
    assert failed.value.code == code


async def test_precopy_fails_early_on_a_disk_that_cannot_converge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hotdisk, "JUDGE_AFTER_S", 0.2)
    work = work_of(tmp_path, "vda")
    host = FakeHost(work, step=0)  # the mirror never gains

    async def writes(vm_uuid: str, disks: list[str]) -> dict[str, int]:
        host.written = getattr(host, "written", 0) + 4 * MiB  # 4 MiB a tick of 0.01 s: far over its share
        return {d: host.written for d in disks}

    host.block_writes = writes  # type: ignore[method-assign]
    with pytest.raises(ConvergenceFailed):
        await asyncio.wait_for(
            steering.pace(host, Ctx(bandwidth=MiB, strategy="precopy"), work, asyncio.Queue(), tick_s=0.01),  # type: ignore[arg-type]
            30,
        )


async def test_the_switch_pivots_every_disk(tmp_path: Path) -> None:
    work = work_of(tmp_path, "vda", "vdb")
    host = FakeHost(work)
    await switch.switch(host, None, Ctx(), work, tick_s=0.01)  # type: ignore[arg-type]
    assert host.calls == ["pivot vda", "pivot vdb"]
    assert host.sources == {t: m.disk.dst_top for t, m in work.mirrors.items()}


async def test_a_failed_pivot_puts_the_pivoted_disks_back_on_their_sources(tmp_path: Path) -> None:
    work = work_of(tmp_path, "vda", "vdb")
    created = tmp_path / "dst-vda.qcow2"
    created.write_text("")
    work.created.append(str(created))
    host = FakeHost(work)
    host.fail_pivot = {"vdb"}

    roots = StorageRoots([StorageRoot("storage-b", tmp_path)])
    with pytest.raises(MigrationFailed) as failed:
        await switch.switch(host, roots, Ctx(), work, tick_s=0.01)  # type: ignore[arg-type]
    assert failed.value.code == "AGENT.PIVOT_FAILED"
    assert host.calls == ["pivot vda", "pivot vdb", "abort vdb", "copy vda", "pivot vda"]
    assert host.sources == {t: m.disk.src_top for t, m in work.mirrors.items()}
    assert not created.exists()


class NeverReadyHost(FakeHost):
    """A copy back (the rollback of a pivoted disk) that never becomes READY."""

    async def block_copy(
        self, vm_uuid: str, target: str, dest: str, *, bandwidth: int | None, flags: int
    ) -> None:
        self.calls.append(f"copy {target}")
        self.cur[target] = 0


@pytest.mark.parametrize("stop", ["cancel", "deadline", "stall"])
async def test_a_rollback_that_never_gets_ready_ends_and_says_where_each_disk_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    # Issue 21: the copy back looped without bound inside run_past_cancel: neither a cancel nor the
    # deadline could end it.
    work = work_of(tmp_path, "vda", "vdb")
    created = tmp_path / "dst-vda.qcow2"
    created.write_text("")
    work.created.append(str(created))
    host = NeverReadyHost(work)
    host.fail_pivot = {"vdb"}
    ctx = Ctx()
    if stop == "cancel":
        ctx.cancel_requested = True
    elif stop == "deadline":
        ctx.deadline = Deadline(0.0)
    else:
        host.step = 0  # the copy back stands still
        monkeypatch.setattr(switch, "ROLLBACK_STALL_S", 0.05)
    with pytest.raises(MigrationFailed) as failed:
        await asyncio.wait_for(switch.switch(host, None, ctx, work, tick_s=0.01), 10)  # type: ignore[arg-type]
    assert failed.value.code == "AGENT.ROLLBACK_FAILED"
    assert f"vda runs from {work.mirrors['vda'].disk.dst_top}" in str(failed.value.details)
    assert host.calls == ["pivot vda", "pivot vdb", "abort vdb", "copy vda", "abort vda"]
    assert host.sources["vda"] == work.mirrors["vda"].disk.dst_top  # where it really runs
    assert created.exists()  # in use: nothing removed


async def test_a_pivot_cut_by_a_libvirtd_restart_is_taken_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(asyncio, "sleep", _no_sleep)
    work = work_of(tmp_path, "vda")
    host = FakeHost(work)
    host.unreachable_once = {"vda"}
    await switch.switch(host, None, Ctx(), work, tick_s=0.01)  # type: ignore[arg-type]
    assert host.calls == ["pivot vda", "pivot vda"]
    assert host.sources["vda"] == work.mirrors["vda"].disk.dst_top


async def _no_sleep(seconds: float) -> None:
    return None


async def test_a_restart_during_the_switch_with_the_vm_shut_down_changes_nothing(tmp_path: Path) -> None:
    work = work_of(tmp_path, "vda")
    host = FakeHost(work, state="shutoff")
    ctx = Ctx()
    data = work.checkpoint_data(Step.SWITCHING)
    with pytest.raises(MigrationFailed) as failed:
        roots = StorageRoots([StorageRoot("storage-b", tmp_path)])
        await resume.resume(host, roots, ctx, data, tick_s=0.01)  # type: ignore[arg-type]
    assert failed.value.code == "AGENT.VM_STOPPED"
    assert host.calls == []


def test_a_mirror_of_a_disk_gets_a_watch() -> None:
    d = disk("vda", Path("/x"))
    mirror = Mirror.of(d, AllocationIndex([]))
    assert isinstance(mirror.watch, DiskWatch) and mirror.watch.target == "vda"
    assert mirror.mode is Mode.BACKGROUND
    assert (mirror.target, mirror.virtual_size) == ("vda", GiB)


async def test_auto_restarts_a_losing_mirror_in_write_blocking_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hotdisk, "JUDGE_AFTER_S", 0.2)
    work = work_of(tmp_path, "vda")
    plan = work.plan
    precreated = dataclasses.replace(plan.disks[0], precreated=True)  # nothing to recreate on disk
    work.mirrors["vda"] = Mirror.of(precreated, AllocationIndex([(0, 100 * MiB)]))
    host = FakeHost(work, step=0)
    written = 0

    async def writes(vm_uuid: str, disks: list[str]) -> dict[str, int]:
        nonlocal written
        written += 4 * MiB
        return {d: written for d in disks}

    async def block_job(vm_uuid: str, target: str) -> BlockJob | None:
        if host.calls and host.calls[-1] == "abort vda":
            return None  # the abort took
        return BlockJob(libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY, 0, GiB, 0)

    host.block_writes = writes  # type: ignore[method-assign]
    host.block_job = block_job  # type: ignore[method-assign]
    ctx = Ctx(bandwidth=MiB, strategy="auto")
    await asyncio.wait_for(steering.pace(host, ctx, work, asyncio.Queue(), tick_s=0.01), 30)  # type: ignore[arg-type]
    assert host.calls == ["abort vda", "copy vda"]  # the new mirror is READY at once here (its XML says so)
    assert work.mirrors["vda"].mode is Mode.WRITE_BLOCKING
    assert ctx.checkpoints[-1]["writeBlocking"] == ["vda"]
    assert "write-blocking" in ctx.notes["decisions"][-1]["message"]
