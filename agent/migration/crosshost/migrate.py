"""The switch: libvirt's ``migrateToURI3`` (``VirtHost.migrate``, peer to peer), steered every tick until it
returns, and its bounded end after an abort. libvirt's snapshot metadata travels beside it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from agent.config import AgentConfig
from agent.errors import AgentError, Code, MigrationFailed
from agent.migration import convergence, snapshots
from agent.migration.crosshost import snapmeta
from agent.migration.crosshost.params import (
    choose_write_blocking,
    migration_flags,
    migration_params,
    policy_of,
    switchover_floor,
)
from agent.migration.crosshost.steering import Steering, disk_aliases
from agent.migration.crosshost.work import CrossHostWork
from agent.migration.engine import TaskContext, budget_of
from agent.migration.mirrors.guestwrites import read_guest_writes
from agent.migration.peer.wire import Prepared
from agent.migration.plan import MigrationPlan
from agent.migration.volumes import source_index
from agent.virt.host import DomainEvent, VirtHost
from agent.virt.writes import WriteHistory

#: How long libvirt's migration call may take to return once the job was aborted, and how often the abort
#: is repeated meanwhile. libvirt 9.0 can wait forever for a disk mirror it cancelled after a cut link (the
#: mirror ended with an I/O error in QEMU; libvirt never takes the end in): past this, the task stops
#: waiting and says so instead of hanging with it.
ABORT_GRACE_S = 60.0
ABORT_REPEAT_S = 10.0

WEDGED_DETAILS = (
    "libvirt's migration job did not end after the abort (libvirt 9.0 can wait forever for a disk mirror "
    "that failed when the link broke); the VM keeps running on this host from its source volumes. Restart "
    "libvirtd on this host (running VMs keep running) to end the job before migrating this VM again"
)


class Migration:
    """Runs libvirt's migration of one VM and steers it; ``wedged`` (the engine's, across tasks) collects the
    VMs whose migration job did not end after an abort."""

    def __init__(
        self,
        host: VirtHost,
        config: AgentConfig,
        ctx: TaskContext,
        *,
        tick_s: float,
        wedged: set[str],
        on_steering: Callable[[Steering], None] = lambda steer: None,
        history: WriteHistory | None = None,
    ) -> None:
        self.host = host
        self.config = config
        self.ctx = ctx
        self.tick_s = tick_s
        self.wedged = wedged
        self.on_steering = on_steering
        self.history = history  # the guests' write counters from before the request

    async def run(self, work: CrossHostWork) -> dict[str, Any]:
        """Run the libvirt migration and steer it; returns the completed job's statistics.

        libvirt 9.0 refuses to migrate a domain with snapshot metadata: the metadata (already journalled)
        is taken off the source first, redefined on the destination with the new paths afterwards, and put
        back on the source when the migration fails."""
        ctx, plan, prepared, metas = self.ctx, work.plan, work.destination, work.snapshots
        if not metas:
            return await self._migrate_vm(plan, prepared)
        await self.host.call_domain(ctx.vm_uuid, lambda dom: snapshots.drop_snapshot_metadata(dom, metas))
        try:
            stats = await self._migrate_vm(plan, prepared)
        except BaseException:
            await snapmeta.put_back_here(self.host, ctx, metas)
            raise
        await snapmeta.carry_to_destination(ctx, plan, prepared, metas)
        return stats

    async def _migrate_vm(self, plan: MigrationPlan, prepared: Prepared) -> dict[str, Any]:
        ctx, host = self.ctx, self.host
        params = await migration_params(host, ctx, plan, prepared)
        policy = policy_of(ctx, switchover_floor_ms=await switchover_floor(host, ctx.vm_uuid))
        reading = await read_guest_writes(
            host, self.history, ctx.vm_uuid, [d.target for d in plan.disks], with_rate=bool(budget_of(ctx))
        )
        if reading.waited_s:
            ctx.log.info(
                "no guest write counters from before the request: measured them for %.1f s", reading.waited_s
            )
        if budget_of(ctx):
            ctx.note("guestWrites", reading.figures())
        written, write_rates = reading.written, reading.rates()
        write_blocking = choose_write_blocking(ctx, plan, write_rates)
        flags = migration_flags(self.config, plan, policy, write_blocking=write_blocking)
        controller = convergence.ConvergenceController(policy)
        indexes = {d.target: await source_index(host, ctx.vm_uuid, d) for d in plan.disks}
        # Announce every item's size up front so the one percent covers disks and memory from the start
        # (libvirt's own progress restarts from zero when the memory phase begins).
        for disk in plan.disks:
            ctx.progress(f"disk:{disk.target}", 0, indexes[disk.target].total)
        ctx.progress("memory", 0, await host.memory_bytes(ctx.vm_uuid))
        await host.ensure_connected()
        aliases = await disk_aliases(host, ctx.vm_uuid)
        events = host.subscribe(ctx.vm_uuid)
        ctx.log.info(
            "migrating VM to %s (%s), disks %s",
            prepared.libvirtUri,
            prepared.migrationUri,
            ", ".join(d.target for d in plan.disks),
        )
        migration = asyncio.ensure_future(host.migrate(ctx.vm_uuid, prepared.libvirtUri, params, flags))
        steer = Steering(host, ctx, plan, indexes, controller, aliases=aliases, tick_s=self.tick_s)
        steer.watch_disks(written, write_rates, write_blocking)
        self.on_steering(steer)
        try:
            await self._drive(migration, steer)
            # The job-completed event (the one place the finished job's statistics, downtime included,
            # survive; LAB-NOTES) can trail the return of migrateToURI3, notably after post-copy.
            completed = await completed_stats(events, wait_s=5.0)
        finally:
            await steer.close()
            host.unsubscribe(ctx.vm_uuid, events)
        ctx.note("convergence", steer.summary())
        steer.judge_budget()
        if completed is None:
            ctx.log.warning("no job-completed event; downtime unknown")
            completed = {}
        return completed

    async def _drive(self, migration: asyncio.Future[None], steer: Steering) -> None:
        """Steer until libvirt's migration call returns; its failure becomes the task's error."""
        ctx = self.ctx
        try:
            while not migration.done():
                await asyncio.wait([migration], timeout=self.tick_s)
                if migration.done():
                    break
                if steer.verdict is not None:  # aborted by the steering: only its end is awaited now
                    if not await self.wait_after_abort(migration):
                        steer.verdict.details = WEDGED_DETAILS
                        raise steer.verdict
                    break
                try:
                    await steer.tick()
                except AgentError as err:  # e.g. the job ended between two calls: the migration decides
                    ctx.log.debug("steering step skipped: %s", err.description)
            await migration
        except asyncio.CancelledError:
            if not ctx.detaching:
                await asyncio.shield(self._cancel(migration, steer))
            raise
        except AgentError as err:
            if steer.verdict is err:
                raise
            if steer.verdict is not None:
                raise steer.verdict from err
            raise MigrationFailed(
                f"the migration failed: {err.description}",
                code=Code.MIGRATION_FAILED,
                details="the VM keeps running on this host from its source volumes",
            ) from err

    async def _cancel(self, migration: asyncio.Future[None], steer: Steering) -> None:
        if steer.postcopy_started:
            self.ctx.log.warning("cancel during post-copy cannot roll back; letting the migration finish")
            with contextlib.suppress(AgentError):
                await migration
            return
        with contextlib.suppress(AgentError):
            await self.host.abort_job(self.ctx.vm_uuid)
        await self.wait_after_abort(migration)

    async def wait_after_abort(self, migration: asyncio.Future[None]) -> bool:
        """Wait (bounded) for libvirt's migration call to return after an abort, repeating the abort.
        False: it did not; the call is left to return whenever libvirt lets it, and the job is marked
        wedged so that deciding where the VM runs does not wait for it again."""
        ctx = self.ctx
        deadline = time.monotonic() + ABORT_GRACE_S
        while time.monotonic() < deadline:
            done, _ = await asyncio.wait([migration], timeout=ABORT_REPEAT_S)
            if done:
                with contextlib.suppress(AgentError):
                    migration.result()
                return True
            with contextlib.suppress(AgentError):
                await self.host.abort_job(ctx.vm_uuid)
        self.wedged.add(ctx.vm_uuid)
        ctx.log.error(
            "libvirt's migration job did not end %.0f s after it was aborted; %s",
            ABORT_GRACE_S,
            WEDGED_DETAILS,
        )

        def released(f: asyncio.Future[None]) -> None:
            self.wedged.discard(ctx.vm_uuid)
            ctx.log.warning(
                "libvirt's wedged migration call returned at last: %s",
                "cancelled" if f.cancelled() else (f.exception() or "without error"),
            )

        migration.add_done_callback(released)
        return False


async def completed_stats(events: asyncio.Queue[DomainEvent], *, wait_s: float) -> dict[str, Any] | None:
    """The statistics of the job-completed event, waiting up to ``wait_s`` for it to arrive."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            while True:
                event = await events.get()
                if event.kind == "job-completed":
                    return dict(event.stats)
    return None
