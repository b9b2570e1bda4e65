"""After an agent restart: continue the task from its journal, or undo it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from agent.errors import Code, MigrationFailed, NotFound, PreflightFailed, StorageError
from agent.migration.engine import Step, TaskContext, announce, run_past_cancel
from agent.migration.mirrors.hotdisk import Mode
from agent.migration.mirrors.speeds import AllocationIndex
from agent.migration.plan import DiskPlan, MigrationPlan, allocation_index
from agent.migration.samehost.abandon import abandon
from agent.migration.samehost.steering import pace, raise_if_stopped
from agent.migration.samehost.switch import finish
from agent.migration.samehost.verify import verify
from agent.migration.samehost.work import Mirror, Work
from agent.migration.states import TaskState
from agent.migration.volumes import source_index
from agent.storage.roots import StorageRoots
from agent.virt.domxml import parse_disks
from agent.virt.host import VirtHost
from agent.virt.states import DomainState


class _NothingSwitched(Exception):
    """Resuming at the switch found no disk pivoted: the copy is abandoned like an interrupted one."""


async def resume(
    host: VirtHost, roots: StorageRoots, ctx: TaskContext, data: Any, *, tick_s: float
) -> list[dict[str, Any]]:
    """Continue a task from its journal after the agent was killed or stopped. By the last step taken:

    - ``switching`` / ``verifying``: pivots may have happened. Every disk on the destination: verified
      (persistent definition rewritten); some: the rest are pivoted forward (their mirrors were READY);
      none: as ``mirroring`` failing below. Past a pivot a cancel cannot undo anything.
    - ``mirroring``: when every mirror is still there (libvirt keeps block jobs across agent restarts)
      they are picked up, paced until READY and pivoted: the task continues.
    - anything else, or a mirror gone, or a cancel journalled before the restart: fails cleanly, i.e.
      mirrors aborted without pivot, every file the journal names removed, the VM on its sources.
    """
    plan = MigrationPlan.from_dict(data["plan"])
    work = Work(
        plan,
        roots.storage(plan.dst_storage_uuid),
        created=list(data.get("created", [])),
        reused=list(data.get("reused", [])),
    )
    step = data.get("step")
    ctx.log.info("resuming at step %s", step)
    # No await before these branches: the cancel the manager delivers to a resumed CANCELLING task
    # must land inside them (past a pivot it is absorbed, before one it undoes the copy).
    if step in (Step.SWITCHING, Step.VERIFYING):
        with contextlib.suppress(_NothingSwitched):
            return await run_past_cancel(ctx, _resume_switch(host, roots, ctx, work))
    if step == Step.MIRRORING:
        try:
            picked_up = await _pick_up_mirrors(host, ctx, work, tick_s=tick_s)
        except BaseException:
            if not ctx.detaching:
                await abandon(host, roots, ctx, work)
            raise
        if picked_up:
            return await finish(host, roots, ctx, work, tick_s=tick_s)
    for disk in work.plan.disks:
        work.mirrors.setdefault(disk.target, Mirror.of(disk, AllocationIndex([])))
    await abandon(host, roots, ctx, work)
    if ctx.cancel_requested:  # journalled before the restart: the task ends CANCELLED, cleaned up
        raise asyncio.CancelledError()
    raise MigrationFailed(
        f"the agent restarted during step {step!r}; the partial copy was removed and the VM stays on "
        "its source volumes",
        code=Code.INTERRUPTED,
        details="send the request again to retry",
    )


async def _pick_up_mirrors(host: VirtHost, ctx: TaskContext, work: Work, *, tick_s: float) -> bool:
    """Pace the mirrors a previous life started until all are READY; False when one is gone (or the
    user cancelled while the agent was down): then the caller abandons."""
    await host.wait_reachable()
    await raise_if_stopped(host, ctx, None)
    jobs = [await host.block_job(ctx.vm_uuid, d.target) for d in work.plan.disks]
    for disk in work.plan.disks:
        work.mirrors[disk.target] = Mirror.of(disk, AllocationIndex([]))
    if ctx.cancel_requested or not all(job is not None for job in jobs):
        return False
    blocking = set((ctx.resume_data or {}).get("writeBlocking", []))
    written = await host.block_writes(ctx.vm_uuid, [d.target for d in work.plan.disks])
    for disk in work.plan.disks:
        mirror = work.mirrors[disk.target]
        mirror.index = await source_index(host, ctx.vm_uuid, disk)
        if disk.target in blocking and mirror.watch is not None:
            mirror.watch.mode = Mode.WRITE_BLOCKING
        # The guest's writes before the restart are unknown: the background part is estimated from here,
        # and what was copied before counts from the first sample on (-1).
        mirror.written_at_start = mirror.written = written[disk.target]
        mirror.copied = -1
    work.meter.start(time.monotonic())
    events = host.subscribe(ctx.vm_uuid)
    try:
        await pace(host, ctx, work, events, tick_s=tick_s)
    finally:
        host.unsubscribe(ctx.vm_uuid, events)
    return True


async def _resume_switch(
    host: VirtHost, roots: StorageRoots, ctx: TaskContext, work: Work
) -> list[dict[str, Any]]:
    await host.wait_reachable()
    await _refuse_if_stopped_after_switch(host, ctx, work)
    live = {d.target: d for d in parse_disks(await host.live_xml(ctx.vm_uuid))}
    on_dst = [d for d in work.plan.disks if live.get(d.target) and live[d.target].location == d.dst_top]
    if not on_dst:
        raise _NothingSwitched
    for disk in work.plan.disks:
        work.mirrors[disk.target] = Mirror.of(disk, await _allocation_or_empty(disk))
    # Interrupted between pivots: pivot the rest forward (their mirrors were ready).
    for disk in work.plan.disks:
        if disk not in on_dst:
            await host.abort_block_job(ctx.vm_uuid, disk.target, pivot=True)
    await announce(ctx, TaskState.VERIFYING)
    return await verify(host, roots, ctx, work)


async def _refuse_if_stopped_after_switch(host: VirtHost, ctx: TaskContext, work: Work) -> None:
    """The agent died at or after the switch and the VM was shut down before it came back: whether the
    pivots happened cannot be read from a stopped domain, and the destination files may hold the
    newest writes. Remove nothing, change nothing, and say which files are which."""
    try:
        state = await host.domain_state(ctx.vm_uuid)
    except NotFound:
        state = DomainState.UNDEFINED
    if state in (DomainState.RUNNING, DomainState.PAUSED):
        return
    raise MigrationFailed(
        f"VM {ctx.vm_uuid} is {state}: the agent restarted during the switch and cannot tell which "
        "volumes hold its latest writes; nothing was changed or removed",
        code=Code.VM_STOPPED,
        details="sources: "
        + ", ".join(d.src_top for d in work.plan.disks)
        + "; destinations: "
        + ", ".join(d.dst_top for d in work.plan.disks),
    )


async def _allocation_or_empty(disk: DiskPlan) -> AllocationIndex:
    """For the progress of a switch resumed: an RBD source is not mapped (its mirror is gone)."""
    try:
        return await allocation_index(disk)
    except (StorageError, PreflightFailed):
        return AllocationIndex([])
