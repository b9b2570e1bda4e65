"""COPYING, second part: read the guest's write rates (from counters sampled before the request), start
every disk's mirror (in write-blocking mode where the guest writes near the disk's share), and pace them all
with the shared mirror pacer until every one is READY. A libvirtd restart is waited out (the mirrors run on
in QEMU); a VM shut down under the copy is ``AGENT.VM_STOPPED``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from agent.errors import AgentError, Code, MigrationFailed, NotFound, VirtError
from agent.migration.engine import Step, TaskContext
from agent.migration.limits import Effective, LiveLimits, Targets
from agent.migration.mirrors import hotdisk
from agent.migration.mirrors.guestwrites import read_guest_writes
from agent.migration.mirrors.hotdisk import DiskWatch, Mode
from agent.migration.mirrors.pacer import EQUAL_SHARES, JobFigures, MirrorPacer, judge_budget
from agent.migration.mirrors.speeds import SteeringClock
from agent.migration.request import Strategy
from agent.migration.samehost.mirrors import on_event, restart_write_blocking, start_mirror
from agent.migration.samehost.streams import BlockJobStreams
from agent.migration.samehost.work import Mirror, Work
from agent.migration.volumes import source_index
from agent.virt.domxml import parse_disks
from agent.virt.host import LIBVIRT_OUTAGE_S, UNREACHABLE, DomainEvent, VirtHost
from agent.virt.states import DomainState
from agent.virt.writes import WriteHistory


async def mirror_until_ready(
    host: VirtHost, ctx: TaskContext, work: Work, *, tick_s: float, history: WriteHistory | None = None
) -> None:
    await host.ensure_connected()
    events = host.subscribe(ctx.vm_uuid)
    try:
        for disk in work.plan.disks:
            index = await source_index(host, ctx.vm_uuid, disk)
            work.mirrors[disk.target] = Mirror.of(disk, index, DiskWatch(disk.target))
        await _measure_writes(host, ctx, work, history)
        shares = hotdisk.disk_shares(ctx.bandwidth, work.watches, set())
        may_block = ctx.request.primaryStorageMigrateVm.strategy is not Strategy.PRECOPY
        for target, mirror in work.mirrors.items():
            assert mirror.watch is not None
            write = mirror.watch.write_bps
            if may_block and hotdisk.start_write_blocking(write, shares[target]):
                mirror.watch.mode = Mode.WRITE_BLOCKING
                work.decide(
                    ctx,
                    f"{target} mirrored in write-blocking mode from the start",
                    disk=target,
                    guestWriteBytesPerSecond=int(write),
                    shareBytesPerSecond=shares[target],
                )
        shares = hotdisk.disk_shares(ctx.bandwidth, work.watches, set())
        await ctx.checkpoint(work.checkpoint_data(Step.MIRRORING))
        work.meter.start(time.monotonic())
        for target, mirror in work.mirrors.items():
            await start_mirror(host, ctx, work, mirror, shares[target])
        await pace(host, ctx, work, events, tick_s=tick_s)
        judge_budget(ctx, work.meter, work.watches)
    finally:
        host.unsubscribe(ctx.vm_uuid, events)


async def _measure_writes(host: VirtHost, ctx: TaskContext, work: Work, history: WriteHistory | None) -> None:
    """Every disk's watch gets the guest's writes from before the copy (a capped task only needs the rate:
    read from the samples the agent took before the request, see ``guestwrites``)."""
    reading = await read_guest_writes(
        host, history, ctx.vm_uuid, list(work.mirrors), with_rate=ctx.bandwidth is not None
    )
    for sample in reading.samples:
        for target, mirror in work.mirrors.items():
            assert mirror.watch is not None
            mirror.watch.observe(sample.at, sample.written[target], mirror.index.total)
    if ctx.bandwidth is None:
        return
    if reading.waited_s:
        ctx.log.info(
            "no guest write counters from before the request: measured them for %.1f s", reading.waited_s
        )
    ctx.note("guestWrites", reading.figures())
    ctx.note("disks", work.figures(hotdisk.disk_shares(ctx.bandwidth, work.watches, set())))


async def pace(
    host: VirtHost, ctx: TaskContext, work: Work, events: asyncio.Queue[DomainEvent], *, tick_s: float
) -> None:
    """Steer every mirror's speed from its allocation map until all are READY, every change through the
    move's ``LiveLimits`` (which a PATCH uses meanwhile). A libvirtd restart is waited out (the mirrors run
    on in QEMU); a VM shut down under the copy is ``AGENT.VM_STOPPED``."""
    streams = BlockJobStreams(host, ctx, work)
    limits = LiveLimits(ctx, streams)
    ctx.attach_limits(limits)  # no await since the limits read ctx.bandwidth: no PATCH falls between
    try:
        await _through_outages(
            host, ctx, lambda: _pace_until_ready(host, ctx, work, events, limits, streams, tick_s=tick_s)
        )
    finally:
        ctx.attach_limits(None)


async def _through_outages(
    host: VirtHost, ctx: TaskContext, pace_until_ready: Callable[[], Awaitable[None]]
) -> None:
    """Pace until every mirror is READY, taking the pacing up again after a libvirtd restart."""
    while True:
        try:
            await pace_until_ready()
            return
        except VirtError as err:
            if err.code != UNREACHABLE:
                await raise_if_stopped(host, ctx, err)
                raise
            ctx.log.warning("libvirtd unreachable (%s); waiting for it, the mirrors run on", err.description)
            if not await host.wait_reachable():
                raise MigrationFailed(
                    f"libvirtd did not come back within {LIBVIRT_OUTAGE_S:.0f} s",
                    code=UNREACHABLE,
                    details="the copy was abandoned; the VM stays on its source volumes",
                ) from err
            ctx.log.info("libvirtd is back; picking the mirrors up again")
        except MigrationFailed as err:
            if err.code in (Code.BLOCK_JOB_GONE, Code.BLOCK_JOB_FAILED):
                await raise_if_stopped(host, ctx, err)
            raise


async def raise_if_stopped(host: VirtHost, ctx: TaskContext, err: AgentError | None) -> None:
    """Raise ``AGENT.VM_STOPPED`` (caused by ``err``) when the VM no longer runs: its user shut it down
    and its mirrors ended with it."""
    try:
        state = await host.domain_state(ctx.vm_uuid)
    except NotFound:
        state = DomainState.UNDEFINED
    except AgentError:
        return
    if state in (DomainState.RUNNING, DomainState.PAUSED):
        return
    raise MigrationFailed(
        f"VM {ctx.vm_uuid} was shut down during the copy (now {state})",
        code=Code.VM_STOPPED,
        details="the copy was abandoned; the VM's definition keeps its source volumes",
    ) from err


async def _pace_until_ready(
    host: VirtHost,
    ctx: TaskContext,
    work: Work,
    events: asyncio.Queue[DomainEvent],
    limits: LiveLimits,
    streams: BlockJobStreams,
    *,
    tick_s: float,
) -> None:
    last_xml_check = 0.0
    # A speed that crosses a hole must be replaced before the job reaches the data behind it: when libvirt
    # answers late (another task's slow calls, a busy host), plan for the gaps seen between samples.
    clock = SteeringClock(tick_s, first_s=tick_s, margin=1.0)
    pacer = MirrorPacer(ctx, EQUAL_SHARES, clock, work.mirrors, work.meter, work.rates, limits=limits)
    streams.pacer = pacer
    may_block = ctx.request.primaryStorageMigrateVm.strategy is not Strategy.PRECOPY
    while True:
        deadline = time.monotonic() + tick_s
        while (timeout := deadline - time.monotonic()) > 0:
            try:
                event = await asyncio.wait_for(events.get(), timeout)
            except TimeoutError:
                break
            on_event(work, event)
        sampled = time.monotonic()
        writes = await host.block_writes(ctx.vm_uuid, list(work.mirrors))
        jobs: dict[str, JobFigures] = {}
        in_effect: dict[str, int] = {}
        for target, mirror in work.mirrors.items():
            job = await host.block_job(ctx.vm_uuid, target)
            if job is None:
                raise MigrationFailed(
                    f"the mirror of {target} disappeared",
                    code=Code.BLOCK_JOB_GONE,
                    details="libvirt or QEMU ended the job; see the libvirt log",
                )
            jobs[target] = JobFigures(job.cur, job.end, mirror.ready)  # READY comes from events and the XML
            in_effect[target] = mirror.speed = job.bandwidth  # what QEMU runs it at, not what was asked
        limits.observe(Effective(disks=in_effect, read_at=time.time()))
        generation = limits.generation  # the budget the shares are made under
        samples = pacer.observe(sampled, jobs, writes)
        shares = pacer.shares(samples)
        losing = pacer.losing(shares, sampled)
        for target, mirror in work.mirrors.items():
            share = shares.get(target)
            if target in losing:
                budget = pacer.budget
                assert mirror.watch is not None and share is not None and budget is not None
                if not may_block:
                    raise hotdisk.disk_verdict(mirror.watch, share, budget, len(work.mirrors))
                work.decide(
                    ctx,
                    f"{target} losing at its share: its mirror restarts in write-blocking mode",
                    disk=target,
                    guestWriteBytesPerSecond=int(mirror.watch.write_bps),
                    shareBytesPerSecond=share,
                    remainingBytes=mirror.total - mirror.done,
                )
                await restart_write_blocking(host, ctx, work, mirror)
                continue
            speed = pacer.next_speed(target, samples[target], share)
            if speed is not None:
                await limits.apply(Targets(disks={target: speed}), generation)
        pacer.figures(sampled, shares)
        if all(m.ready for m in work.mirrors.values()):
            for mirror in work.mirrors.values():
                if mirror.watch is not None:
                    mirror.watch.observe(sampled, mirror.written, 0)
            pacer.figures(sampled, shares, force=True)
            return
        if time.monotonic() - last_xml_check > 5 * tick_s:
            # Fallback for a lost READY event: the live XML is the authority.
            last_xml_check = time.monotonic()
            for disk in parse_disks(await host.live_xml(ctx.vm_uuid)):
                if disk.target in work.mirrors and disk.mirror_ready:
                    work.mirrors[disk.target].ready = True
