"""Offline migration: the storage of a VM that is shut off, on the same host or to another host.

Nothing runs from the images, so every layer is just a file to copy:
- same host: each layer is copied as a sparse file (rate-limited) and pointed at its new backing file, or the
  chain is flattened with ``qemu-img convert``; every copy is checked with ``qemu-img compare``; then the
  domain's definition is rewritten to the new paths;
- another host: the destination agent prepares the targets; each layer, the top included, travels with the
  transfer service (NBD over TLS-PSK, verified there); a flattened disk is first flattened into a temporary
  file next to the source; then the destination defines the domain with the new paths and the source
  undefines it.
Until the definition is switched, a failure or cancel removes every file the task created; the source
images are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.errors import AgentError, Code, MigrationFailed, PreflightFailed
from agent.migration.engine import TaskContext, budget_of
from agent.migration.inventory import remote_inventory, volume_inventory
from agent.migration.limits import AgentTransfer, LiveLimits
from agent.migration.peer.client import DestinationAgent
from agent.migration.peer.layers import send_layer_to_peer
from agent.migration.peer.wire import IncomingDisk, IncomingSpec
from agent.migration.plan import (
    DiskPlan,
    LayerPlan,
    MigrationPlan,
    RemoteRoot,
    inspect_chains,
    plan_migration,
)
from agent.migration.states import TaskState
from agent.storage import qemuimg
from agent.storage.filecopy import copy_sparse_async
from agent.storage.roots import StorageRoots
from agent.storage.space import check_free_space
from agent.virt.domxml import parse_disks, rewrite_disk_sources
from agent.virt.host import VirtHost
from agent.virt.states import DomainState


class OfflineEngine:
    name = "offline"

    def __init__(self, host: VirtHost, roots: StorageRoots, config: AgentConfig, *, same_host: bool) -> None:
        self.host = host
        self.roots = roots
        self.config = config
        self.same_host = same_host
        self.limits: LiveLimits | None = None
        self.transfer = AgentTransfer()

    async def run(self, ctx: TaskContext) -> list[dict[str, Any]]:
        self.transfer = transfer = AgentTransfer()
        self.limits = transfer.limits = LiveLimits(ctx, transfer)
        ctx.attach_limits(self.limits)  # a PATCH changes the rate the copies read for every chunk
        try:
            return await self._run(ctx)
        finally:
            ctx.attach_limits(None)

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
        chains = await inspect_chains(disks)
        dst_uuid = ctx.request.primaryStorageMigrateVm.dstPrimaryStorageUuid
        root = self.roots.get(dst_uuid) if self.same_host else RemoteRoot(dst_uuid, Path("/"))
        plan = plan_migration(ctx.vm_uuid, disks, chains, ctx.request, root)
        ctx.note("plan", plan.summary())
        if self.same_host:
            return await self._same_host(ctx, plan)
        return await self._to_peer(ctx, plan)

    # -- same host --------------------------------------------------------------------------------------

    async def _same_host(self, ctx: TaskContext, plan: MigrationPlan) -> list[dict[str, Any]]:
        targets = [layer.dst for layer in plan.layers] + [d.dst_top for d in plan.disks]
        for path in targets:
            if os.path.lexists(path):
                raise PreflightFailed(
                    f"target {path} already exists",
                    code=Code.TARGET_EXISTS,
                    field="volumes",
                    details="remove it or choose another destination",
                )
        root = self.roots.get(plan.dst_storage_uuid)
        await check_free_space(root, plan.bytes_total, field="primaryStorageMigrateVm.dstPrimaryStorageUuid")
        created: list[str] = []
        data: dict[str, Any] = {"engine": "offline", "created": created}
        try:
            await ctx.enter(TaskState.COPYING)
            for layer in plan.layers:
                await self._copy_file(ctx, data, layer)
            for disk in plan.disks:
                # One layer in the same format is flat already: copied as a file, whose limiter reads the
                # budget for every chunk (a PATCH reaches it), where qemu-img convert takes its rate once.
                if disk.flatten and not (len(disk.src_chain) == 1 and disk.src_format == disk.dst_format):
                    await self._flatten(ctx, data, disk)
                else:
                    top = LayerPlan(
                        disk.src_top,
                        disk.dst_top,
                        disk.dst_format,
                        disk.virtual_size,
                        disk.estimated_bytes,
                        disk.dst_backing,
                        disk.dst_backing_format,
                    )
                    await self._copy_file(ctx, data, top)
            await ctx.enter(TaskState.SWITCHING)
            new = {d.target: (d.dst_top, d.dst_format) for d in plan.disks}
            await self.host.define_xml(rewrite_disk_sources(await self.host.inactive_xml(ctx.vm_uuid), new))
        except BaseException:
            if not ctx.detaching:
                await asyncio.shield(self._remove(created))
            raise
        await ctx.enter(TaskState.VERIFYING)
        defined = parse_disks(await self.host.inactive_xml(ctx.vm_uuid))
        for now in defined:
            if now.target in new and now.source != new[now.target][0]:
                raise MigrationFailed(
                    f"the definition still points {now.target} at {now.source}", code=Code.VERIFY_FAILED
                )
        return await volume_inventory(defined, plan, self.roots)

    async def _record(self, ctx: TaskContext, data: dict[str, Any], path: str) -> None:
        if not self.roots.owner_of(path):
            raise MigrationFailed(f"refusing to create {path}: not inside a storage root")
        data["created"].append(path)
        await ctx.checkpoint(data)

    async def _copy_file(self, ctx: TaskContext, data: dict[str, Any], layer: LayerPlan) -> None:
        await self._record(ctx, data, layer.dst)
        item, done = f"layer:{os.path.basename(layer.dst)}", 0

        def on_bytes(n: int) -> None:
            nonlocal done
            done += n
            ctx.progress(item, done, max(layer.actual_size, done))

        await copy_sparse_async(layer.src, layer.dst, rate=lambda: self._rate(ctx), on_bytes=on_bytes)
        if layer.backing_dst is not None:
            await qemuimg.rebase_unsafe(layer.dst, layer.backing_dst, layer.backing_format or "qcow2")
        if not await qemuimg.compare(layer.src, layer.dst):
            raise MigrationFailed(
                f"the copy of {layer.src} at {layer.dst} differs from its source", code=Code.VERIFY_FAILED
            )
        ctx.progress(item, done, done)

    async def _flatten(self, ctx: TaskContext, data: dict[str, Any], disk: DiskPlan) -> None:
        await self._record(ctx, data, disk.dst_top)
        ctx.progress(f"disk:{disk.target}", 0, disk.estimated_bytes)
        args = ["qemu-img", "convert", "-U", "-O", disk.dst_format]
        rate = self._rate(ctx)
        if rate:
            # qemu-img's own rate limit, bytes/s: taken once, a retune does not reach a running convert.
            args += ["-r", str(rate)]
        self.transfer.pin(
            rate or None,
            f"qemu-img convert flattening {disk.target} keeps the rate it started with until it ends; "
            "the copies after it read the new one",
        )
        try:
            await qemuimg.run(*args, disk.src_top, disk.dst_top, limit_s=None)
        finally:
            self.transfer.unpin()
        if not await qemuimg.compare(disk.src_top, disk.dst_top):
            raise MigrationFailed(
                f"the flattened copy of {disk.target} differs from its source", code=Code.VERIFY_FAILED
            )
        ctx.progress(f"disk:{disk.target}", disk.estimated_bytes, disk.estimated_bytes)

    async def _remove(self, paths: list[str]) -> None:
        for path in reversed(paths):
            if self.roots.owner_of(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    async def _resume_cleanup(self, ctx: TaskContext, data: Any) -> None:
        await self._remove(list(data.get("created", [])))
        if data.get("incoming"):
            with contextlib.suppress(AgentError):
                async with DestinationAgent.of(ctx.request, self.config) as peer:
                    await peer.abort(ctx.task_uuid)

    # -- another host -----------------------------------------------------------------------------------

    async def _to_peer(self, ctx: TaskContext, plan: MigrationPlan) -> list[dict[str, Any]]:
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
                prepared = await peer.prepare(spec.model_dump())
                await ctx.enter(TaskState.COPYING)
                for disk in plan.disks:
                    sources = [(lp.src, lp.format) for lp in disk.lower_layers]
                    if disk.flatten:
                        sources = [(await self._flat_copy(ctx, data, disk), disk.dst_format)]
                    else:
                        sources.append((disk.src_top, disk.src_format))
                    for index, (src, fmt) in enumerate(sources):
                        item = f"disk:{disk.target}:{index}"

                        def progress(done: int, total: int, item: str = item) -> None:
                            ctx.progress(item, done, total)

                        await send_layer_to_peer(
                            peer,
                            ctx.task_uuid,
                            disk.target,
                            index,
                            src,
                            fmt,
                            rate=lambda: self._rate(ctx),
                            on_progress=progress,
                            log=ctx.log,
                        )
                await self._remove(temporary)
                await ctx.enter(TaskState.SWITCHING)
                new = {
                    d["target"]: (d["top"], next(p.dst_format for p in plan.disks if p.target == d["target"]))
                    for d in prepared["disks"]
                }
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

    async def _flat_copy(self, ctx: TaskContext, data: dict[str, Any], disk: DiskPlan) -> str:
        """Flatten the chain into a temporary file next to the source top (sent, then removed)."""
        path = f"{disk.src_top}.ksa-flat-{ctx.task_uuid[:8]}"
        await self._record(ctx, data, path)
        await qemuimg.run(
            "qemu-img", "convert", "-U", "-O", disk.dst_format, disk.src_top, path, limit_s=None
        )
        return path
