"""SWITCHING: when every mirror is READY, pivot them all (``VirtHost.abort_block_job(pivot=True)``). If one
pivot fails, the disks already pivoted are mirrored back onto their source files, so the VM runs from one
consistent set: all source or all destination. A libvirtd restart during a pivot is waited out."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import libvirt

from agent.config import StorageKind
from agent.errors import AgentError, Code, MigrationFailed, VirtError
from agent.migration.engine import Step, TaskContext, announce, run_past_cancel
from agent.migration.plan import DiskPlan
from agent.migration.samehost.abandon import abandon, remove_created
from agent.migration.samehost.verify import carry_snapshots, verify
from agent.migration.samehost.work import Work
from agent.migration.states import TaskState
from agent.migration.volumes import volume_source
from agent.storage.roots import StorageRoots
from agent.virt.domxml import block_copy_dest_xml, parse_disks
from agent.virt.host import LIBVIRT_OUTAGE_S, UNREACHABLE, VirtHost


async def finish(
    host: VirtHost, roots: StorageRoots, ctx: TaskContext, work: Work, *, tick_s: float
) -> list[dict[str, Any]]:
    """Every mirror is READY: switch, then verify; from the first pivot on, past any cancel."""
    try:
        await ctx.checkpoint(work.checkpoint_data(Step.SWITCHING))
        await ctx.enter(TaskState.SWITCHING)
    except BaseException:
        # Nothing is pivoted yet: a cancel landing here (CANCELLING admits no SWITCHING) undoes the copy
        # like one during it; leaving now would keep the mirrors running and the files behind.
        if not ctx.detaching:
            await abandon(host, roots, ctx, work)
        raise
    # From the first pivot on there is no way back (a failed pivot is rolled back inside switch): the
    # switch and the persistent definition's rewrite run to their end even when a cancel arrives, and
    # the task reports the truth (the VM runs from the destination).
    return await run_past_cancel(ctx, _switch_and_verify(host, roots, ctx, work, tick_s=tick_s))


async def _switch_and_verify(
    host: VirtHost, roots: StorageRoots, ctx: TaskContext, work: Work, *, tick_s: float
) -> list[dict[str, Any]]:
    await switch(host, roots, ctx, work, tick_s=tick_s)
    await ctx.checkpoint(work.checkpoint_data(Step.VERIFYING))
    await announce(ctx, TaskState.VERIFYING)
    inventory = await verify(host, roots, ctx, work)
    await carry_snapshots(host, ctx, work.plan)
    return inventory


async def switch(host: VirtHost, roots: StorageRoots, ctx: TaskContext, work: Work, *, tick_s: float) -> None:
    pivoted: list[str] = []
    failure: AgentError | None = None
    for target in work.mirrors:
        try:
            await through_outage(
                host,
                ctx,
                f"pivot of {target}",
                functools.partial(pivot, host, ctx, work.mirrors[target].disk),
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
                await through_outage(
                    host,
                    ctx,
                    f"abort of {target}",
                    functools.partial(host.abort_block_job, ctx.vm_uuid, target),
                )
    stuck: dict[str, str] = {}
    for target in pivoted:
        disk = work.mirrors[target].disk
        try:
            await _mirror_back(host, roots, ctx, disk, tick_s=tick_s)
        except MigrationFailed as err:
            ctx.log.error("rolling %s back failed: %s", target, err.description)
            stuck[target] = f"{target} runs from {disk.dst_top} ({err.description})"
    if stuck:
        # The destination files of the stuck disks are in use: nothing is removed.
        back = [t for t in pivoted if t not in stuck]
        raise MigrationFailed(
            "a pivot failed and putting the pivoted disks back did not finish: the VM runs from a mixed set "
            "of volumes",
            code=Code.ROLLBACK_FAILED,
            details="; ".join(stuck.values())
            + (f"; back on their sources: {', '.join(back)}" if back else "")
            + ". Nothing was removed. Move the VM's storage again to one storage (this task's destination "
            "is the shortest way) or copy the named disks back by hand",
        ) from failure
    await remove_created(host, roots, ctx, work)
    raise MigrationFailed(
        "a pivot failed; every disk runs from its source volume again",
        code=Code.PIVOT_FAILED,
        details=f"pivoted then rolled back: {', '.join(pivoted) or 'none'}",
    ) from failure


async def pivot(host: VirtHost, ctx: TaskContext, disk: DiskPlan) -> None:
    """Pivot one disk; taken again after a libvirtd outage, it first looks whether the pivot happened
    before the outage cut the call (no job left, the live source already the destination top)."""
    if await host.block_job(ctx.vm_uuid, disk.target) is None:
        live = {d.target: d.location for d in parse_disks(await host.live_xml(ctx.vm_uuid))}
        if live.get(disk.target) == str(disk.dst_top):
            return
    await host.abort_block_job(ctx.vm_uuid, disk.target, pivot=True)


async def through_outage(
    host: VirtHost, ctx: TaskContext, what: str, call: Callable[[], Awaitable[None]]
) -> None:
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
        if not await host.wait_reachable(max(1.0, deadline - time.monotonic())):
            raise MigrationFailed(
                f"{what}: libvirtd did not come back within {LIBVIRT_OUTAGE_S:.0f} s", code=UNREACHABLE
            )
        await asyncio.sleep(1.0)  # libvirt takes the block jobs back right after it reconnects


#: A copy back (the rollback of a pivoted disk) whose progress stands still this long is given up.
ROLLBACK_STALL_S = 60.0


def _stop_rollback_wait(ctx: TaskContext, still_s: float) -> str | None:
    """Why waiting for a copy back to become READY must stop now, if it must."""
    if still_s > ROLLBACK_STALL_S:
        return f"the copy made no progress for {ROLLBACK_STALL_S:.0f} s"
    if ctx.cancel_requested:
        return "the task was cancelled"
    if ctx.deadline is not None and ctx.deadline.passed():
        return "the task's timeout passed"
    return None


async def _mirror_back(
    host: VirtHost, roots: StorageRoots, ctx: TaskContext, disk: DiskPlan, *, tick_s: float
) -> None:
    """Copy a pivoted disk back onto its (intact) source top and pivot to it (an RBD image through the
    access of the storage that holds it)."""
    flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
    if not disk.flatten:
        flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
    held = roots.owner_of_location(disk.src_top) if disk.src_kind is StorageKind.RBD else None
    source = volume_source(held, disk.src_kind, disk.src_top, disk.src_format)
    dest = block_copy_dest_xml(dataclasses.replace(source, size=disk.src_source().size))
    await host.block_copy(ctx.vm_uuid, disk.target, dest, bandwidth=None, flags=flags)
    # Bounded: this runs past a cancel (run_past_cancel), so its own limits are the only ones. A mirror
    # that makes no progress, a cancel, or the task's deadline ends the wait; the disk then stays on the
    # destination, which the caller reports.
    last_cur, moved_at = -1, time.monotonic()
    while True:
        job = await host.block_job(ctx.vm_uuid, disk.target)
        if job is None:
            raise MigrationFailed(
                f"rolling {disk.target} back to {disk.src_top} failed: the copy back disappeared",
                code=Code.ROLLBACK_FAILED,
            )
        if any(
            d.target == disk.target and d.mirror_ready for d in parse_disks(await host.live_xml(ctx.vm_uuid))
        ):
            break
        if job.cur != last_cur:
            last_cur, moved_at = job.cur, time.monotonic()
        why = _stop_rollback_wait(ctx, time.monotonic() - moved_at)
        if why is not None:
            with contextlib.suppress(AgentError):
                await host.abort_block_job(ctx.vm_uuid, disk.target)
            raise MigrationFailed(
                f"rolling {disk.target} back to {disk.src_top} stopped: {why}", code=Code.ROLLBACK_FAILED
            )
        await asyncio.sleep(tick_s)
    await host.abort_block_job(ctx.vm_uuid, disk.target, pivot=True)
    ctx.log.warning("disk %s rolled back to %s", disk.target, disk.src_top)
