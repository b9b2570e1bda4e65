"""Same-host live storage migration: libvirt block copy of every moving disk, then one switch.

Steps, each journalled (``ctx.checkpoint``) before it is taken:
1. PREPARING: plan from the live XML and qemu-img chains; preflight (VM running, no block job, space,
   targets absent or identical shared layers).
2. COPYING: lower layers copied as files (sparse, rate-limited, outside the guest's I/O path) and pointed
   at their new backing files; destination tops created; one mirror per disk (shallow onto the
   pre-created chain, or a full copy = flatten), all in parallel, paced from the allocation maps so the
   task's one budget is charged for real bytes.
3. SWITCHING: when every mirror is READY (event, confirmed by ``<mirror ready='yes'>``), pivot them all. If
   one pivot fails, the disks already pivoted are mirrored back onto their source files, so the VM runs
   from one consistent set: all source or all destination.
4. VERIFYING: the live XML shows the new paths; the persistent definition is rewritten to them (libvirt
   9.0 only updates the live definition on pivot) and read back.
Until the switch, any failure or cancel aborts the mirrors without pivot and removes every file the task
created; the VM never stops using its source volumes. Source files stay for the management plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import libvirt

from agent.errors import AgentError, MigrationFailed, NotFound, PreflightFailed, StorageError, VirtError
from agent.migration import hotdisk, snapshots
from agent.migration.engine import Step, TaskContext, announce, run_past_cancel
from agent.migration.hotdisk import BudgetMeter, DiskWatch, Mode
from agent.migration.inventory import volume_inventory
from agent.migration.pacing import (
    POSITIONAL_SLACK,
    AllocationIndex,
    MirrorSample,
    SteeringClock,
    job_speed,
    real_bytes_done,
    worth_changing,
)
from agent.migration.plan import (
    DiskPlan,
    LayerPlan,
    MigrationPlan,
    allocation_index,
    inspect_chains,
    plan_migration,
)
from agent.migration.request import Strategy
from agent.migration.states import TaskState
from agent.migration.targets import check_precreated_target, check_same_content_below
from agent.storage import qemuimg
from agent.storage.filecopy import copy_sparse_async
from agent.storage.roots import StorageRoots
from agent.storage.space import check_free_space
from agent.virt.domxml import block_copy_dest_xml, parse_disks, rewrite_disk_sources
from agent.virt.host import UNREACHABLE, DomainEvent, VirtHost

TICK_S = 0.25
#: How long a copy waits for a restarting libvirtd (QEMU keeps mirroring meanwhile; libvirt 9.0 takes the
#: block jobs back when it reconnects to QEMU). Past this the task fails and cleans up.
LIBVIRT_OUTAGE_S = 120.0
#: How long the guest's writes are measured before the mirrors start, when the task has a cap.
MEASURE_WRITES_S = 1.5
#: How often the per-disk figures and a rate sample go to the task's details.
FIGURES_EVERY_S = 1.0


@dataclass
class _Mirror:
    disk: DiskPlan
    index: AllocationIndex
    ready: bool = False
    speed: int = -1
    done: int = 0
    total: int = 0
    watch: DiskWatch | None = None
    written_at_start: int = 0  # the guest's wr_bytes when this mirror started
    written: int = 0  # the latest wr_bytes
    copied: int = 0  # real bytes the background copy moved (done without READY's completion)
    ends_to_ignore: int = 0  # end events of mirrors this task aborted on purpose (restarts)

    def __post_init__(self) -> None:
        if self.watch is None:  # picked up after a restart, or made for cleanup
            self.watch = DiskWatch(self.disk.target)

    @property
    def mode(self) -> Mode:
        return self.watch.mode if self.watch else Mode.BACKGROUND


@dataclass
class _Work:
    """What this task has done so far: files it created and mirrors it started (for cleanup)."""

    plan: MigrationPlan
    created: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    mirrors: dict[str, _Mirror] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    rates: list[dict[str, Any]] = field(default_factory=list)
    meter: BudgetMeter = field(default_factory=BudgetMeter)

    def checkpoint_data(self, step: Step) -> dict[str, Any]:
        return {
            "engine": "same-host",
            "step": step,
            "plan": self.plan.to_dict(),
            "created": self.created,
            "reused": self.reused,
            "mirroring": sorted(self.mirrors),
            "writeBlocking": sorted(t for t, m in self.mirrors.items() if m.mode is Mode.WRITE_BLOCKING),
        }


class _Interval:
    """Bytes moved since the last rate sample: background copy, and guest writes in write-blocking mode."""

    def __init__(self, since: float | None) -> None:
        self.background = 0
        self.guest = 0
        self.since = since

    def add(self, background: int, guest: int) -> None:
        self.background += background
        self.guest += guest

    def take(self, now: float, started: float | None) -> dict[str, Any] | None:
        since, self.since = self.since, now
        background, guest = self.background, self.guest
        self.background = self.guest = 0
        if since is None or now <= since:
            return None
        return {
            "at": round(now - (started or since), 2),
            "seconds": round(now - since, 2),
            "backgroundBytesPerSecond": int(background / (now - since)),
            "guestWriteBytesPerSecond": int(guest / (now - since)),
        }


class _NothingSwitched(Exception):
    """Resuming at the switch found no disk pivoted: the copy is abandoned like an interrupted one."""


class SameHostEngine:
    name = "same-host"

    def __init__(self, host: VirtHost, roots: StorageRoots, *, tick_s: float = TICK_S) -> None:
        self.host = host
        self.roots = roots
        self.tick_s = tick_s

    async def run(self, ctx: TaskContext) -> list[dict[str, Any]]:
        if ctx.resume_data:
            return await self._resume(ctx, ctx.resume_data)
        await ctx.enter(TaskState.PREPARING)
        plan = await self._check_precreated(await self._plan(ctx))
        work = _Work(plan)
        work.reused = await self._preflight(ctx, plan)
        ctx.note("plan", plan.summary())
        # Every item's size up front, so the one percent never races ahead while later items are unknown.
        for layer in plan.layers:
            ctx.progress(f"layer:{os.path.basename(layer.dst)}", 0, layer.actual_size)
        for disk in plan.disks:
            ctx.progress(f"disk:{disk.target}", 0, disk.estimated_bytes)
        await ctx.checkpoint(work.checkpoint_data(Step.PREPARED))
        try:
            await ctx.enter(TaskState.COPYING)
            await self._copy_layers(ctx, work)
            await self._create_tops(ctx, work)
            await self._mirror_until_ready(ctx, work)
        except BaseException:
            # A cancel, or the task's deadline (the runner cancels the engine when it passes).
            if not ctx.detaching:  # a stopping agent lets running mirrors be; resume picks them up
                await self._abandon(ctx, work)
            raise
        return await self._finish(ctx, work)

    # -- planning ---------------------------------------------------------------------------------------

    async def _plan(self, ctx: TaskContext) -> MigrationPlan:
        state = await self.host.domain_state(ctx.vm_uuid)
        if state not in ("running", "paused"):
            raise PreflightFailed(
                f"VM {ctx.vm_uuid} is {state}; a live storage migration needs it running",
                field="vmUuid",
            )
        disks = parse_disks(await self.host.live_xml(ctx.vm_uuid))
        chains = await inspect_chains(disks)
        dst_root = self.roots.get(ctx.request.primaryStorageMigrateVm.dstPrimaryStorageUuid)
        plan = plan_migration(ctx.vm_uuid, disks, chains, ctx.request, dst_root)
        snapshots.refuse_internal({d.target: chains[d.target] for d in plan.disks})
        return plan

    async def _check_precreated(self, plan: MigrationPlan) -> MigrationPlan:
        """Check the targets the caller made (``agent.migration.targets``); their backing joins the plan."""
        disks = []
        for disk in plan.disks:
            if disk.precreated:
                chain = await check_precreated_target(
                    disk.dst_top,
                    fmt=disk.dst_format,
                    virtual_size=disk.virtual_size,
                    flatten=disk.flatten,
                    field="volumes",
                )
                if not disk.flatten:
                    await check_same_content_below(disk.src_chain, chain, "volumes")
                    disk = dataclasses.replace(
                        disk, dst_backing=chain[1].path, dst_backing_format=chain[1].format
                    )
            disks.append(disk)
        return dataclasses.replace(plan, disks=tuple(disks))

    async def _preflight(self, ctx: TaskContext, plan: MigrationPlan) -> list[str]:
        """Refuse before writing anything; returns the lower layers already present and identical."""
        for disk in plan.disks:
            if await self.host.block_job(ctx.vm_uuid, disk.target) is not None:
                raise PreflightFailed(
                    f"disk {disk.target} of VM {ctx.vm_uuid} already has a block job",
                    field="vmUuid",
                    details="wait for it to finish or abort it first",
                )
            if not disk.precreated and os.path.lexists(disk.dst_top):
                raise PreflightFailed(
                    f"target {disk.dst_top} already exists",
                    field="volumes",
                    code="AGENT.TARGET_EXISTS",
                    details="remove it or choose another dstInstallPath",
                )
        reused = []
        for layer in plan.layers:
            if os.path.lexists(layer.dst):
                if await self._identical_layer(layer):
                    ctx.log.info("reusing identical copy of %s at %s", layer.src, layer.dst)
                    reused.append(layer.dst)
                    continue
                raise PreflightFailed(
                    f"{layer.dst} exists and is not a copy of {layer.src}",
                    code="AGENT.TARGET_EXISTS",
                    field="volumes",
                    details="remove the stale file or choose another destination",
                )
        needed = sum(layer.actual_size for layer in plan.layers if layer.dst not in reused)
        needed += sum(d.estimated_bytes for d in plan.disks)
        root = self.roots.get(plan.dst_storage_uuid)
        await check_free_space(root, needed, field="primaryStorageMigrateVm.dstPrimaryStorageUuid")
        return reused

    async def _identical_layer(self, layer: LayerPlan) -> bool:
        try:
            info = await qemuimg.info(layer.dst)
        except StorageError:
            return False
        if info.format != layer.format or info.virtual_size != layer.virtual_size:
            return False
        if (info.backing or None) != layer.backing_dst:
            return False
        return await qemuimg.compare(layer.src, layer.dst)

    # -- copying ----------------------------------------------------------------------------------------

    async def _record_created(self, ctx: TaskContext, work: _Work, path: str, step: Step) -> None:
        """Journal a file before creating it, so a restart knows to remove it."""
        if not self.roots.owner_of(path):
            raise MigrationFailed(f"refusing to create {path}: not inside a storage root")
        work.created.append(path)
        await ctx.checkpoint(work.checkpoint_data(step))

    async def _copy_layers(self, ctx: TaskContext, work: _Work) -> None:
        for layer in work.plan.layers:
            item = f"layer:{os.path.basename(layer.dst)}"
            if layer.dst in work.reused:
                ctx.progress(item, layer.actual_size, layer.actual_size)
                continue
            await self._record_created(ctx, work, layer.dst, Step.COPYING_LAYERS)
            done = 0

            def on_bytes(n: int, item: str = item, size: int = layer.actual_size) -> None:
                nonlocal done
                done += n
                ctx.progress(item, done, max(size, done))

            ctx.progress(item, 0, layer.actual_size)
            await copy_sparse_async(layer.src, layer.dst, rate=lambda: ctx.bandwidth, on_bytes=on_bytes)
            if layer.backing_dst is not None:
                await qemuimg.rebase_unsafe(layer.dst, layer.backing_dst, layer.backing_format or "qcow2")
            if not await qemuimg.compare(layer.src, layer.dst):
                raise MigrationFailed(
                    f"the copy of {layer.src} at {layer.dst} differs from its source",
                    code="AGENT.VERIFY_FAILED",
                )
            ctx.progress(item, done, done)
            ctx.log.info("layer %s copied to %s (%d bytes) and verified", layer.src, layer.dst, done)

    async def _create_tops(self, ctx: TaskContext, work: _Work) -> None:
        for disk in work.plan.disks:
            if disk.precreated:
                continue  # the caller's file: checked in PREPARING, never created nor removed here
            await self._record_created(ctx, work, disk.dst_top, Step.CREATING_TOPS)
            await qemuimg.create(
                disk.dst_top,
                disk.dst_format,
                disk.virtual_size,
                backing=disk.dst_backing,
                backing_format=disk.dst_backing_format,
            )

    async def _mirror_until_ready(self, ctx: TaskContext, work: _Work) -> None:
        await self.host.ensure_connected()
        events = self.host.subscribe(ctx.vm_uuid)
        try:
            for disk in work.plan.disks:
                work.mirrors[disk.target] = _Mirror(
                    disk, await allocation_index(disk), watch=DiskWatch(disk.target)
                )
            await self._measure_writes(ctx, work)
            shares = hotdisk.disk_shares(ctx.bandwidth, self._watches(work), set())
            may_block = ctx.request.primaryStorageMigrateVm.strategy is not Strategy.PRECOPY
            for target, mirror in work.mirrors.items():
                assert mirror.watch is not None
                write = mirror.watch.write_bps
                if may_block and hotdisk.start_write_blocking(write, shares[target]):
                    mirror.watch.mode = Mode.WRITE_BLOCKING
                    self._decide(
                        ctx,
                        work,
                        f"{target} mirrored in write-blocking mode from the start",
                        disk=target,
                        guestWriteBytesPerSecond=int(write),
                        shareBytesPerSecond=shares[target],
                    )
            shares = hotdisk.disk_shares(ctx.bandwidth, self._watches(work), set())
            await ctx.checkpoint(work.checkpoint_data(Step.MIRRORING))
            work.meter.start(time.monotonic())
            for target, mirror in work.mirrors.items():
                await self._start_mirror(ctx, mirror, shares[target])
            await self._pace(ctx, work, events)
            self._judge_budget(ctx, work)
        finally:
            self.host.unsubscribe(ctx.vm_uuid, events)

    async def _start_mirror(self, ctx: TaskContext, mirror: _Mirror, share: int | None) -> None:
        flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        if not mirror.disk.flatten:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
        if mirror.mode is Mode.WRITE_BLOCKING:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES
        target = mirror.disk.target
        mirror.written_at_start = mirror.written = (await self.host.block_writes(ctx.vm_uuid, [target]))[
            target
        ]
        await self.host.block_copy(
            ctx.vm_uuid,
            target,
            block_copy_dest_xml(mirror.disk.dst_top, mirror.disk.dst_format),
            bandwidth=share,
            flags=flags,
        )
        mirror.speed = share or 0
        mirror.ready = False
        mirror.done = mirror.copied = 0
        ctx.log.info(
            "mirror of %s started: %s -> %s%s, %s",
            target,
            mirror.disk.src_top,
            mirror.disk.dst_top,
            " (flatten)" if mirror.disk.flatten else " (shallow)",
            mirror.mode.value,
        )

    async def _measure_writes(self, ctx: TaskContext, work: _Work) -> None:
        """The guest's write rate on every disk, before any mirror starts (only a capped task needs it)."""
        targets = list(work.mirrors)
        first = await self.host.block_writes(ctx.vm_uuid, targets)
        now = time.monotonic()
        for target, mirror in work.mirrors.items():
            assert mirror.watch is not None
            mirror.watch.observe(now, first[target], mirror.index.total)
        if ctx.bandwidth is None:
            return
        await asyncio.sleep(MEASURE_WRITES_S)
        second = await self.host.block_writes(ctx.vm_uuid, targets)
        now = time.monotonic()
        for target, mirror in work.mirrors.items():
            assert mirror.watch is not None
            mirror.watch.observe(now, second[target], mirror.index.total)
        ctx.note("disks", self._figures(work, hotdisk.disk_shares(ctx.bandwidth, self._watches(work), set())))

    @staticmethod
    def _watches(work: _Work) -> dict[str, DiskWatch]:
        return {t: m.watch for t, m in work.mirrors.items() if m.watch is not None}

    def _figures(self, work: _Work, shares: dict[str, int | None]) -> dict[str, Any]:
        return {t: w.figures(shares.get(t)) for t, w in self._watches(work).items()}

    def _decide(self, ctx: TaskContext, work: _Work, message: str, **figures: Any) -> None:
        ctx.log.info("hot disk: %s %s", message, figures)
        work.decisions.append({"message": message, **figures})
        ctx.note("decisions", work.decisions[-20:])

    async def _restart_write_blocking(self, ctx: TaskContext, work: _Work, mirror: _Mirror) -> None:
        """Restart a losing background mirror in write-blocking mode (QEMU 7.2 cannot switch a running job):
        abort it without pivot, start the destination top over, mirror again."""
        target = mirror.disk.target
        mirror.ends_to_ignore += 1
        await self.host.abort_block_job(ctx.vm_uuid, target)
        for _ in range(100):  # the abort completes asynchronously in QEMU
            if await self.host.block_job(ctx.vm_uuid, target) is None:
                break
            await asyncio.sleep(0.1)
        else:
            raise MigrationFailed(f"the background mirror of {target} did not end after its abort")
        if not mirror.disk.precreated:
            os.unlink(mirror.disk.dst_top)
            await qemuimg.create(
                mirror.disk.dst_top,
                mirror.disk.dst_format,
                mirror.disk.virtual_size,
                backing=mirror.disk.dst_backing,
                backing_format=mirror.disk.dst_backing_format,
            )
        assert mirror.watch is not None
        mirror.watch.restart(Mode.WRITE_BLOCKING)
        await ctx.checkpoint(work.checkpoint_data(Step.MIRRORING))
        shares = hotdisk.disk_shares(ctx.bandwidth, self._watches(work), self._ready(work))
        await self._start_mirror(ctx, mirror, shares[target])

    @staticmethod
    def _ready(work: _Work) -> set[str]:
        return {t for t, m in work.mirrors.items() if m.ready}

    def _judge_budget(self, ctx: TaskContext, work: _Work) -> None:
        budget = ctx.bandwidth
        meter = work.meter
        ctx.note(
            "budget",
            {"realBytesPerSecond": int(meter.rate), "capBytesPerSecond": budget, "realBytes": meter.bytes},
        )
        if budget is not None and meter.over(budget, len(work.mirrors)):
            note = hotdisk.over_budget_note(meter, budget, self._watches(work))
            ctx.log.warning("over the budget: %s", note["message"])
            ctx.note("overBudget", note)

    async def _pace(self, ctx: TaskContext, work: _Work, events: asyncio.Queue[DomainEvent]) -> None:
        """Steer every mirror's speed from its allocation map until all are READY. A libvirtd restart is
        waited out (the mirrors run on in QEMU); a VM shut down under the copy is ``AGENT.VM_STOPPED``."""
        while True:
            try:
                await self._pace_until_ready(ctx, work, events)
                return
            except VirtError as err:
                if err.code != UNREACHABLE:
                    await self._raise_if_stopped(ctx, err)
                    raise
                ctx.log.warning(
                    "libvirtd unreachable (%s); waiting for it, the mirrors run on", err.description
                )
                if not await self.host.wait_reachable(LIBVIRT_OUTAGE_S):
                    raise MigrationFailed(
                        f"libvirtd did not come back within {LIBVIRT_OUTAGE_S:.0f} s",
                        code=UNREACHABLE,
                        details="the copy was abandoned; the VM stays on its source volumes",
                    ) from err
                ctx.log.info("libvirtd is back; picking the mirrors up again")
            except MigrationFailed as err:
                if err.code in ("AGENT.BLOCK_JOB_GONE", "AGENT.BLOCK_JOB_FAILED"):
                    await self._raise_if_stopped(ctx, err)
                raise

    async def _raise_if_stopped(self, ctx: TaskContext, err: AgentError | None) -> None:
        """Raise ``AGENT.VM_STOPPED`` (caused by ``err``) when the VM no longer runs: its user shut it down
        and its mirrors ended with it."""
        try:
            state = await self.host.domain_state(ctx.vm_uuid)
        except NotFound:
            state = "undefined"
        except AgentError:
            return
        if state in ("running", "paused"):
            return
        raise MigrationFailed(
            f"VM {ctx.vm_uuid} was shut down during the copy (now {state})",
            code="AGENT.VM_STOPPED",
            details="the copy was abandoned; the VM's definition keeps its source volumes",
        ) from err

    async def _pace_until_ready(
        self, ctx: TaskContext, work: _Work, events: asyncio.Queue[DomainEvent]
    ) -> None:
        last_xml_check = 0.0
        # A speed that crosses a hole must be replaced before the job reaches the data behind it: when libvirt
        # answers late (another task's slow calls, a busy host), plan for the gaps seen between samples.
        clock = SteeringClock(self.tick_s, first_s=self.tick_s, margin=1.0)
        last_sample: float | None = None
        may_block = ctx.request.primaryStorageMigrateVm.strategy is not Strategy.PRECOPY
        figures_at = 0.0
        interval = _Interval(work.meter.started)
        while True:
            deadline = time.monotonic() + self.tick_s
            while (timeout := deadline - time.monotonic()) > 0:
                try:
                    event = await asyncio.wait_for(events.get(), timeout)
                except TimeoutError:
                    break
                self._on_event(work, event)
            sampled = time.monotonic()
            if last_sample is not None:
                clock.landed(sampled - last_sample)
            last_sample = sampled
            horizon = clock.horizon_s
            writes = await self.host.block_writes(ctx.vm_uuid, list(work.mirrors))
            samples: dict[str, MirrorSample] = {}
            for target, mirror in work.mirrors.items():
                job = await self.host.block_job(ctx.vm_uuid, target)
                if job is None:
                    raise MigrationFailed(
                        f"the mirror of {target} disappeared",
                        code="AGENT.BLOCK_JOB_GONE",
                        details="libvirt or QEMU ended the job; see the libvirt log",
                    )
                guest = max(0, writes[target] - mirror.written_at_start)
                cur, end = job.cur, job.end
                if mirror.mode is Mode.WRITE_BLOCKING:
                    # QEMU counts the guest's synchronous copies as progress too; the rest is background.
                    cur = max(0, cur - guest)
                    end = max(cur, end - guest)
                sample = MirrorSample(cur, end, mirror.disk.virtual_size, mirror.index, mirror.ready)
                mirror.done, mirror.total = real_bytes_done(sample)
                # READY says the copy is complete, not that the background moved it all (write-blocking
                # writes covered part): the budget counts what the background really moved.
                copied = real_bytes_done(dataclasses.replace(sample, ready=False))[0]
                moved = max(0, copied - mirror.copied) if mirror.copied >= 0 else 0
                mirror.copied = max(mirror.copied, copied)
                new_writes = max(0, writes[target] - mirror.written)
                mirror.written = writes[target]
                interval.add(moved, new_writes if mirror.mode is Mode.WRITE_BLOCKING else 0)
                work.meter.add(sampled, moved + (new_writes if mirror.mode is Mode.WRITE_BLOCKING else 0))
                ctx.progress(f"disk:{target}", mirror.done, mirror.total)
                assert mirror.watch is not None
                mirror.watch.observe(sampled, writes[target], mirror.total - mirror.done)
                samples[target] = sample
            shares = hotdisk.disk_shares(ctx.bandwidth, self._watches(work), self._ready(work))
            for target, mirror in work.mirrors.items():
                assert mirror.watch is not None
                share = shares.get(target)
                if not mirror.ready and hotdisk.cannot_converge(mirror.watch, share, sampled):
                    assert share is not None and ctx.bandwidth is not None
                    if not may_block:
                        raise hotdisk.disk_verdict(mirror.watch, share, ctx.bandwidth, len(work.mirrors))
                    self._decide(
                        ctx,
                        work,
                        f"{target} losing at its share: its mirror restarts in write-blocking mode",
                        disk=target,
                        guestWriteBytesPerSecond=int(mirror.watch.write_bps),
                        shareBytesPerSecond=share,
                        remainingBytes=mirror.total - mirror.done,
                    )
                    await self._restart_write_blocking(ctx, work, mirror)
                    continue
                speed = job_speed(samples[target], share, horizon)
                ctx.log.debug(
                    "disk steering: %s at %d/%d (%d real bytes done), guest %d B/s, %s, speed %d -> %d B/s "
                    "for %.2f s",
                    target,
                    samples[target].cur,
                    samples[target].end,
                    mirror.done,
                    int(mirror.watch.write_bps),
                    mirror.mode.value,
                    mirror.speed,
                    speed,
                    horizon,
                )
                if worth_changing(mirror.speed, speed, POSITIONAL_SLACK):
                    await self.host.set_block_job_speed(ctx.vm_uuid, target, speed)
                    mirror.speed = speed
            if sampled - figures_at >= FIGURES_EVERY_S:
                figures_at = sampled
                ctx.note("disks", self._figures(work, shares))
                if (rates := interval.take(sampled, work.meter.started)) is not None:
                    work.rates.append({**rates, "capBytesPerSecond": ctx.bandwidth})
                    ctx.note("copyRates", work.rates[-120:])
            if all(m.ready for m in work.mirrors.values()):
                for mirror in work.mirrors.values():
                    if mirror.watch is not None:
                        mirror.watch.observe(sampled, mirror.written, 0)
                ctx.note("disks", self._figures(work, shares))
                return
            if time.monotonic() - last_xml_check > 5 * self.tick_s:
                # Fallback for a lost READY event: the live XML is the authority.
                last_xml_check = time.monotonic()
                for disk in parse_disks(await self.host.live_xml(ctx.vm_uuid)):
                    if disk.target in work.mirrors and disk.mirror_ready:
                        work.mirrors[disk.target].ready = True

    def _on_event(self, work: _Work, event: DomainEvent) -> None:
        if event.kind != "block-job" or event.job_type != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY:
            return
        mirror = next((m for t, m in work.mirrors.items() if event.disk in (t, m.disk.src_top)), None)
        if mirror is None:
            return
        ended = (
            libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED,
            libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED,
            libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED,
        )
        if event.status in ended and mirror.ends_to_ignore:
            mirror.ends_to_ignore -= 1  # a mirror this task aborted to restart it
            return
        if event.status == libvirt.VIR_DOMAIN_BLOCK_JOB_READY:
            mirror.ready = True
        elif event.status in (libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED, libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED):
            what = "failed" if event.status == libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED else "was cancelled"
            raise MigrationFailed(
                f"the mirror of {mirror.disk.target} {what}",
                code="AGENT.BLOCK_JOB_FAILED",
                details="often the destination storage ran out of space; see the libvirt log",
            )

    # -- switch and verify ------------------------------------------------------------------------------

    async def _finish(self, ctx: TaskContext, work: _Work) -> list[dict[str, Any]]:
        try:
            await ctx.checkpoint(work.checkpoint_data(Step.SWITCHING))
            await ctx.enter(TaskState.SWITCHING)
        except BaseException:
            # Nothing is pivoted yet: a cancel landing here (CANCELLING admits no SWITCHING) undoes the copy
            # like one during it; leaving now would keep the mirrors running and the files behind.
            if not ctx.detaching:
                await self._abandon(ctx, work)
            raise
        # From the first pivot on there is no way back (a failed pivot is rolled back inside _switch): the
        # switch and the persistent definition's rewrite run to their end even when a cancel arrives, and
        # the task reports the truth (the VM runs from the destination).
        return await run_past_cancel(ctx, self._switch_and_verify(ctx, work))

    async def _switch_and_verify(self, ctx: TaskContext, work: _Work) -> list[dict[str, Any]]:
        await self._switch(ctx, work)
        await ctx.checkpoint(work.checkpoint_data(Step.VERIFYING))
        await announce(ctx, TaskState.VERIFYING)
        inventory = await self._verify(ctx, work)
        await self._carry_snapshots(ctx, work.plan)
        return inventory

    async def _carry_snapshots(self, ctx: TaskContext, plan: MigrationPlan) -> None:
        """Point libvirt's snapshot metadata at the moved files (``agent.migration.snapshots``), so that
        snapshot-list and a revert use the new storage. The VM already runs there: a failure is reported,
        not fatal."""
        try:
            metas = await self.host.call_domain(ctx.vm_uuid, snapshots.read_snapshots)
            if not metas:
                return
            moved = {layer.src: layer.dst for layer in plan.layers}
            moved.update({d.src_top: d.dst_top for d in plan.disks})
            rewritten = [
                snapshots.SnapshotMeta(m.name, snapshots.rewrite_snapshot(m.xml, moved), m.current)
                for m in metas
            ]
            await self.host.call_domain(ctx.vm_uuid, lambda dom: snapshots.redefine_snapshots(dom, rewritten))
        except AgentError as err:
            ctx.log.error("snapshot metadata not rewritten: %s", err.description)
            ctx.note("snapshots", {"error": err.description})
            return
        ctx.log.info("snapshot metadata rewritten to the new paths: %s", ", ".join(m.name for m in metas))
        ctx.note(
            "snapshots",
            {"carried": [m.name for m in metas], "current": next((m.name for m in metas if m.current), None)},
        )

    async def _switch(self, ctx: TaskContext, work: _Work) -> None:
        pivoted: list[str] = []
        failure: AgentError | None = None
        for target in work.mirrors:
            try:
                await self._through_outage(
                    ctx, f"pivot of {target}", functools.partial(self._pivot, ctx, work.mirrors[target].disk)
                )
                pivoted.append(target)
            except AgentError as err:
                ctx.log.error("pivot of %s failed: %s", target, err.description)
                failure = err
                break
        if failure is None:
            ctx.log.info("all %d disks pivoted to storage %s", len(pivoted), work.plan.dst_storage_uuid)
            return
        # Keep one consistent set of volumes: put the pivoted disks back on their source files.
        for target in work.mirrors:
            if target not in pivoted:
                with contextlib.suppress(AgentError):
                    await self._through_outage(
                        ctx,
                        f"abort of {target}",
                        functools.partial(self.host.abort_block_job, ctx.vm_uuid, target),
                    )
        for target in pivoted:
            await self._mirror_back(ctx, work.mirrors[target].disk)
        await self._remove_created(ctx, work)
        raise MigrationFailed(
            "a pivot failed; every disk runs from its source volume again",
            code="AGENT.PIVOT_FAILED",
            details=f"pivoted then rolled back: {', '.join(pivoted) or 'none'}",
        ) from failure

    async def _pivot(self, ctx: TaskContext, disk: DiskPlan) -> None:
        """Pivot one disk; taken again after a libvirtd outage, it first looks whether the pivot happened
        before the outage cut the call (no job left, the live source already the destination top)."""
        if await self.host.block_job(ctx.vm_uuid, disk.target) is None:
            live = {d.target: d.source for d in parse_disks(await self.host.live_xml(ctx.vm_uuid))}
            if live.get(disk.target) == str(disk.dst_top):
                return
        await self.host.abort_block_job(ctx.vm_uuid, disk.target, pivot=True)

    async def _through_outage(self, ctx: TaskContext, what: str, call: Callable[[], Awaitable[None]]) -> None:
        """A libvirt step that a libvirtd restart must not fail: QEMU keeps the block jobs and libvirt takes
        them back when it reconnects (measured, libvirt 9.0), so the step waits for it (``LIBVIRT_OUTAGE_S``)
        and is taken again. Found by the fault matrix: a restart at the pivot failed the task and left both
        mirrors running."""
        deadline = time.monotonic() + LIBVIRT_OUTAGE_S
        while True:
            try:
                await call()
                return
            except VirtError as err:
                if err.code != UNREACHABLE or time.monotonic() > deadline:
                    raise
                ctx.log.warning("%s: libvirtd is not answering (%s); waiting for it", what, err.description)
            if not await self.host.wait_reachable(max(1.0, deadline - time.monotonic())):
                raise MigrationFailed(
                    f"{what}: libvirtd did not come back within {LIBVIRT_OUTAGE_S:.0f} s", code=UNREACHABLE
                )
            await asyncio.sleep(1.0)  # libvirt takes the block jobs back right after it reconnects

    async def _mirror_back(self, ctx: TaskContext, disk: DiskPlan) -> None:
        """Copy a pivoted disk back onto its (intact) source top and pivot to it."""
        flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        if not disk.flatten:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
        dest = block_copy_dest_xml(disk.src_top, disk.src_format)
        await self.host.block_copy(ctx.vm_uuid, disk.target, dest, bandwidth=None, flags=flags)
        while True:
            job = await self.host.block_job(ctx.vm_uuid, disk.target)
            if job is None:
                raise MigrationFailed(
                    f"rolling {disk.target} back to {disk.src_top} failed", code="AGENT.ROLLBACK_FAILED"
                )
            if any(
                d.target == disk.target and d.mirror_ready
                for d in parse_disks(await self.host.live_xml(ctx.vm_uuid))
            ):
                break
            await asyncio.sleep(self.tick_s)
        await self.host.abort_block_job(ctx.vm_uuid, disk.target, pivot=True)
        ctx.log.warning("disk %s rolled back to %s", disk.target, disk.src_top)

    async def _verify(self, ctx: TaskContext, work: _Work) -> list[dict[str, Any]]:
        expected = {d.target: (d.dst_top, d.dst_format) for d in work.plan.disks}
        live = parse_disks(await self.host.live_xml(ctx.vm_uuid))
        for disk in live:
            if disk.target in expected and disk.source != expected[disk.target][0]:
                raise MigrationFailed(
                    f"after the switch {disk.target} uses {disk.source}, not {expected[disk.target][0]}",
                    code="AGENT.VERIFY_FAILED",
                )
        if await self.host.is_persistent(ctx.vm_uuid):
            inactive = await self.host.inactive_xml(ctx.vm_uuid)
            await self.host.define_xml(rewrite_disk_sources(inactive, expected))
            for disk in parse_disks(await self.host.inactive_xml(ctx.vm_uuid)):
                if disk.target in expected and disk.source != expected[disk.target][0]:
                    raise MigrationFailed(
                        f"the persistent definition still points {disk.target} at {disk.source}",
                        code="AGENT.VERIFY_FAILED",
                    )
        for moved in work.plan.disks:
            chain = await qemuimg.backing_chain(moved.dst_top)
            want = 1 if moved.flatten else len(moved.src_chain)
            if moved.precreated:  # below a pre-created top the chain is the caller's
                want = 1 if moved.flatten else len(chain)
            owned = chain[:1] if moved.precreated else chain[:want]
            if len(chain) != want or any(not self.roots.owner_of(layer.path) for layer in owned):
                raise MigrationFailed(
                    f"the chain of {moved.target} at the destination is not as planned",
                    code="AGENT.VERIFY_FAILED",
                    details=" <- ".join(layer.path for layer in chain),
                )
            total = work.mirrors[moved.target].total
            ctx.progress(f"disk:{moved.target}", total, total)
        return await volume_inventory(live, work.plan, self.roots)

    # -- failure paths ----------------------------------------------------------------------------------

    async def _abandon(self, ctx: TaskContext, work: _Work) -> None:
        """Undo everything before the switch: mirrors aborted without pivot, created files removed."""
        await asyncio.shield(self._abandon_inner(ctx, work))

    async def _abandon_inner(self, ctx: TaskContext, work: _Work) -> None:
        if work.mirrors and not await self.host.wait_reachable(LIBVIRT_OUTAGE_S):
            # A mirror may still be writing into the destination files: removing them would leave a block
            # job on a deleted file that the next attempt trips over. Keep them and say so.
            ctx.log.error("libvirtd unreachable: mirrors not aborted, destination files kept")
            ctx.note("destinationFilesKept", list(work.created))
            return
        for target in work.mirrors:
            try:
                if await self.host.block_job(ctx.vm_uuid, target) is not None:
                    await self.host.abort_block_job(ctx.vm_uuid, target)
                    for _ in range(100):  # the abort completes asynchronously in QEMU
                        if await self.host.block_job(ctx.vm_uuid, target) is None:
                            break
                        await asyncio.sleep(0.1)
            except AgentError as err:
                ctx.log.error("could not abort the mirror of %s: %s", target, err.description)
        await self._remove_created(ctx, work)
        ctx.log.info(
            "abandoned: mirrors aborted, %d destination files removed; VM %s stays on its source volumes",
            len(work.created),
            ctx.vm_uuid,
        )

    async def _remove_created(self, ctx: TaskContext, work: _Work) -> None:
        for path in reversed(work.created):
            if not self.roots.owner_of(path):
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                ctx.log.error("could not remove %s: %s", path, err.strerror)

    # -- resume after an agent restart ------------------------------------------------------------------

    async def _resume(self, ctx: TaskContext, data: Any) -> list[dict[str, Any]]:
        """Continue a task from its journal after the agent was killed or stopped. By the last step taken:

        - ``switching`` / ``verifying``: pivots may have happened. Every disk on the destination: verified
          (persistent definition rewritten); some: the rest are pivoted forward (their mirrors were READY);
          none: as ``mirroring`` failing below. Past a pivot a cancel cannot undo anything.
        - ``mirroring``: when every mirror is still there (libvirt keeps block jobs across agent restarts)
          they are picked up, paced until READY and pivoted: the task continues.
        - anything else, or a mirror gone, or a cancel journalled before the restart: fails cleanly, i.e.
          mirrors aborted without pivot, every file the journal names removed, the VM on its sources.
        """
        work = _Work(
            MigrationPlan.from_dict(data["plan"]),
            created=list(data.get("created", [])),
            reused=list(data.get("reused", [])),
        )
        step = data.get("step")
        ctx.log.info("resuming at step %s", step)
        # No await before these branches: the cancel the manager delivers to a resumed CANCELLING task
        # must land inside them (past a pivot it is absorbed, before one it undoes the copy).
        if step in (Step.SWITCHING, Step.VERIFYING):
            with contextlib.suppress(_NothingSwitched):
                return await run_past_cancel(ctx, self._resume_switch(ctx, work))
        if step == Step.MIRRORING:
            try:
                picked_up = await self._pick_up_mirrors(ctx, work)
            except BaseException:
                if not ctx.detaching:
                    await self._abandon(ctx, work)
                raise
            if picked_up:
                return await self._finish(ctx, work)
        for disk in work.plan.disks:
            work.mirrors.setdefault(disk.target, _Mirror(disk, AllocationIndex([])))
        await self._abandon(ctx, work)
        if ctx.cancel_requested:  # journalled before the restart: the task ends CANCELLED, cleaned up
            raise asyncio.CancelledError()
        raise MigrationFailed(
            f"the agent restarted during step {step!r}; the partial copy was removed and the VM stays on "
            "its source volumes",
            code="AGENT.INTERRUPTED",
            details="send the request again to retry",
        )

    async def _pick_up_mirrors(self, ctx: TaskContext, work: _Work) -> bool:
        """Pace the mirrors a previous life started until all are READY; False when one is gone (or the
        user cancelled while the agent was down): then the caller abandons."""
        await self.host.wait_reachable(LIBVIRT_OUTAGE_S)
        await self._raise_if_stopped(ctx, None)
        jobs = [await self.host.block_job(ctx.vm_uuid, d.target) for d in work.plan.disks]
        for disk in work.plan.disks:
            work.mirrors[disk.target] = _Mirror(disk, AllocationIndex([]))
        if ctx.cancel_requested or not all(job is not None for job in jobs):
            return False
        blocking = set((ctx.resume_data or {}).get("writeBlocking", []))
        written = await self.host.block_writes(ctx.vm_uuid, [d.target for d in work.plan.disks])
        for disk in work.plan.disks:
            mirror = work.mirrors[disk.target]
            mirror.index = await allocation_index(disk)
            if disk.target in blocking and mirror.watch is not None:
                mirror.watch.mode = Mode.WRITE_BLOCKING
            # The guest's writes before the restart are unknown: the background part is estimated from here,
            # and what was copied before counts from the first sample on (-1).
            mirror.written_at_start = mirror.written = written[disk.target]
            mirror.copied = -1
        work.meter.start(time.monotonic())
        events = self.host.subscribe(ctx.vm_uuid)
        try:
            await self._pace(ctx, work, events)
        finally:
            self.host.unsubscribe(ctx.vm_uuid, events)
        return True

    async def _resume_switch(self, ctx: TaskContext, work: _Work) -> list[dict[str, Any]]:
        await self.host.wait_reachable(LIBVIRT_OUTAGE_S)
        await self._refuse_if_stopped_after_switch(ctx, work)
        live = {d.target: d for d in parse_disks(await self.host.live_xml(ctx.vm_uuid))}
        on_dst = [d for d in work.plan.disks if live.get(d.target) and live[d.target].source == d.dst_top]
        if not on_dst:
            raise _NothingSwitched
        for disk in work.plan.disks:
            work.mirrors[disk.target] = _Mirror(disk, await self._allocation_or_empty(disk))
        # Interrupted between pivots: pivot the rest forward (their mirrors were ready).
        for disk in work.plan.disks:
            if disk not in on_dst:
                await self.host.abort_block_job(ctx.vm_uuid, disk.target, pivot=True)
        await announce(ctx, TaskState.VERIFYING)
        return await self._verify(ctx, work)

    async def _refuse_if_stopped_after_switch(self, ctx: TaskContext, work: _Work) -> None:
        """The agent died at or after the switch and the VM was shut down before it came back: whether the
        pivots happened cannot be read from a stopped domain, and the destination files may hold the
        newest writes. Remove nothing, change nothing, and say which files are which."""
        try:
            state = await self.host.domain_state(ctx.vm_uuid)
        except NotFound:
            state = "undefined"
        if state in ("running", "paused"):
            return
        raise MigrationFailed(
            f"VM {ctx.vm_uuid} is {state}: the agent restarted during the switch and cannot tell which "
            "volumes hold its latest writes; nothing was changed or removed",
            code="AGENT.VM_STOPPED",
            details="sources: "
            + ", ".join(d.src_top for d in work.plan.disks)
            + "; destinations: "
            + ", ".join(d.dst_top for d in work.plan.disks),
        )

    async def _allocation_or_empty(self, disk: DiskPlan) -> AllocationIndex:
        try:
            return await allocation_index(disk)
        except StorageError:
            return AllocationIndex([])
