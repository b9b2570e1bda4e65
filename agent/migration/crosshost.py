"""Cross-host live migration with storage: peer-to-peer libvirt migration onto targets the destination
agent prepared, with one real-bytes bandwidth budget and a convergence controller.

Steps, each journalled before it is taken:
1. PREPARING: plan locally (which disks, chains, flatten or keep layers); the destination agent confines
   paths in its storage root, checks space and creates the target images (``incoming``).
2. COPYING: lower layers of kept chains travel with the transfer service (qemu-storage-daemon over NBD);
   then ``migrateToURI3`` peer-to-peer (the source libvirtd owns the job, so an agent restart does not
   abort it), only the moving disks in ``migrate_disks``, shallow (``NON_SHARED_INC``) onto the prepared
   chains and fresh images (QEMU then moves and charges real bytes only) or a full copy
   (``NON_SHARED_DISK``) when flattening a chain, destination and persistent XML with the new paths. The
   NBD mirrors share one budget in proportion to the data each has left (QMP through libvirt); a full copy
   is steered across its holes from the allocation maps.
3. CONVERGING: memory iterations; the controller tunes downtime and bandwidth, or switches to post-copy,
   or gives up early with figures.
4. SWITCHING / VERIFYING: the measured downtime comes from the job-completed event; the destination agent
   checks the VM runs there from the new paths and commits.
Before the switch, any failure or cancel aborts the job: the VM keeps running on the source from its source
volumes and the destination agent removes what it prepared. After post-copy started nothing can roll back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import libvirt

from agent.client import AgentClient
from agent.config import AgentConfig
from agent.errors import AgentError, MigrationFailed, NotFound, PreflightFailed
from agent.migration import convergence, hotdisk, runner, snapshots
from agent.migration.engine import Step, TaskContext, announce, run_past_cancel
from agent.migration.incoming import IncomingDisk, IncomingLayer, IncomingSpec
from agent.migration.inventory import planned_inventory, remote_inventory
from agent.migration.layers import send_layer_to_peer
from agent.migration.pacing import (
    POSITIONAL_SLACK,
    SPEED_SLACK,
    AllocationIndex,
    MirrorSample,
    SteeringClock,
    job_speed,
    real_bytes_done,
    split_by_remaining,
    worth_changing,
)
from agent.migration.peer import peer_call, peer_client
from agent.migration.plan import MigrationPlan, RemoteRoot, allocation_index, inspect_chains, plan_migration
from agent.migration.request import Strategy
from agent.migration.states import TaskState
from agent.storage.roots import StorageRoots
from agent.virt.domxml import parse_disks, rewrite_disk_sources
from agent.virt.host import UNREACHABLE, DomainEvent, VirtHost
from agent.virt.peer import PeerDomain, describe, look_at_peer, planned_tops

TICK_S = 0.25
#: How long to keep asking an unreachable destination agent to clean up after a failure.
ABORT_RETRY_S = 180.0
#: How long to keep asking an unreachable destination agent to confirm a migration that the hypervisors
#: already show as done; past it the task succeeds with ``destinationAgent: unconfirmed`` and the destination
#: agent commits its record itself when it starts again (``IncomingService.reconcile``).
COMMIT_RETRY_S = 45.0
#: How long to keep asking the destination libvirtd where the VM is before asking its agent instead.
PEER_LIBVIRT_WAIT_S = 30.0
#: A migration whose byte counters do not move for this long is stuck (a cut link does not end it in
#: libvirt 9.0: the NBD mirror fails and the job waits forever); it is aborted with a clear error.
STALL_S = 30.0
#: How long to wait for this host's libvirtd to come back (restart) before deciding where the VM runs.
LIBVIRT_OUTAGE_S = 120.0
#: How long libvirt's migration call may take to return once the job was aborted, and how often the abort
#: is repeated meanwhile. libvirt 9.0 can wait forever for a disk mirror it cancelled after a cut link (the
#: mirror ended with an I/O error in QEMU; libvirt never takes the end in): past this, the task stops
#: waiting and says so instead of hanging with it.
ABORT_GRACE_S = 60.0
ABORT_REPEAT_S = 10.0
#: Assumed time for a disk speed change to land until one has been timed (see ``SteeringClock``): a call
#: takes milliseconds, but the first samples of a migration can come late on a busy host.
FIRST_CHANGE_S = 0.5
#: How long the guest's disk writes are measured before a capped migration starts (hot disks, issue 16).
MEASURE_WRITES_S = 1.5
MiB = 1024 * 1024


class CrossHostEngine:
    name = "cross-host"

    def __init__(
        self, host: VirtHost, roots: StorageRoots, config: AgentConfig, *, tick_s: float = TICK_S
    ) -> None:
        self.host = host
        self.roots = roots
        self.config = config
        self.wedged: set[str] = set()  # VMs whose libvirt migration job did not end after an abort
        self.tick_s = tick_s
        self._steering: _Steering | None = None  # the running migration's, for explain_deadline

    def explain_deadline(self) -> tuple[str, dict[str, Any]] | None:
        """Why the migration had not finished at the task's deadline: the convergence controller's figures."""
        steer = self._steering
        if steer is None or steer.last_reading is None:
            return None
        verdict = steer.controller.explain_deadline(steer.last_reading)
        return verdict.message, verdict.figures()

    async def run(self, ctx: TaskContext) -> list[dict[str, Any]]:
        async with peer_client(ctx.request, self.config) as peer:
            if ctx.resume_data:
                return await self._resume(ctx, peer, ctx.resume_data)
            await ctx.enter(TaskState.PREPARING)
            plan = await self._plan(ctx)
            ctx.note("plan", plan.summary())
            # Every item's size up front (memory too), so the one percent never races ahead.
            for layer in plan.layers:
                ctx.progress(f"layer:{os.path.basename(layer.src)}", 0, layer.actual_size)
            for disk in plan.disks:
                ctx.progress(f"disk:{disk.target}", 0, disk.estimated_bytes)
            ctx.progress("memory", 0, await self.host.memory_bytes(ctx.vm_uuid))
            data: dict[str, Any] = {"engine": "cross-host", "step": Step.PREPARING, "plan": plan.to_dict()}
            await ctx.checkpoint(data)
            try:
                prepared = await peer_call(
                    peer, "POST", ("v1", "incoming-migrations"), self._incoming_spec(ctx, plan).model_dump()
                )
                data.update(step=Step.PREPARED, prepared=prepared)
                await ctx.checkpoint(data)
                await ctx.enter(TaskState.COPYING)
                await self._send_layers(ctx, peer, plan, prepared, data)
                # libvirt's snapshot metadata travels beside the migration (journalled first): see _migrate.
                data["snapshots"] = [
                    m.to_dict() for m in await self.host.call_domain(ctx.vm_uuid, snapshots.read_snapshots)
                ]
                data["step"] = Step.MIGRATING
                await ctx.checkpoint(data)
                stats = await self._migrate(ctx, plan, prepared, data["snapshots"])
            except AgentError as err:
                # An error reported once the migration ran (a lost connection at the very end, libvirtd
                # restarting under it) must not be taken for a rollback: where the VM runs decides.
                if data["step"] != Step.MIGRATING:
                    await self._abort_remote(ctx, peer)
                    raise
                return await self._settle(ctx, peer, plan, data, err)
            except asyncio.CancelledError as err:
                if ctx.detaching:  # a stopping agent leaves the p2p migration to libvirt
                    raise
                if data["step"] != Step.MIGRATING:
                    await self._abort_remote(ctx, peer)
                    raise
                # The job was aborted (``_cancel_migration``) unless it had already switched over.
                return await self._settle(ctx, peer, plan, data, err)
            except BaseException:
                if not ctx.detaching:
                    await self._abort_remote(ctx, peer)
                raise
            data["step"] = Step.COMMITTING
            await ctx.checkpoint(data)
            return await run_past_cancel(ctx, self._commit(ctx, peer, plan, prepared, stats))

    async def _settle(
        self,
        ctx: TaskContext,
        peer: AgentClient,
        plan: MigrationPlan,
        data: dict[str, Any],
        failure: BaseException,
    ) -> list[dict[str, Any]]:
        """The migration job ended without a clean success (error, abort, timeout, cancel, a restart): make
        the task tell the truth. The VM on the destination: commit, the task succeeds (a cancel lost the
        race). On this host: the destination removes what it prepared and ``failure`` is raised. Unknown
        (this libvirtd and the destination agent both silent): nothing is removed, the task says so."""
        if isinstance(failure, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # the cancel is answered below (CANCELLED after cleanup, or the truth)
        # Deciding and cleaning up must not be cut short by a (further) cancel: it would leave the
        # destination's files behind or a moved VM reported as cancelled.
        return await run_past_cancel(ctx, self._settle_steps(ctx, peer, plan, data, failure))

    async def _settle_steps(
        self,
        ctx: TaskContext,
        peer: AgentClient,
        plan: MigrationPlan,
        data: dict[str, Any],
        failure: BaseException,
    ) -> list[dict[str, Any]]:
        where, here = await self._locate(ctx, peer, data["prepared"])
        settlement = runner.settle(where)
        if settlement is runner.Settlement.COMMIT:
            if isinstance(failure, asyncio.CancelledError) and ctx.cancel_requested:
                ctx.log.warning("the cancel came after the switchover; the VM runs on the destination")
                ctx.note("cancelTooLate", "the cancel arrived after the switchover; the move completed")
            elif isinstance(failure, asyncio.CancelledError):
                ctx.log.warning("the deadline passed after the switchover; the VM runs on the destination")
            else:
                ctx.log.warning("%s, but the VM runs on the destination; committing", _what(failure))
            data["step"] = Step.COMMITTING
            await ctx.checkpoint(data)
            return await self._commit(ctx, peer, plan, data["prepared"], None)
        if settlement is runner.Settlement.KEEP_ALL:
            raise MigrationFailed(
                f"cannot tell where VM {ctx.vm_uuid} runs after the migration ended ({_what(failure)})",
                code="AGENT.VM_LOCATION_UNKNOWN",
                details=(
                    "neither this host's libvirtd nor the destination's libvirtd or agent could tell; "
                    "nothing was removed on either host: check both before retrying. Source volumes: "
                    + ", ".join(f"{d.target}={d.src_top}" for d in plan.disks)
                    + "; destination volumes: "
                    + ", ".join(f"{t}={p}" for t, p in planned_tops(data["prepared"]).items())
                ),
            ) from failure
        await self._abort_remote(ctx, peer)
        if here in ("shutoff", "crashed") and not isinstance(failure, asyncio.CancelledError):
            raise MigrationFailed(
                f"VM {ctx.vm_uuid} was shut down during the migration (now {here})",
                code="AGENT.VM_STOPPED",
                details="the migration was abandoned and the destination cleaned up; the VM stays "
                "defined on this host with its source volumes",
            ) from failure
        raise failure

    # -- preparing --------------------------------------------------------------------------------------

    async def _plan(self, ctx: TaskContext) -> MigrationPlan:
        state = await self.host.domain_state(ctx.vm_uuid)
        if state != "running":
            raise PreflightFailed(
                f"VM {ctx.vm_uuid} is {state}; a live migration needs it running", field="vmUuid"
            )
        disks = parse_disks(await self.host.live_xml(ctx.vm_uuid))
        for disk in disks:
            if disk.mirror:
                raise PreflightFailed(f"disk {disk.target} already has a block job", field="vmUuid")
        chains = await inspect_chains(disks)
        dst_uuid = ctx.request.primaryStorageMigrateVm.dstPrimaryStorageUuid
        plan = plan_migration(ctx.vm_uuid, disks, chains, ctx.request, RemoteRoot(dst_uuid, Path("/")))
        snapshots.refuse_internal({d.target: chains[d.target] for d in plan.disks})
        metas = await self.host.call_domain(ctx.vm_uuid, snapshots.read_snapshots)
        if metas and any(d.flatten and len(d.src_chain) > 1 for d in plan.disks):
            raise PreflightFailed(
                "the VM has libvirt snapshots ("
                + ", ".join(m.name for m in metas)
                + ") whose layers a flattening move would not keep",
                code="AGENT.SNAPSHOTS_NEED_CHAIN",
                field="primaryStorageMigrateVm.withSnapshots",
                details="move it with withSnapshots: true, or delete the snapshots first",
            )
        return plan

    def _incoming_spec(self, ctx: TaskContext, plan: MigrationPlan) -> IncomingSpec:
        return IncomingSpec(
            migrationId=ctx.task_uuid,
            vmUuid=ctx.vm_uuid,
            dstPrimaryStorageUuid=plan.dst_storage_uuid,
            disks=[
                IncomingDisk(
                    target=d.target,
                    volumeUuid=d.volume_uuid,
                    top=str(d.dst_top),
                    format=d.dst_format,
                    virtualSize=d.virtual_size,
                    estimatedBytes=d.estimated_bytes,
                    flatten=d.flatten,
                    precreated=d.precreated,
                    layers=[IncomingLayer.of(lp) for lp in d.lower_layers],
                )
                for d in plan.disks
            ],
        )

    async def _send_layers(
        self,
        ctx: TaskContext,
        peer: AgentClient,
        plan: MigrationPlan,
        prepared: Mapping[str, Any],
        data: dict[str, Any],
    ) -> None:
        """Fill the destination's lower layers, base first, each verified before the next (resumable)."""
        if not plan.layers:
            return

        done: dict[str, str] = data.setdefault("layersDone", {})  # destination path -> source path
        for disk in plan.disks:
            paths = next(d for d in prepared["disks"] if d["target"] == disk.target)["layers"]
            for index, (layer, dst_path) in enumerate(zip(disk.lower_layers, paths, strict=True)):
                if dst_path in done:  # sent before a restart, or a base shared with another disk
                    continue
                item = f"layer:{os.path.basename(layer.src)}"

                def progress(done_bytes: int, total: int, item: str = item) -> None:
                    ctx.progress(item, done_bytes, total)

                await send_layer_to_peer(
                    peer,
                    ctx.task_uuid,
                    disk.target,
                    index,
                    layer.src,
                    layer.format,
                    rate=lambda: ctx.bandwidth,
                    on_progress=progress,
                    log=ctx.log,
                )
                done[dst_path] = layer.src
                await ctx.checkpoint(data)

    # -- migrating --------------------------------------------------------------------------------------

    def _flags(
        self, plan: MigrationPlan, policy: convergence.ConvergencePolicy, *, write_blocking: bool = False
    ) -> int:
        flags: int = (
            libvirt.VIR_MIGRATE_LIVE
            | libvirt.VIR_MIGRATE_PEER2PEER
            | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
        )
        if plan.shallow_mirrors:
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC  # the top's data only: lower layers are there
        else:
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK  # full: flattens a chain into the destination
        # Both capabilities must be set when the migration starts; QEMU cannot enable them later.
        if policy.wants_auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if policy.wants_postcopy_flag:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY
        if write_blocking:  # every disk's mirror: libvirt has one copy mode for the whole migration
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES
        if not self.config.insecure_transport:
            # Memory and the NBD disk mirrors over TLS with the hosts' certificates (qemu.conf
            # default_tls_x509_cert_dir; the destination verifies the source: migrate_tls_x509_verify).
            flags |= libvirt.VIR_MIGRATE_TLS
        return flags

    async def _migration_params(
        self, ctx: TaskContext, plan: MigrationPlan, prepared: Mapping[str, Any]
    ) -> dict[str, Any]:
        new_sources = {
            d["target"]: (d["top"], next(p.dst_format for p in plan.disks if p.target == d["target"]))
            for d in prepared["disks"]
        }
        live = await self.host.call_domain(
            ctx.vm_uuid, lambda dom: str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
        )
        inactive = await self.host.inactive_xml(ctx.vm_uuid)
        params: dict[str, Any] = {
            libvirt.VIR_MIGRATE_PARAM_URI: prepared["migrationUri"],
            libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: [d.target for d in plan.disks],
            libvirt.VIR_MIGRATE_PARAM_DEST_XML: rewrite_disk_sources(live, new_sources),
            libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: rewrite_disk_sources(inactive, new_sources),
        }
        if ctx.bandwidth:
            # libvirt starts every disk mirror at this speed on its own (LAB-NOTES): one share each keeps the
            # moment before the first steering tick within the budget. The memory stream gets the whole
            # budget when it starts (_Steering.tick).
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = first_mirror_speed(ctx.bandwidth, plan) // MiB
        if ctx.request.primaryStorageMigrateVm.strategy in (Strategy.AUTO_CONVERGE, Strategy.AUTO):
            policy = _policy(ctx)
            params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = policy.throttle_initial_pct
            params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = policy.throttle_increment_pct
        return params

    async def _migrate(
        self,
        ctx: TaskContext,
        plan: MigrationPlan,
        prepared: Mapping[str, Any],
        snapshot_data: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Run the libvirt migration and steer it; returns the completed job's statistics.

        libvirt 9.0 refuses to migrate a domain with snapshot metadata: the metadata (already journalled)
        is taken off the source first, redefined on the destination with the new paths afterwards, and put
        back on the source when the migration fails."""
        metas = [snapshots.SnapshotMeta.from_dict(d) for d in snapshot_data or []]
        if not metas:
            return await self._migrate_vm(ctx, plan, prepared)
        await self.host.call_domain(ctx.vm_uuid, lambda dom: snapshots.drop_snapshot_metadata(dom, metas))
        try:
            stats = await self._migrate_vm(ctx, plan, prepared)
        except BaseException:
            with contextlib.suppress(AgentError):  # the VM is gone from here only if it switched over
                await self.host.call_domain(ctx.vm_uuid, lambda dom: snapshots.redefine_snapshots(dom, metas))
                ctx.log.info("snapshot metadata put back on this host: %s", ", ".join(m.name for m in metas))
            raise
        await self._carry_snapshots(ctx, plan, prepared, metas)
        return stats

    async def _carry_snapshots(
        self,
        ctx: TaskContext,
        plan: MigrationPlan,
        prepared: Mapping[str, Any],
        metas: list[snapshots.SnapshotMeta],
    ) -> None:
        """Redefine the snapshots on the destination, rewritten to the new paths. The VM already runs
        there: a failure is reported (the XML stays in the journal and the details), not fatal."""
        moved: dict[str, str] = {}
        for disk in plan.disks:
            top = next(t["top"] for t in prepared["disks"] if t["target"] == disk.target)
            moved[disk.src_top] = top
            for layer in disk.src_chain[1:]:  # lower layers keep their file names next to the top
                moved[layer] = os.path.join(os.path.dirname(top), os.path.basename(layer))
        rewritten = [
            snapshots.SnapshotMeta(m.name, snapshots.rewrite_snapshot(m.xml, moved), m.current) for m in metas
        ]
        try:
            remote = await VirtHost.open(prepared["libvirtUri"])
            try:
                await remote.call_domain(
                    ctx.vm_uuid, lambda dom: snapshots.redefine_snapshots(dom, rewritten)
                )
            finally:
                await remote.close()
        except AgentError as err:
            ctx.log.error("snapshot metadata not redefined on the destination: %s", err.description)
            ctx.note("snapshots", {"error": err.description, "xml": [m.to_dict() for m in rewritten]})
            return
        ctx.log.info("snapshot metadata carried to the destination: %s", ", ".join(m.name for m in metas))
        ctx.note(
            "snapshots",
            {"carried": [m.name for m in metas], "current": next((m.name for m in metas if m.current), None)},
        )

    async def _migrate_vm(
        self, ctx: TaskContext, plan: MigrationPlan, prepared: Mapping[str, Any]
    ) -> dict[str, Any]:
        params = await self._migration_params(ctx, plan, prepared)
        policy = _policy(ctx)
        written, write_rates = await _measure_writes(self.host, ctx, plan)
        write_blocking = _choose_write_blocking(ctx, plan, write_rates)
        flags = self._flags(plan, policy, write_blocking=write_blocking)
        controller = convergence.ConvergenceController(policy)
        indexes = {d.target: await allocation_index(d) for d in plan.disks}
        # Announce every item's size up front so the one percent covers disks and memory from the start
        # (libvirt's own progress restarts from zero when the memory phase begins).
        for disk in plan.disks:
            ctx.progress(f"disk:{disk.target}", 0, indexes[disk.target].total)
        ctx.progress("memory", 0, await self.host.memory_bytes(ctx.vm_uuid))
        await self.host.ensure_connected()
        aliases = {d.target: d.alias for d in parse_disks(await self.host.live_xml(ctx.vm_uuid)) if d.alias}
        events = self.host.subscribe(ctx.vm_uuid)
        ctx.log.info(
            "migrating VM to %s (%s), disks %s",
            prepared["libvirtUri"],
            prepared["migrationUri"],
            ", ".join(d.target for d in plan.disks),
        )
        migration = asyncio.ensure_future(
            self.host.migrate(ctx.vm_uuid, prepared["libvirtUri"], params, flags)
        )
        steer = _Steering(self, ctx, plan, indexes, controller)
        steer.aliases = aliases
        steer.watch_disks(written, write_rates, write_blocking)
        self._steering = steer
        try:
            await self._drive(ctx, migration, steer)
            # The job-completed event (the one place the finished job's statistics, downtime included,
            # survive; LAB-NOTES) can trail the return of migrateToURI3, notably after post-copy.
            completed = await _completed_stats(events, wait_s=5.0)
        finally:
            await steer.close()
            self.host.unsubscribe(ctx.vm_uuid, events)
        ctx.note("convergence", steer.summary())
        steer.judge_budget()
        if completed is None:
            ctx.log.warning("no job-completed event; downtime unknown")
            completed = {}
        return completed

    async def _drive(self, ctx: TaskContext, migration: asyncio.Future[None], steer: _Steering) -> None:
        """Steer until libvirt's migration call returns; its failure becomes the task's error."""
        try:
            while not migration.done():
                await asyncio.wait([migration], timeout=self.tick_s)
                if migration.done():
                    break
                if steer.verdict is not None:  # aborted by the steering: only its end is awaited now
                    if not await self._wait_after_abort(ctx, migration):
                        steer.verdict.details = _WEDGED_DETAILS
                        raise steer.verdict
                    break
                try:
                    await steer.tick()
                except AgentError as err:  # e.g. the job ended between two calls: the migration decides
                    ctx.log.debug("steering step skipped: %s", err.description)
            await migration
        except asyncio.CancelledError:
            if not ctx.detaching:
                await asyncio.shield(self._cancel_migration(ctx, migration, steer))
            raise
        except AgentError as err:
            if steer.verdict is err:
                raise
            if steer.verdict is not None:
                raise steer.verdict from err
            raise MigrationFailed(
                f"the migration failed: {err.description}",
                code="AGENT.MIGRATION_FAILED",
                details="the VM keeps running on this host from its source volumes",
            ) from err

    async def _cancel_migration(
        self, ctx: TaskContext, migration: asyncio.Future[None], steer: _Steering
    ) -> None:
        if steer.postcopy_started:
            ctx.log.warning("cancel during post-copy cannot roll back; letting the migration finish")
            with contextlib.suppress(AgentError):
                await migration
            return
        with contextlib.suppress(AgentError):
            await self.host.abort_job(ctx.vm_uuid)
        await self._wait_after_abort(ctx, migration)

    async def _wait_after_abort(self, ctx: TaskContext, migration: asyncio.Future[None]) -> bool:
        """Wait (bounded) for libvirt's migration call to return after an abort, repeating the abort.
        False: it did not; the call is left to return whenever libvirt lets it, and the job is marked
        wedged so that deciding where the VM runs does not wait for it again."""
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
            _WEDGED_DETAILS,
        )
        migration.add_done_callback(
            lambda f: ctx.log.warning(
                "libvirt's wedged migration call returned at last: %s",
                "cancelled" if f.cancelled() else (f.exception() or "without error"),
            )
        )
        return False

    # -- commit and abort -------------------------------------------------------------------------------

    async def _commit(
        self,
        ctx: TaskContext,
        peer: AgentClient,
        plan: MigrationPlan,
        prepared: Mapping[str, Any],
        stats: Mapping[str, Any] | None,
    ) -> list[dict[str, Any]]:
        """The VM switched over: verify it runs on the destination from the planned tops, asking the
        hypervisors themselves, then have the destination agent forget its record. ``stats`` is the completed
        job's statistics when libvirt's migration call returned success, None when the arrival was found by
        looking (after an error, a cancel or a restart)."""
        await announce(ctx, TaskState.SWITCHING)
        downtime = (stats or {}).get("downtime")
        if downtime is not None:
            ctx.note("downtimeMs", int(downtime))
            if int(downtime) > ctx.downtime_ms:
                ctx.note(
                    "downtimeExceeded",
                    f"measured downtime {int(downtime)} ms exceeded the requested {ctx.downtime_ms} ms",
                )
        await announce(ctx, TaskState.VERIFYING)
        tops = planned_tops(prepared)
        await self.host.wait_reachable(LIBVIRT_OUTAGE_S)
        try:
            still_here = await self.host.domain_state(ctx.vm_uuid)
        except NotFound:
            still_here = None
        if still_here not in (None, "shutoff"):
            raise MigrationFailed(
                f"VM {ctx.vm_uuid} still runs on this host after the migration", code="AGENT.VERIFY_FAILED"
            )
        view = await look_at_peer(prepared["libvirtUri"], ctx.vm_uuid)
        if view is not None and not view.runs_from(tops):
            raise _not_as_planned(ctx, view, tops)
        confirmed = await self._confirm(ctx, peer)
        vm: Mapping[str, Any] | None = None
        if confirmed:
            with contextlib.suppress(AgentError):
                vm = await _peer_call_retrying(
                    ctx, peer, "GET", ("v1", "vms", ctx.vm_uuid), None, within_s=COMMIT_RETRY_S
                )
        if view is None:
            # The destination libvirtd did not answer: its agent's view, or libvirt's own success, decides.
            if vm is not None:
                agent_tops = {d.get("target"): (d.get("chain") or [{}])[0].get("path") for d in vm["disks"]}
                for target, top in tops.items():
                    if agent_tops.get(target) != top:
                        raise MigrationFailed(
                            f"on the destination {target} uses {agent_tops.get(target)}, not {top}",
                            code="AGENT.VERIFY_FAILED",
                            details="the VM runs on the destination; nothing was removed on either host",
                        )
            elif stats is None:
                raise MigrationFailed(
                    f"cannot confirm that VM {ctx.vm_uuid} runs on the destination",
                    code="AGENT.VM_LOCATION_UNKNOWN",
                    details="the VM left this host, but neither the destination's libvirtd nor its agent "
                    "answered; nothing was removed on either host: check the destination before retrying",
                )
            else:
                ctx.note(
                    "destinationLibvirt", "unreachable after the switch; libvirt reported the migration done"
                )
        if vm is not None:
            return remote_inventory(vm, plan)
        return planned_inventory(plan, prepared)

    async def _confirm(self, ctx: TaskContext, peer: AgentClient) -> bool:
        """Have the destination agent commit its record; False (and a note) when it cannot be reached in
        ``COMMIT_RETRY_S`` or refuses: the VM's place is already known, so that never fails the task."""
        try:
            await _peer_call_retrying(
                ctx,
                peer,
                "POST",
                ("v1", "incoming-migrations", ctx.task_uuid, "commit"),
                {},
                within_s=COMMIT_RETRY_S,
            )
        except NotFound:
            # Committed by an earlier life of this task, or by the destination agent's own reconciliation
            # at its start: the record is gone, the VM's disks decide.
            ctx.log.info("the destination had already committed this migration")
        except AgentError as err:
            ctx.log.warning(
                "the VM runs on the destination, but its agent did not confirm (%s); it commits its record "
                "when it starts again",
                err.description,
            )
            ctx.note("destinationAgent", f"unconfirmed: {err.description}")
            return False
        return True

    async def _abort_remote(self, ctx: TaskContext, peer: AgentClient) -> None:
        """Have the destination remove what it prepared; retried while it cannot be reached (a cut link
        heals, a restarting agent comes back), and shielded from the cancel that brought us here."""

        async def _abort() -> None:
            try:
                await _peer_call_retrying(
                    ctx, peer, "DELETE", ("v1", "incoming-migrations", ctx.task_uuid), None
                )
            except AgentError as err:
                ctx.log.error("the destination agent could not clean up: %s", err.description)
                ctx.note("destinationCleanup", f"failed: {err.description}")

        await asyncio.shield(_abort())

    # -- resume -----------------------------------------------------------------------------------------

    async def _resume(
        self, ctx: TaskContext, peer: AgentClient, data: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """After a restart. ``migrating`` / ``committing``: the peer-to-peer migration may still run (the
        source libvirtd owns it): it is steered to its end (aborted first if a cancel was journalled),
        then where the VM runs decides (``_settle``): commit and succeed, or clean the destination and
        fail. Earlier steps (preparing, sending lower layers): the destination is cleaned up and the task
        fails (``AGENT.INTERRUPTED``; the management plane sends the request again)."""
        plan = MigrationPlan.from_dict(data["plan"])
        step = data.get("step")
        work = dict(data)
        ctx.log.info("resuming cross-host migration at step %s", step)
        interrupted = MigrationFailed(
            f"the agent restarted during step {step!r}; the destination was cleaned up and the VM stays on "
            "this host",
            code="AGENT.INTERRUPTED",
            details="send the request again to retry",
        )
        if step in (Step.MIGRATING, Step.COMMITTING):
            try:
                await self.host.wait_reachable(LIBVIRT_OUTAGE_S)
                if ctx.cancel_requested:
                    await self._abort_job_if_active(ctx)
                verdict = await self._watch_running(ctx, plan)
            except asyncio.CancelledError as err:
                if ctx.detaching:
                    raise
                # Cancelled now (or journalled before the restart): abort the job unless it switched over.
                await asyncio.shield(self._abort_job_if_active(ctx))
                return await self._settle(ctx, peer, plan, work, err)
            if ctx.cancel_requested:  # aborted above, or it had ended: where the VM is decides
                return await self._settle(ctx, peer, plan, work, asyncio.CancelledError())
            return await self._settle(ctx, peer, plan, work, verdict or interrupted)
        await self._abort_remote(ctx, peer)
        if ctx.cancel_requested:  # journalled before the restart: the task ends CANCELLED, cleaned up
            raise asyncio.CancelledError()
        raise interrupted

    async def _abort_job_if_active(self, ctx: TaskContext) -> None:
        with contextlib.suppress(AgentError):
            if await self._job_active(ctx):
                await self.host.abort_job(ctx.vm_uuid)

    async def _watch_running(self, ctx: TaskContext, plan: MigrationPlan) -> AgentError | None:
        """Keep steering a migration this agent did not start in this life (it survived a restart) until
        libvirt ends it; returns the reason if the steering had to abort it."""
        policy = _policy(ctx)
        steer = _Steering(
            self,
            ctx,
            plan,
            {d.target: await allocation_index(d) for d in plan.disks},
            convergence.ConvergenceController(policy),
        )
        self._steering = steer
        with contextlib.suppress(AgentError):
            steer.aliases = {
                d.target: d.alias for d in parse_disks(await self.host.live_xml(ctx.vm_uuid)) if d.alias
            }
        try:
            while await self._job_active(ctx):
                try:
                    await steer.tick()
                except AgentError as err:
                    ctx.log.debug("steering step skipped: %s", err.description)
                await asyncio.sleep(self.tick_s)
        finally:
            await steer.close()
        return steer.verdict

    async def _job_active(self, ctx: TaskContext) -> bool:
        try:
            stats = await self.host.job_stats(ctx.vm_uuid)
        except (NotFound, AgentError):
            return False
        return bool(int(stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)) != libvirt.VIR_DOMAIN_JOB_NONE)

    async def _locate(
        self, ctx: TaskContext, peer: AgentClient, prepared: Mapping[str, Any]
    ) -> tuple[runner.Place, str | None]:
        """Where the VM is once libvirt's job is over (the skeleton's rule, ``runner.place_of``), and its
        state on this host (None: libvirtd did not answer). Asked of the hypervisors first: this host's
        libvirtd and the destination's (the one the migration went to); the destination agent only when
        that libvirtd is silent.

        While a pre-copy migration runs, the incoming domain on the destination is *paused*: only a running
        domain there (or one defined there while this host has none) means the VM arrived. After a
        libvirtd restart here, its recovery first ends an interrupted outgoing migration (libvirt 9.0:
        cancelled, the VM resumed on this host), so wait for the job to be gone before looking.
        """
        local: str | None = None
        if await self.host.wait_reachable(LIBVIRT_OUTAGE_S):
            deadline = time.monotonic() + (0 if ctx.vm_uuid in self.wedged else 60)
            while time.monotonic() < deadline:
                if not await self._job_active(ctx):
                    break
                await asyncio.sleep(0.5)
            try:
                local = await self.host.domain_state(ctx.vm_uuid)
            except NotFound:
                local = "undefined"
            except AgentError:
                local = None
        remote = await self._remote_state(ctx, peer, prepared)
        ctx.log.info("the migration job is over: the VM is %s here, %s on the destination", local, remote)
        return runner.place_of(local, remote), local

    async def _remote_state(
        self, ctx: TaskContext, peer: AgentClient, prepared: Mapping[str, Any]
    ) -> str | None:
        """The VM's state on the destination: its libvirtd's word (waited for while it restarts), else its
        agent's; None when neither answers."""
        # A libvirtd that is merely restarting answers again within seconds.
        deadline = time.monotonic() + PEER_LIBVIRT_WAIT_S
        while (view := await look_at_peer(prepared["libvirtUri"], ctx.vm_uuid)) is None:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(2)
        if view is not None:
            return view.state
        ctx.log.warning("the destination libvirtd is %s; asking the destination agent", describe(view))
        try:
            vm = await _peer_call_retrying(ctx, peer, "GET", ("v1", "vms", ctx.vm_uuid), None)
            return str(vm.get("state"))
        except NotFound:
            return "undefined"
        except AgentError:
            return None


class _Steering:
    """One tick of the running migration: progress, disk pacing, and the convergence controller."""

    def __init__(
        self,
        engine: CrossHostEngine,
        ctx: TaskContext,
        plan: MigrationPlan,
        indexes: Mapping[str, AllocationIndex],
        controller: convergence.ConvergenceController,
    ) -> None:
        self.engine = engine
        self.host = engine.host
        self.ctx = ctx
        self.plan = plan
        self.indexes = indexes
        self.controller = controller
        # libvirt starts every mirror at the migration's bandwidth (_migration_params).
        first = first_mirror_speed(ctx.bandwidth, plan) if ctx.bandwidth else 0
        self.speeds: dict[str, int] = {d.target: first for d in plan.disks}
        # Speed changes go through libvirt's QMP passthrough: they run in the background, one per disk at a
        # time, and speeds are planned for as long as changes are seen to take (a busy libvirtd answers late).
        self.clock = SteeringClock(engine.tick_s, first_s=FIRST_CHANGE_S, margin=1.0)
        self.changing: dict[str, asyncio.Task[None]] = {}
        self.last_sample: float | None = None
        self.last_reading: convergence.MigrationSample | None = None  # for explain_deadline
        self.postcopy_started = False
        self.memory_phase = False
        self.verdict: AgentError | None = None
        self.decisions: list[dict[str, Any]] = []
        self.samples = 0
        self.aliases: dict[str, str] = {}
        self.last_counter = -1
        self.last_moved_at = time.monotonic()
        # Hot disks (issue 16): each disk's guest writes and whether its mirror gains.
        self.watches: dict[str, hotdisk.DiskWatch] = {}
        self.written_at_start: dict[str, int] = {}
        self.written: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.meter = hotdisk.BudgetMeter()
        self.figures_at = 0.0
        self.rates: list[dict[str, Any]] = []
        self.interval_bytes = [0, 0]  # background, guest writes (write-blocking) since the last rate sample
        self.interval_at: float | None = None
        self.disk_mode = hotdisk.Mode.BACKGROUND

    def watch_disks(
        self, written: Mapping[str, int], rates: Mapping[str, float], write_blocking: bool
    ) -> None:
        """Watch every disk's guest writes from here on (``written``: the counters when the migration
        started; ``rates``: as measured before it, for the figures until the window fills)."""
        mode = hotdisk.Mode.WRITE_BLOCKING if write_blocking else hotdisk.Mode.BACKGROUND
        self.meter.start(time.monotonic())
        self.interval_at = self.meter.started
        for disk in self.plan.disks:
            self.watches[disk.target] = hotdisk.DiskWatch(disk.target, mode=mode)
            self.written_at_start[disk.target] = self.written[disk.target] = written[disk.target]
        self.disk_mode = mode

    def judge_budget(self) -> None:
        """The disk phase's real-bytes rate against the cap; over it by more than 10 %: say so."""
        budget = self.ctx.bandwidth
        self.ctx.note(
            "budget",
            {
                "realBytesPerSecond": int(self.meter.rate),
                "capBytesPerSecond": budget,
                "realBytes": self.meter.bytes,
                "phase": "disks",
            },
        )
        if budget is not None and self.meter.over(budget, len(self.watches)):
            note = hotdisk.over_budget_note(self.meter, budget, self.watches)
            self.ctx.log.warning("over the budget: %s", note["message"])
            self.ctx.note("overBudget", note)

    async def tick(self) -> None:
        try:
            stats = await self.host.job_stats(self.ctx.vm_uuid)
        except AgentError:
            return  # the domain may be gone at the very end
        if int(stats.get("type", 0)) == libvirt.VIR_DOMAIN_JOB_NONE:
            self.ctx.log.debug("steering: no migration job yet")
            return
        self.samples += 1
        await self._watch_for_stall(stats)
        await self._disks()
        remaining = int(stats.get("memory_remaining", 0))
        processed = int(stats.get("memory_processed", 0))
        if processed:  # before the memory phase the guest's size announced at the start stands
            self.ctx.progress("memory", processed, processed + remaining)
        if int(stats.get("memory_iteration", 0)) >= 1 and not self.memory_phase:
            self.memory_phase = True
            if self.ctx.bandwidth and len(self.plan.disks) > 1:  # the disks started at one share each
                with contextlib.suppress(AgentError):
                    await self.host.set_migration_speed(self.ctx.vm_uuid, max(1, self.ctx.bandwidth // MiB))
            await self.ctx.enter(TaskState.CONVERGING)
        sample = convergence.MigrationSample.from_job_stats(stats, time.monotonic())
        self.last_reading = sample
        self.controller.retune(max_downtime_ms=self.ctx.downtime_ms, bandwidth=self.ctx.bandwidth)
        for action in self.controller.observe(sample):
            await self._apply(action)

    async def _watch_for_stall(self, stats: Mapping[str, Any]) -> None:
        counter = sum(
            int(stats.get(key, 0)) for key in ("data_processed", "memory_processed", "disk_processed")
        )
        now = time.monotonic()
        if counter != self.last_counter:
            self.last_counter, self.last_moved_at = counter, now
        elif now - self.last_moved_at > STALL_S and self.verdict is None:
            await self._give_up(
                MigrationFailed(
                    f"the migration made no progress for {STALL_S:.0f} s and was aborted; "
                    "the VM keeps running on this host",
                    code="AGENT.MIGRATION_STALLED",
                    details="the link to the destination or the destination itself does not answer",
                )
            )

    async def _give_up(self, verdict: AgentError) -> None:
        self.verdict = verdict
        self.ctx.log.error("aborting the migration: %s", verdict.description)
        await self.host.abort_job(self.ctx.vm_uuid)

    async def _disks(self) -> None:
        """Steer the NBD mirrors so the budget is charged for real bytes, across all disks."""
        try:
            jobs = await self.host.qmp(self.ctx.vm_uuid, "query-block-jobs")
        except AgentError as err:
            self.ctx.log.debug("disk steering: query-block-jobs failed: %s", err.description)
            return
        # libvirt names a migration's mirror jobs after the disk's alias: "drive-virtio-disk0".
        by_device = {str(job.get("device", "")): job for job in jobs or []}
        by_disk: dict[str, dict[str, Any]] = {}
        for target, alias in self.aliases.items():
            job = by_device.get(f"drive-{alias}") or by_device.get(alias)
            if job is not None:
                by_disk[target] = job
        if not by_disk:
            return
        # A speed set now stays in effect until the next sample at least, so the gaps between samples count as
        # latency too.
        sampled = time.monotonic()
        if self.last_sample is not None:
            self.clock.landed(sampled - self.last_sample)
        self.last_sample = sampled
        samples: dict[str, tuple[MirrorSample, str]] = {}
        writes: dict[str, int] = {}
        if self.watches:
            with contextlib.suppress(AgentError):
                writes = await self.host.block_writes(self.ctx.vm_uuid, list(self.watches))
        blocking = self.watches and self.disk_mode is hotdisk.Mode.WRITE_BLOCKING
        for disk in self.plan.disks:
            job = by_disk.get(disk.target)
            if job is None:
                continue
            offset, length = int(job["offset"]), int(job["len"])
            guest = max(0, writes.get(disk.target, 0) - self.written_at_start.get(disk.target, 0))
            if blocking:  # QEMU counts the guest's synchronous copies as progress too (hotdisk)
                offset = max(0, offset - guest)
                length = max(offset, length - guest)
            if job.get("status") == "concluded" and job.get("error") and self.verdict is None:
                await self._give_up(
                    MigrationFailed(
                        f"copying {disk.target} to the destination failed: {job['error']}",
                        code="AGENT.DISK_COPY_FAILED",
                        details="the link or the destination storage failed; the VM keeps running here",
                    )
                )
                return
            sample = MirrorSample(
                offset,
                length,
                disk.virtual_size,
                self.indexes[disk.target],
                bool(job.get("ready")),
            )
            samples[disk.target] = (sample, str(job["device"]))
        left: dict[str, int] = {}
        for target, (sample, _device) in samples.items():
            done, total = real_bytes_done(sample)
            self.ctx.progress(f"disk:{target}", done, total)
            if not sample.ready:
                left[target] = total - done
            # READY completes ``done``; the budget counts what the background really moved.
            copied = real_bytes_done(dataclasses.replace(sample, ready=False))[0]
            self._observe_disk(target, sampled, writes.get(target), copied, total - done, bool(blocking))
        # Shares in proportion to what each mirror has left: they finish together, so the budget is used to
        # the end without another change. In write-blocking mode the guest's writes are charged first.
        budget = self.ctx.bandwidth
        if budget is not None and blocking:
            charged = sum(w.write_bps for w in self.watches.values())
            budget = int(max(budget - charged, hotdisk.MIN_BACKGROUND * budget))
        shares = split_by_remaining(budget, left or {t: 0 for t in samples})
        if await self._judge_disks(shares, sampled):
            return
        horizon = self.clock.horizon_s
        for target, (sample, device) in samples.items():
            speed = job_speed(sample, shares.get(target), horizon)
            current = self.speeds.get(target)
            self.ctx.log.debug(
                "disk steering: %s at %d/%d (%d real bytes left), speed %s -> %d B/s for %.1f s",
                target,
                sample.cur,
                sample.end,
                left.get(target, 0),
                current,
                speed,
                horizon,
            )
            # A job that walks the whole disk crosses holes at speeds that change by factors; one charged for
            # real bytes only is left alone unless its share really moved.
            slack = POSITIONAL_SLACK if sample.positional else SPEED_SLACK
            wanted = worth_changing(current, speed, slack)
            pending = self.changing.get(target)
            if wanted and (pending is None or pending.done()):
                self.changing[target] = asyncio.create_task(self._set_speed(target, device, speed))

    def _observe_disk(
        self, target: str, now: float, written: int | None, copied: int, remaining: int, blocking: bool
    ) -> None:
        watch = self.watches.get(target)
        if watch is None or written is None:
            return
        moved = max(0, copied - self.done.get(target, 0))
        self.done[target] = max(copied, self.done.get(target, 0))
        new_writes = max(0, written - self.written.get(target, written)) if blocking else 0
        self.written[target] = written
        watch.observe(now, written, remaining)
        if not self.memory_phase:
            self.meter.add(now, moved + new_writes)
            self.interval_bytes[0] += moved
            self.interval_bytes[1] += new_writes

    async def _judge_disks(self, shares: Mapping[str, int | None], now: float) -> bool:
        """Figures to the details each second; a mirror that cannot converge ends the migration early
        (libvirt has one copy mode for a whole migration, chosen at its start). True when it gave up."""
        if not self.watches:
            return False
        if now - self.figures_at >= 1.0:
            self.figures_at = now
            self.ctx.note("disks", {t: w.figures(shares.get(t)) for t, w in self.watches.items()})
            if self.interval_at is not None and now > self.interval_at and not self.memory_phase:
                seconds = now - self.interval_at
                self.rates.append(
                    {
                        "at": round(now - (self.meter.started or now), 2),
                        "seconds": round(seconds, 2),
                        "backgroundBytesPerSecond": int(self.interval_bytes[0] / seconds),
                        "guestWriteBytesPerSecond": int(self.interval_bytes[1] / seconds),
                        "capBytesPerSecond": self.ctx.bandwidth,
                    }
                )
                self.ctx.note("copyRates", self.rates[-120:])
            self.interval_at, self.interval_bytes = now, [0, 0]
        budget = self.ctx.bandwidth
        for target, watch in self.watches.items():
            share = shares.get(target)
            if budget is None or share is None or self.verdict is not None:
                continue
            if hotdisk.cannot_converge(watch, share, now):
                hint = (
                    None
                    if self.ctx.request.primaryStorageMigrateVm.strategy is Strategy.PRECOPY
                    else "auto started it in background mode from the write rate it measured first"
                )
                await self._give_up(hotdisk.disk_verdict(watch, share, budget, len(self.watches), hint=hint))
                return True
        return False

    async def _set_speed(self, target: str, device: str, speed: int) -> None:
        asked = time.monotonic()
        with contextlib.suppress(AgentError):
            await self.host.qmp(self.ctx.vm_uuid, "block-job-set-speed", {"device": device, "speed": speed})
            self.speeds[target] = speed
        self.clock.landed(time.monotonic() - asked)

    async def close(self) -> None:
        """The job is over: speed changes still on their way are of no use; cancelled and awaited."""
        pending = list(self.changing.values())
        for task in pending:
            task.cancel()
        # Their failures were logged where they ran; here only their end matters.
        await asyncio.gather(*pending, return_exceptions=True)
        self.changing.clear()

    async def _apply(self, action: convergence.Action) -> None:
        vm = self.ctx.vm_uuid
        if isinstance(action, convergence.Note):
            self.ctx.log.info("convergence: %s %s", action.message, action.figures)
            self.decisions.append({"message": action.message, **dict(action.figures)})
            self.ctx.note("decisions", self.decisions[-20:])
        elif isinstance(action, convergence.SetDowntime):
            await self.host.set_max_downtime(vm, action.ms)
        elif isinstance(action, convergence.SetBandwidth):
            if self.memory_phase:
                await self.host.set_migration_speed(vm, max(1, action.bytes_per_s // MiB))
        elif isinstance(action, convergence.StartPostCopy):
            self.ctx.log.warning("switching to post-copy: from here a failure cannot roll back")
            await self.host.start_postcopy(vm)
            self.postcopy_started = True
            self.ctx.note("postcopy", "started; a failure after this point cannot roll back")
        elif isinstance(action, convergence.Abort):
            await self._give_up(action.to_error())

    def summary(self) -> dict[str, Any]:
        return {"samples": self.samples, "postcopy": self.postcopy_started, "decisions": self.decisions[-20:]}


def _policy(ctx: TaskContext) -> convergence.ConvergencePolicy:
    """The convergence policy of the request; it plans with the time left until the task's deadline."""
    deadline = ctx.deadline
    return convergence.ConvergencePolicy.from_request(
        ctx.request, time_left_s=None if deadline is None else deadline.remaining()
    )


async def _measure_writes(
    host: VirtHost, ctx: TaskContext, plan: MigrationPlan
) -> tuple[dict[str, int], dict[str, float]]:
    """Each moving disk's bytes written so far and the guest's write rate on it (measured only when the
    task has a cap: without one the mirrors run as fast as the link and converge)."""
    targets = [d.target for d in plan.disks]
    first = await host.block_writes(ctx.vm_uuid, targets)
    if ctx.bandwidth is None:
        return first, {}
    started = time.monotonic()
    await asyncio.sleep(MEASURE_WRITES_S)
    second = await host.block_writes(ctx.vm_uuid, targets)
    seconds = time.monotonic() - started
    return second, {t: max(0, second[t] - first[t]) / seconds for t in targets}


def _choose_write_blocking(ctx: TaskContext, plan: MigrationPlan, rates: Mapping[str, float]) -> bool:
    """``auto`` (and the other memory strategies) migrate in write-blocking mode when a disk is hot for its
    share; ``precopy`` never does. The mode applies to every disk of the migration: each guest write on any
    of them then waits for the destination (a network round trip) before it completes."""
    if ctx.request.primaryStorageMigrateVm.strategy is Strategy.PRECOPY or not ctx.bandwidth:
        return False
    share = first_mirror_speed(ctx.bandwidth, plan)
    hot = {t: r for t, r in rates.items() if hotdisk.start_write_blocking(r, share)}
    if hot:
        ctx.log.info(
            "hot disk: migrating in write-blocking mode (all disks): guest writes %s B/s, share %d B/s",
            {t: int(r) for t, r in hot.items()},
            share,
        )
        ctx.note(
            "diskMode",
            {
                "mode": hotdisk.Mode.WRITE_BLOCKING.value,
                "message": "migrating in write-blocking mode: every guest write on every moving disk waits "
                "for the destination before it completes",
                "hot": {t: int(r) for t, r in hot.items()},
                "shareBytesPerSecond": share,
            },
        )
    return bool(hot)


def first_mirror_speed(bandwidth: int, plan: MigrationPlan) -> int:
    """Bytes/s every disk mirror starts at: one share of the budget each, in whole MiB/s as libvirt takes
    it (at least 1)."""
    return max(1, bandwidth // max(1, len(plan.disks)) // MiB) * MiB


async def _completed_stats(events: asyncio.Queue[DomainEvent], *, wait_s: float) -> dict[str, Any] | None:
    """The statistics of the job-completed event, waiting up to ``wait_s`` for it to arrive."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            while True:
                event = await events.get()
                if event.kind == "job-completed":
                    return dict(event.stats)
    return None


_WEDGED_DETAILS = (
    "libvirt's migration job did not end after the abort (libvirt 9.0 can wait forever for a disk mirror "
    "that failed when the link broke); the VM keeps running on this host from its source volumes. Restart "
    "libvirtd on this host (running VMs keep running) to end the job before migrating this VM again"
)


def _what(failure: BaseException) -> str:
    if isinstance(failure, AgentError):
        return failure.description
    return type(failure).__name__


async def _peer_call_retrying(
    ctx: TaskContext,
    peer: AgentClient,
    method: str,
    segments: tuple[str, ...],
    body: Any,
    *,
    within_s: float = ABORT_RETRY_S,
) -> Any:
    """``peer_call``, retried for up to ``within_s`` while the destination agent cannot be reached
    (restarting, a cut link healing) or cannot reach its own libvirtd (restarting: without it the agent
    cannot tell whether the VM runs there, so it must not remove files yet); its other answers, errors
    included, are final."""
    delay = 1.0
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await peer_call(peer, method, segments, body)
        except MigrationFailed as err:
            if err.code not in _PEER_RETRY_CODES or time.monotonic() > deadline:
                raise
            ctx.log.warning(
                "destination %s (%s); retrying in %.0f s", _PEER_RETRY_CODES[err.code], method, delay
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


_PEER_RETRY_CODES = {
    "AGENT.PEER_UNREACHABLE": "agent unreachable",
    UNREACHABLE: "agent cannot reach its libvirtd",
}


def _not_as_planned(ctx: TaskContext, view: PeerDomain, tops: Mapping[str, str]) -> MigrationFailed:
    """The destination libvirtd shows the VM, but not running from the planned tops."""
    return MigrationFailed(
        f"VM {ctx.vm_uuid} is {view.state} on the destination, not running from the planned volumes",
        code="AGENT.VERIFY_FAILED",
        details="planned: "
        + ", ".join(f"{t}={p}" for t, p in tops.items())
        + "; live there: "
        + (", ".join(f"{t}={p}" for t, p in view.live_tops.items()) or "none")
        + "; nothing was removed on either host",
    )
