"""Cross-host live migration with storage: peer-to-peer libvirt migration onto targets the destination
agent prepared, with one real-bytes bandwidth budget and a convergence controller.

Steps, each journalled before it is taken (the package's files, in the order the work happens):
1. PREPARING (``prepare``): plan locally (which disks, chains, flatten or keep layers); the destination
   agent confines paths in its storage root, checks space and creates the target images (``incoming``).
2. COPYING (``prepare.send_layers``, ``params``, ``migrate``): lower layers of kept chains travel with the
   transfer service (qemu-storage-daemon over NBD); then ``migrateToURI3`` peer-to-peer (the source
   libvirtd owns the job, so an agent restart does not abort it), only the moving disks in
   ``migrate_disks``, shallow (``NON_SHARED_INC``) onto the prepared chains and fresh images (QEMU then
   moves and charges real bytes only) or a full copy (``NON_SHARED_DISK``) when flattening a chain,
   destination and persistent XML with the new paths. The NBD mirrors are paced by the shared mirror pacer
   (``steering``); a full copy is steered across its holes from the allocation maps.
3. CONVERGING (``steering``): memory iterations; the controller tunes downtime and bandwidth, or switches to
   post-copy, or gives up early with figures.
4. SWITCHING / VERIFYING (``commit``): the measured downtime comes from the job-completed event; the
   hypervisors show the VM runs there from the new paths and the destination agent commits.
Before the switch, any failure or cancel aborts the job: the VM keeps running on the source from its source
volumes and the destination agent removes what it prepared (``destination``). After post-copy started
nothing can roll back. A job that ended otherwise is settled by where the VM runs (``settle``); after a
restart, ``resume`` takes the journal up.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from agent.config import AgentConfig
from agent.errors import AgentError, Code, MigrationFailed
from agent.migration import snapshots
from agent.migration.crosshost.commit import commit
from agent.migration.crosshost.destination import abort_remote
from agent.migration.crosshost.migrate import WEDGED_DETAILS, Migration
from agent.migration.crosshost.prepare import incoming_spec, plan_live_move, send_layers
from agent.migration.crosshost.resume import resume
from agent.migration.crosshost.settle import settle
from agent.migration.crosshost.steering import Steering
from agent.migration.crosshost.work import CrossHostWork
from agent.migration.engine import TICK_S, Step, TaskContext, run_past_cancel
from agent.migration.peer.client import DestinationAgent
from agent.migration.states import TaskState
from agent.storage.roots import StorageRoots
from agent.virt.host import VirtHost
from agent.virt.writes import WriteHistory


class CrossHostEngine:
    name = "cross-host"

    def __init__(
        self,
        host: VirtHost,
        roots: StorageRoots,
        config: AgentConfig,
        *,
        wedged: set[str] | None = None,
        tick_s: float = TICK_S,
        history: WriteHistory | None = None,
    ) -> None:
        self.host = host
        self.history = history  # the guests' write counters from before the request
        self.roots = roots
        self.config = config
        # VMs whose libvirt migration job did not end after an abort: the agent's, shared by every task
        # (an engine lives for one task), so the next task of such a VM is refused until the job ends.
        self.wedged: set[str] = set() if wedged is None else wedged
        self.tick_s = tick_s
        self._steering: Steering | None = None  # the running migration's, for explain_deadline

    def explain_deadline(self) -> tuple[str, dict[str, Any]] | None:
        """Why the migration had not finished at the task's deadline: the convergence controller's figures."""
        steer = self._steering
        if steer is None or steer.last_reading is None:
            return None
        verdict = steer.controller.explain_deadline(steer.last_reading)
        return verdict.message, verdict.figures()

    def _steer_with(self, steer: Steering) -> None:
        self._steering = steer

    def _migration(self, ctx: TaskContext) -> Migration:
        return Migration(
            self.host,
            self.config,
            ctx,
            tick_s=self.tick_s,
            wedged=self.wedged,
            on_steering=self._steer_with,
            history=self.history,
        )

    async def run(self, ctx: TaskContext) -> list[dict[str, Any]]:
        if not ctx.resume_data and ctx.vm_uuid in self.wedged:
            raise MigrationFailed(
                "an earlier migration job of this VM is still held by libvirt; nothing was done",
                code=Code.MIGRATION_JOB_WEDGED,
                details=WEDGED_DETAILS,
            )
        async with DestinationAgent.of(ctx.request, self.config) as peer:
            if ctx.resume_data:
                return await resume(
                    self.host,
                    ctx,
                    peer,
                    ctx.resume_data,
                    tick_s=self.tick_s,
                    wedged=self.wedged,
                    on_steering=self._steer_with,
                )
            await ctx.enter(TaskState.PREPARING)
            plan = await plan_live_move(self.host, ctx, peer)
            ctx.note("plan", plan.summary())
            # Every item's size up front (memory too), so the one percent never races ahead.
            for layer in plan.layers:
                ctx.progress(f"layer:{os.path.basename(layer.src)}", 0, layer.actual_size)
            for disk in plan.disks:
                ctx.progress(f"disk:{disk.target}", 0, disk.estimated_bytes)
            ctx.progress("memory", 0, await self.host.memory_bytes(ctx.vm_uuid))
            work = CrossHostWork(plan=plan)
            await work.checkpoint(ctx)
            try:
                work.prepared = await peer.prepare(incoming_spec(ctx, plan))
                await work.checkpoint(ctx, Step.PREPARED)
                ctx.note("placed", work.prepared.tops())  # where the destination put each disk
                await ctx.enter(TaskState.COPYING)
                await send_layers(ctx, peer, work)
                # libvirt's snapshot metadata travels beside the migration (journalled first): see Migration.
                work.snapshots = await self.host.call_domain(ctx.vm_uuid, snapshots.read_snapshots)
                await work.checkpoint(ctx, Step.MIGRATING)
                stats = await self._migration(ctx).run(work)
            except AgentError as err:
                # An error reported once the migration ran (a lost connection at the very end, libvirtd
                # restarting under it) must not be taken for a rollback: where the VM runs decides.
                if work.step != Step.MIGRATING:
                    await abort_remote(ctx, peer)
                    raise
                return await self._settle(ctx, peer, work, err)
            except asyncio.CancelledError as err:
                if ctx.detaching:  # a stopping agent leaves the p2p migration to libvirt
                    raise
                if work.step != Step.MIGRATING:
                    await abort_remote(ctx, peer)
                    raise
                # The job was aborted (``Migration``'s cancel) unless it had already switched over.
                return await self._settle(ctx, peer, work, err)
            except BaseException:
                if not ctx.detaching:
                    await abort_remote(ctx, peer)
                raise
            await work.checkpoint(ctx, Step.COMMITTING)
            return await run_past_cancel(ctx, commit(self.host, ctx, peer, plan, work.destination, stats))

    async def _settle(
        self, ctx: TaskContext, peer: DestinationAgent, work: CrossHostWork, failure: BaseException
    ) -> list[dict[str, Any]]:
        return await settle(self.host, ctx, peer, work, failure, wedged=ctx.vm_uuid in self.wedged)
