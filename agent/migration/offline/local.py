"""A shut-off VM's storage to another storage on this host: a directory of files, block devices, or an RBD
pool.

Each layer is copied as a sparse file (rate-limited) and pointed at its new backing file, or the chain is
flattened with ``qemu-img convert`` (onto a device: raw, holes written as zeros; onto a new RBD image: raw,
holes left out); with ``withSnapshots`` onto RBD each lower layer is written into the image and snapshotted,
then the top written over them. RBD images are read and written with the pool's keyring
(``agent.storage.rbdkey``). Every copy is checked with ``qemu-img compare``; then the domain's definition
is rewritten to the new volumes. Until then a failure or cancel removes every file and image the task
created (a device is given back blank); the sources are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from agent.config import AgentConfig, StorageKind
from agent.errors import Code, MigrationFailed, PreflightFailed
from agent.migration.devices import check_device, used_here
from agent.migration.engine import TaskContext
from agent.migration.inventory import volume_inventory
from agent.migration.offline.base import OfflineEngine
from agent.migration.plan import OFFLINE_KINDS, DiskPlan, LayerPlan, MigrationPlan
from agent.migration.states import TaskState
from agent.storage import qemuimg, rbdimages
from agent.storage.blockdir import BlockDir
from agent.storage.filecopy import copy_sparse_async
from agent.storage.locations import RbdImage, parse_rbd
from agent.storage.rbdkey import KeyedPool, keyed
from agent.storage.rbdpool import RbdPool
from agent.storage.roots import StorageRoot, StorageRoots
from agent.storage.space import check_free_space
from agent.transfer.send import copy_layer_into_rbd
from agent.virt.domxml import parse_disks, rewrite_disk_sources
from agent.virt.host import VirtHost


class LocalOfflineEngine(OfflineEngine):
    kinds = OFFLINE_KINDS

    def __init__(self, host: VirtHost, roots: StorageRoots, config: AgentConfig) -> None:
        super().__init__(host, roots, config)
        #: The RBD pools of the running copy, with their keys, by storage uuid.
        self.keys: dict[str, KeyedPool] = {}

    def _root(self, dst_uuid: str) -> StorageRoot | BlockDir | RbdPool:
        return self.roots.storage(dst_uuid)

    async def _move(self, ctx: TaskContext, plan: MigrationPlan) -> list[dict[str, Any]]:
        self.keys = {}
        async with contextlib.AsyncExitStack() as stack:
            # Every pool the copy reads or writes, with its key (refused naming the keyring when none).
            for disk in plan.disks:
                for location, kind, field in (
                    (disk.src_top, disk.src_kind, "vmUuid"),
                    (disk.dst_top, disk.dst_kind, "primaryStorageMigrateVm.dstPrimaryStorageUuid"),
                ):
                    pool = self.roots.owner_of_location(location) if kind is StorageKind.RBD else None
                    if kind is StorageKind.RBD and not isinstance(pool, RbdPool):
                        raise PreflightFailed(
                            f"disk {disk.target} is on {location}, in no RBD storage of this host",
                            code=Code.STORAGE_KIND_UNSUPPORTED,
                            field=field,
                        )
                    if isinstance(pool, RbdPool) and pool.uuid not in self.keys:
                        what = f"copying stopped VM {ctx.vm_uuid}'s disk {disk.target}"
                        self.keys[pool.uuid] = await stack.enter_async_context(keyed(pool, what, field=field))
            try:
                return await self._move_keyed(ctx, plan)
            finally:
                self.keys = {}

    def _key(self, location: str) -> KeyedPool:
        pool = self.roots.owner_of_location(location)
        assert isinstance(pool, RbdPool)
        return self.keys[pool.uuid]

    def _objects(self) -> list[str]:
        """``--object`` arguments of every key at hand."""
        return [arg for key in self.keys.values() for arg in key.qemu_objects()]

    def _src(self, disk: DiskPlan) -> str:
        """The disk's source as ``qemu-img`` opens it (an RBD image with its pool's key)."""
        if disk.src_kind is StorageKind.RBD:
            return self._key(disk.src_top).image_json(parse_rbd(disk.src_top, "source"))
        return disk.src_image

    async def _move_keyed(self, ctx: TaskContext, plan: MigrationPlan) -> list[dict[str, Any]]:
        if plan.dst_kind is StorageKind.RBD:
            pool = self.roots.storage(plan.dst_storage_uuid)
            assert isinstance(pool, RbdPool)
            await rbdimages.check_access(self.host, pool)  # this host's libvirt: the domain's way in
            for disk in plan.disks:
                if await rbdimages.image_exists(self.host, pool, parse_rbd(disk.dst_top, "volumes")):
                    raise PreflightFailed(
                        f"target {disk.dst_top} already exists",
                        code=Code.TARGET_EXISTS,
                        field="volumes",
                        details="remove the image or choose another dstInstallPath",
                    )
            return await self._write_and_define(ctx, plan, self._onto_images)
        if plan.dst_kind is StorageKind.BLOCK:
            storage = self.roots.storage(plan.dst_storage_uuid)
            assert isinstance(storage, BlockDir)
            used = await used_here(self.host)
            for disk in plan.disks:
                await check_device(storage, disk, used)
            return await self._write_and_define(ctx, plan, self._onto_devices)
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
        return await self._write_and_define(ctx, plan, self._onto_files)

    async def _write_and_define(
        self,
        ctx: TaskContext,
        plan: MigrationPlan,
        write: Callable[[TaskContext, dict[str, Any], MigrationPlan], Awaitable[None]],
    ) -> list[dict[str, Any]]:
        """COPYING (``write``), then the definition rewritten to the new volumes and read back. Until the
        definition is written a failure or cancel removes (or gives back blank) everything the task made."""
        created: list[str] = []
        data: dict[str, Any] = {"engine": "offline", "created": created}
        new = {d.target: plan.dst_source(d) for d in plan.disks}
        try:
            await ctx.enter(TaskState.COPYING)
            await write(ctx, data, plan)
            await ctx.enter(TaskState.SWITCHING)
            await self.host.define_xml(rewrite_disk_sources(await self.host.inactive_xml(ctx.vm_uuid), new))
        except BaseException:
            if not ctx.detaching:
                await asyncio.shield(self._remove(created))
            raise
        await ctx.enter(TaskState.VERIFYING)
        defined = parse_disks(await self.host.inactive_xml(ctx.vm_uuid))
        for now in defined:
            if now.target in new and now.location != new[now.target].location:
                raise MigrationFailed(
                    f"the definition still points {now.target} at {now.location}", code=Code.VERIFY_FAILED
                )
        return await volume_inventory(defined, plan, self.roots)

    async def _onto_files(self, ctx: TaskContext, data: dict[str, Any], plan: MigrationPlan) -> None:
        for layer in plan.layers:
            await self._copy_file(ctx, data, layer)
        for disk in plan.disks:
            # One layer in the same format is flat already: copied as a file, whose limiter reads the
            # budget for every chunk (a PATCH reaches it), where qemu-img convert takes its rate once. A
            # device is read through its format and slice, and its zeros left out of the file.
            one_flat_file = len(disk.src_chain) == 1 and disk.src_format == disk.dst_format
            if disk.src_kind is not StorageKind.FILE or (disk.flatten and not one_flat_file):
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

    async def _onto_images(self, ctx: TaskContext, data: dict[str, Any], plan: MigrationPlan) -> None:
        """Each disk a new thin image (made through libvirt's pool, journalled first): its chain flattened
        into it (``qemu-img convert``, holes left out), or its lower layers written in and snapshotted one by
        one, then its top; compared with the source."""
        pool = self.roots.storage(plan.dst_storage_uuid)
        assert isinstance(pool, RbdPool)
        key = self.keys[pool.uuid]
        for disk in plan.disks:
            image = parse_rbd(disk.dst_top, "volumes")
            await self._record(ctx, data, disk.dst_top)
            await rbdimages.create_image(self.host, pool, image, disk.virtual_size)
            if not disk.lower_layers:
                await self._convert(ctx, disk, ["-n", "--target-is-zero", "-O", "raw"], key.image_json(image))
            else:
                top = LayerPlan(disk.src_top, disk.dst_top, disk.src_format, disk.virtual_size, 0, None, None)
                for layer in (*disk.lower_layers, top):
                    await self._layer_into(ctx, key, image, layer)
                    if layer is not top:
                        await key.create_snapshot(image, layer.dst.rsplit("@", 1)[1])
            if not await qemuimg.compare(self._src(disk), key.image_json(image), objects=self._objects()):
                raise MigrationFailed(
                    f"{disk.target} on {disk.dst_top} differs from its source", code=Code.VERIFY_FAILED
                )

    async def _layer_into(self, ctx: TaskContext, key: KeyedPool, image: RbdImage, layer: LayerPlan) -> None:
        """One layer's own clusters written into the image, which holds the layers below it already."""
        item = f"layer:{os.path.basename(layer.dst)}"
        ctx.progress(item, 0, layer.actual_size)
        result = await copy_layer_into_rbd(
            layer.src,
            layer.format,
            key,
            image,
            rate=lambda: self._rate(ctx),
            on_progress=lambda done, total: ctx.progress(item, done, max(total, layer.actual_size)),
        )
        ctx.progress(item, result.bytes_total, result.bytes_total)

    async def _onto_devices(self, ctx: TaskContext, data: dict[str, Any], plan: MigrationPlan) -> None:
        """Each disk's chain written raw onto its device (``qemu-img convert -n``: the holes as zeros, since
        a device's bytes past its first MiB may be old) and compared over the disk's size; the definition
        then points at the devices (a storage slice where a device is larger than the disk)."""
        for disk in plan.disks:
            await self._record(ctx, data, disk.dst_top)
            await self._convert(ctx, disk, ["-n", "-O", "raw"], disk.dst_top)
            device = {
                "driver": "raw",
                "size": disk.virtual_size,
                "file": {"driver": "host_device", "filename": disk.dst_top},
            }
            if not await qemuimg.compare(
                self._src(disk), "json:" + json.dumps(device), objects=self._objects()
            ):
                raise MigrationFailed(
                    f"{disk.target} on {disk.dst_top} differs from its source", code=Code.VERIFY_FAILED
                )

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
        await self._convert(ctx, disk, ["-O", disk.dst_format], disk.dst_top)
        if not await qemuimg.compare(self._src(disk), disk.dst_top, objects=self._objects()):
            raise MigrationFailed(
                f"the flattened copy of {disk.target} differs from its source", code=Code.VERIFY_FAILED
            )

    async def _convert(self, ctx: TaskContext, disk: DiskPlan, options: list[str], dst: str) -> None:
        """``qemu-img convert`` of the disk's chain into ``dst``, at the task's rate when it starts."""
        ctx.progress(f"disk:{disk.target}", 0, disk.estimated_bytes)
        args = ["qemu-img", "convert", *self._objects(), "-U", *options]
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
            await qemuimg.run(*args, self._src(disk), dst, limit_s=None)
        finally:
            self.transfer.unpin()
        ctx.progress(f"disk:{disk.target}", disk.estimated_bytes, disk.estimated_bytes)
