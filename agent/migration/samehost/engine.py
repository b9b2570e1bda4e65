"""Same-host live storage migration: libvirt block copy of every moving disk, then one switch.

Steps, each journalled (``ctx.checkpoint``) before it is taken (the package's files, in the order the work
happens):
1. PREPARING (``prepare``): plan from the live XML and qemu-img chains; preflight (VM running, no block job,
   space, targets absent or identical shared layers).
2. COPYING (``copy``, ``mirrors``, ``steering``): lower layers copied as files (sparse, rate-limited,
   outside the guest's I/O path) and pointed at their new backing files; destination tops created; one
   mirror per disk (shallow unless a chain is flattened or the target may hold old bytes), all in
   parallel, paced by the shared mirror pacer from the allocation maps so the task's one budget is charged
   for real bytes.
3. SWITCHING (``switch``): when every mirror is READY (event, confirmed by ``<mirror ready='yes'>``), pivot
   them all. If one pivot fails, the disks already pivoted are mirrored back onto their source files, so the
   VM runs from one consistent set: all source or all destination.
4. VERIFYING (``verify``): the live XML shows the new paths; the persistent definition is rewritten to them
   (libvirt 9.0 only updates the live definition on pivot) and read back.
Until the switch, any failure or cancel aborts the mirrors without pivot and removes every file the task
created (``abandon``); the VM never stops using its source volumes. Source files stay for the management
plane. After a restart, ``resume`` takes the journal up.
"""

from __future__ import annotations

import os
from typing import Any

from agent.config import StorageKind
from agent.migration.engine import TICK_S, Step, TaskContext
from agent.migration.plan import MigrationPlan
from agent.migration.samehost.abandon import abandon
from agent.migration.samehost.copy import copy_layers, create_tops
from agent.migration.samehost.prepare import check_precreated, plan_move, preflight
from agent.migration.samehost.resume import resume
from agent.migration.samehost.steering import mirror_until_ready
from agent.migration.samehost.switch import finish
from agent.migration.samehost.work import Work
from agent.migration.states import TaskState
from agent.migration.volumes import CLAIMED_DEVICES
from agent.storage.roots import StorageRoots
from agent.virt.host import VirtHost
from agent.virt.writes import WriteHistory


class SameHostEngine:
    name = "same-host"

    def __init__(
        self,
        host: VirtHost,
        roots: StorageRoots,
        *,
        tick_s: float = TICK_S,
        history: WriteHistory | None = None,
    ) -> None:
        self.host = host
        self.roots = roots
        self.tick_s = tick_s
        self.history = history  # the guests' write counters from before the request

    async def run(self, ctx: TaskContext) -> list[dict[str, Any]]:
        host, roots = self.host, self.roots
        if ctx.resume_data:
            return await resume(host, roots, ctx, ctx.resume_data, tick_s=self.tick_s)
        await ctx.enter(TaskState.PREPARING)
        plan = await plan_move(host, roots, ctx)
        try:
            return await self._move(ctx, await check_precreated(host, self.roots, plan))
        finally:
            if plan.dst_kind is StorageKind.BLOCK:
                CLAIMED_DEVICES.difference_update(d.dst_top for d in plan.disks)

    async def _move(self, ctx: TaskContext, plan: MigrationPlan) -> list[dict[str, Any]]:
        host, roots = self.host, self.roots
        work = Work(plan, roots.storage(plan.dst_storage_uuid))
        work.reused = await preflight(host, roots, ctx, plan)
        ctx.note("plan", plan.summary())
        # Every item's size up front, so the one percent never races ahead while later items are unknown.
        for layer in plan.layers:
            ctx.progress(f"layer:{os.path.basename(layer.dst)}", 0, layer.actual_size)
        for disk in plan.disks:
            ctx.progress(f"disk:{disk.target}", 0, disk.estimated_bytes)
        await ctx.checkpoint(work.checkpoint_data(Step.PREPARED))
        try:
            await ctx.enter(TaskState.COPYING)
            await copy_layers(host, roots, ctx, work)
            await create_tops(host, roots, ctx, work)
            await mirror_until_ready(host, ctx, work, tick_s=self.tick_s, history=self.history)
        except BaseException:
            # A cancel, or the task's deadline (the runner cancels the engine when it passes).
            if not ctx.detaching:  # a stopping agent lets running mirrors be; resume picks them up
                await abandon(host, roots, ctx, work)
            raise
        return await finish(host, roots, ctx, work, tick_s=self.tick_s)
