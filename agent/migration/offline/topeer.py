"""A shut-off VM's storage to another host.

The destination agent prepares the targets; each layer, the top included, travels with the transfer service
(NBD over TLS-PSK, verified there; ``peer.layers``); a flattened disk is first flattened into a temporary
file next to the source; then the destination defines the domain with the new paths and the source
undefines it. Until the destination has the definition, a failure or cancel removes the temporary files
and has the destination drop what it made; the source images are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from agent.errors import AgentError
from agent.migration.engine import TaskContext
from agent.migration.inventory import remote_inventory
from agent.migration.offline.base import OfflineEngine, remote_root
from agent.migration.peer.client import DestinationAgent
from agent.migration.peer.layers import LayerToSend, send_layers_to_peer
from agent.migration.peer.wire import IncomingDisk, IncomingSpec
from agent.migration.plan import DiskPlan, MigrationPlan
from agent.migration.states import TaskState
from agent.storage import qemuimg
from agent.storage.roots import StorageRoot
from agent.virt.domxml import rewrite_disk_sources


class PeerOfflineEngine(OfflineEngine):
    def _root(self, dst_uuid: str) -> StorageRoot:
        return remote_root(dst_uuid)

    async def _move(self, ctx: TaskContext, plan: MigrationPlan) -> list[dict[str, Any]]:
        spec = IncomingSpec.of(
            ctx.task_uuid,
            plan,
            (IncomingDisk.offline_copy(d) for d in plan.disks),
            domain=await self.host.inactive_xml(ctx.vm_uuid),
        )
        temporary: list[str] = []
        data: dict[str, Any] = {"engine": "offline", "created": temporary, "incoming": True}
        async with DestinationAgent.of(ctx.request, self.config) as peer:
            await ctx.checkpoint(data)
            try:
                prepared = await peer.prepare(spec)
                await ctx.enter(TaskState.COPYING)
                for disk in plan.disks:
                    await send_layers_to_peer(
                        peer,
                        ctx.task_uuid,
                        await self._layers_of(ctx, data, disk),
                        rate=lambda: self._rate(ctx),
                        progress=ctx.progress,
                        log=ctx.log,
                    )
                await self._remove(temporary)
                await ctx.enter(TaskState.SWITCHING)
                new = {d.target: (prepared.disk(d.target).top, d.dst_format) for d in plan.disks}
                xml = rewrite_disk_sources(await self.host.inactive_xml(ctx.vm_uuid), new)
                await peer.define(ctx.task_uuid, xml)
            except BaseException:
                await asyncio.shield(self._remove(temporary))
                if not ctx.detaching:
                    with contextlib.suppress(AgentError):
                        await asyncio.shield(peer.abort(ctx.task_uuid))
                raise
            # The destination has the definition now: drop ours, so the VM is defined on one host only.
            await self.host.undefine(ctx.vm_uuid)
            await ctx.enter(TaskState.VERIFYING)
            vm = await peer.vm(ctx.task_uuid)
            return remote_inventory(vm, plan)

    async def _layers_of(self, ctx: TaskContext, data: dict[str, Any], disk: DiskPlan) -> list[LayerToSend]:
        """The files that make the disk on the destination, base first: its chain, or one flattened file."""
        sources = [(lp.src, lp.format) for lp in disk.lower_layers]
        if disk.flatten:
            sources = [(await self._flat_copy(ctx, data, disk), disk.dst_format)]
        else:
            sources.append((disk.src_top, disk.src_format))
        return [
            LayerToSend(disk.target, index, src, fmt, item=f"disk:{disk.target}:{index}")
            for index, (src, fmt) in enumerate(sources)
        ]

    async def _flat_copy(self, ctx: TaskContext, data: dict[str, Any], disk: DiskPlan) -> str:
        """Flatten the chain into a temporary file next to the source top (sent, then removed)."""
        path = f"{disk.src_top}.ksa-flat-{ctx.task_uuid[:8]}"
        await self._record(ctx, data, path)
        await qemuimg.run(
            "qemu-img", "convert", "-U", "-O", disk.dst_format, disk.src_top, path, limit_s=None
        )
        return path
