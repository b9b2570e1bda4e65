"""What both offline engines share: the limits their copies read, the preflight and the plan, the record of
every file a task creates (journalled, so a restart removes them), and the resume that cleans up."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, StorageKind
from agent.errors import AgentError, Code, MigrationFailed, PreflightFailed
from agent.migration.devices import free_devices
from agent.migration.engine import TaskContext, budget_of
from agent.migration.limits import AgentTransfer, LiveLimits
from agent.migration.peer.client import DestinationAgent
from agent.migration.plan import FILES_ONLY, MigrationPlan, RemoteRoot, inspect_chains, plan_migration
from agent.migration.states import TaskState
from agent.migration.volumes import (
    CLAIMED_DEVICES,
    claim_devices,
    rbd_access,
    release_created,
    snapshots_refused,
)
from agent.storage import rbdimages
from agent.storage.blockdir import BlockDir
from agent.storage.locations import parse_rbd
from agent.storage.rbdpool import RbdPool
from agent.storage.roots import StorageRoot, StorageRoots
from agent.virt.domxml import DiskXml, parse_disks
from agent.virt.host import VirtHost
from agent.virt.states import DomainState

log = logging.LoggerAdapter(logging.getLogger(__name__), {})


class OfflineEngine:
    """The shut-off VM's move; ``LocalOfflineEngine`` and ``PeerOfflineEngine`` say where to."""

    name = "offline"
    #: The kinds of source volume the engine reads.
    kinds: tuple[StorageKind, ...] = FILES_ONLY

    def __init__(self, host: VirtHost, roots: StorageRoots, config: AgentConfig) -> None:
        self.host = host
        self.roots = roots
        self.config = config
        self.limits: LiveLimits | None = None
        self.transfer = AgentTransfer()

    async def run(self, ctx: TaskContext) -> list[dict[str, Any]]:
        self.transfer = transfer = AgentTransfer()
        self.limits = transfer.limits = LiveLimits(ctx, transfer)
        ctx.attach_limits(self.limits)  # a PATCH changes the rate the copies read for every chunk
        self.claimed: list[str] = []
        try:
            return await self._run(ctx)
        finally:
            ctx.attach_limits(None)
            CLAIMED_DEVICES.difference_update(self.claimed)

    def _rate(self, ctx: TaskContext) -> int | None:
        """Bytes/s for the agent's own copies now (None: uncapped)."""
        return self.limits.budget if self.limits is not None else budget_of(ctx)

    async def _run(self, ctx: TaskContext) -> list[dict[str, Any]]:
        if ctx.resume_data:
            await self._resume_cleanup(ctx, ctx.resume_data)
            raise MigrationFailed(
                "the agent restarted during an offline move; the partial copy was removed and the VM is "
                "still defined with its source volumes",
                code=Code.INTERRUPTED,
                details="send the request again to retry",
            )
        await ctx.enter(TaskState.PREPARING)
        state = await self.host.domain_state(ctx.vm_uuid)
        if state != DomainState.SHUTOFF:
            raise PreflightFailed(
                f"VM {ctx.vm_uuid} is {state}; an offline move needs it shut off", field="vmUuid"
            )
        disks = parse_disks(await self.host.inactive_xml(ctx.vm_uuid))
        chains = await inspect_chains(disks, await self._rbd_sizes(disks))
        dst_uuid = ctx.request.primaryStorageMigrateVm.dstPrimaryStorageUuid
        dst = self._root(dst_uuid)
        free = None
        if isinstance(dst, BlockDir):
            # No await from here to the claim: a device another task claimed meanwhile is not offered.
            free = [f for f in await free_devices(self.host, dst) if f[0] not in CLAIMED_DEVICES]
        plan = plan_migration(
            ctx.vm_uuid,
            disks,
            chains,
            ctx.request,
            dst,
            dst_rbd=rbd_access(dst) if isinstance(dst, RbdPool) else None,
            free_devices=free or (),
            kinds=self.kinds,
            rbd_snapshots=snapshots_refused(dst),
        )
        if isinstance(dst, BlockDir):
            claim_devices([d.dst_top for d in plan.disks])
            self.claimed = [d.dst_top for d in plan.disks]
        ctx.note("plan", plan.summary())
        return await self._move(ctx, plan)

    def _root(self, dst_uuid: str) -> StorageRoot | BlockDir | RbdPool:
        raise NotImplementedError

    async def _rbd_sizes(self, disks: list[DiskXml]) -> dict[str, int]:
        """The size of every RBD disk in a pool of this agent's configuration, when the engine reads RBD
        (libvirt's pool knows it: no QEMU of the stopped VM to ask); others stay out of the plan."""
        if StorageKind.RBD not in self.kinds:
            return {}
        sizes: dict[str, int] = {}
        for disk in disks:
            if disk.device != "disk" or disk.type != "network" or not disk.location:
                continue
            pool = self.roots.owner_of_location(disk.location)
            if isinstance(pool, RbdPool):
                size = await rbdimages.image_size(self.host, pool, parse_rbd(disk.location, "source"))
                if size is not None:
                    sizes[disk.target] = size
        return sizes

    async def _move(self, ctx: TaskContext, plan: MigrationPlan) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def _record(self, ctx: TaskContext, data: dict[str, Any], path: str) -> None:
        """Journal ``path`` before the first byte goes into it: a restart removes it (``_resume_cleanup``),
        or gives a block device back blank."""
        if not self.roots.owner_of_location(path):
            raise MigrationFailed(f"refusing to write {path}: not inside a storage of this host")
        data["created"].append(path)
        await ctx.checkpoint(data)

    async def _remove(self, paths: list[str]) -> None:
        for path in reversed(paths):
            if isinstance(self.roots.owner_of_location(path), BlockDir | RbdPool):
                await release_created(self.host, self.roots, path, log)
            elif self.roots.owner_of(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    async def _resume_cleanup(self, ctx: TaskContext, data: Any) -> None:
        await self._remove(list(data.get("created", [])))
        if data.get("incoming"):
            with contextlib.suppress(AgentError):
                async with DestinationAgent.of(ctx.request, self.config) as peer:
                    await peer.abort(ctx.task_uuid)


def remote_root(dst_uuid: str) -> RemoteRoot:
    """Another host's storage, named by its uuid: the destination agent maps it to its own root."""
    return RemoteRoot(dst_uuid, Path("/"))
