"""COPYING, first part: lower layers copied as files (sparse, rate-limited, outside the guest's I/O path),
pointed at their new backing files and compared; then the destination tops created. Every file is
journalled before it is created, so a restart knows to remove it."""

from __future__ import annotations

import os

from agent.errors import Code, MigrationFailed
from agent.migration.engine import Step, TaskContext
from agent.migration.plan import LayerPlan
from agent.migration.samehost.work import Work
from agent.migration.volumes import create_top
from agent.storage import qemuimg, rbdimages
from agent.storage.filecopy import copy_sparse_async
from agent.storage.locations import is_rbd, parse_rbd
from agent.storage.rbdkey import keyed
from agent.storage.rbdpool import RbdPool
from agent.storage.roots import StorageRoots
from agent.transfer.send import copy_layer_into_rbd
from agent.virt.host import VirtHost


async def record_created(roots: StorageRoots, ctx: TaskContext, work: Work, path: str, step: Step) -> None:
    """Journal a volume (a file, a device, an image) before creating or writing it, so a restart knows to
    undo it."""
    if not roots.owner_of_location(path):
        raise MigrationFailed(f"refusing to create {path}: not inside a storage of this host")
    work.created.append(path)
    await ctx.checkpoint(work.checkpoint_data(step))


async def copy_layers(host: VirtHost, roots: StorageRoots, ctx: TaskContext, work: Work) -> None:
    for layer in work.plan.layers:
        item = f"layer:{os.path.basename(layer.dst)}"
        if layer.dst in work.reused:
            ctx.progress(item, layer.actual_size, layer.actual_size)
            continue
        if is_rbd(layer.dst):
            await layer_into_snapshot(host, roots, ctx, work, layer)
            continue
        await record_created(roots, ctx, work, layer.dst, Step.COPYING_LAYERS)
        done = 0

        def on_bytes(n: int, item: str = item, size: int = layer.actual_size) -> None:
            nonlocal done
            done += n
            ctx.progress(item, done, max(size, done))

        ctx.progress(item, 0, layer.actual_size)
        await copy_sparse_async(layer.src, layer.dst, rate=lambda: ctx.bandwidth, on_bytes=on_bytes)
        if layer.backing_dst is not None:
            await qemuimg.rebase_unsafe(layer.dst, layer.backing_dst, layer.backing_format or "qcow2")
        if not await qemuimg.compare(layer.src, layer.dst):
            raise MigrationFailed(
                f"the copy of {layer.src} at {layer.dst} differs from its source",
                code=Code.VERIFY_FAILED,
            )
        ctx.progress(item, done, done)
        ctx.log.info("layer %s copied to %s (%d bytes) and verified", layer.src, layer.dst, done)


async def layer_into_snapshot(
    host: VirtHost, roots: StorageRoots, ctx: TaskContext, work: Work, layer: LayerPlan
) -> None:
    """A lower layer kept as an RBD snapshot: its own clusters written into the image (made, journalled
    first, with the first layer), compared with the layer's chain, then the image snapshotted."""
    location, name = layer.dst.rsplit("@", 1)
    pool = work.dst
    assert isinstance(pool, RbdPool)
    image = parse_rbd(location, "volumes")
    if location not in work.created:
        disk = next(d for d in work.plan.disks if d.dst_top == location)
        await record_created(roots, ctx, work, location, Step.COPYING_LAYERS)
        await rbdimages.create_image(host, pool, image, disk.virtual_size)
    item = f"layer:{os.path.basename(layer.dst)}"
    ctx.progress(item, 0, layer.actual_size)
    async with keyed(pool, "keeping a chain as RBD snapshots") as key:
        result = await copy_layer_into_rbd(
            layer.src,
            layer.format,
            key,
            image,
            rate=lambda: ctx.bandwidth,
            on_progress=lambda done, total: ctx.progress(item, done, max(total, layer.actual_size)),
        )
        if not await qemuimg.compare(layer.src, key.image_json(image), objects=key.qemu_objects()):
            raise MigrationFailed(
                f"{location} differs from {layer.src} after the layer was written", code=Code.VERIFY_FAILED
            )
        await key.create_snapshot(image, name)
    ctx.progress(item, result.bytes_total, result.bytes_total)
    ctx.log.info(
        "layer %s written into %s (%d bytes), verified, kept as snapshot %s",
        layer.src,
        location,
        result.bytes_total,
        name,
    )


async def create_tops(host: VirtHost, roots: StorageRoots, ctx: TaskContext, work: Work) -> None:
    """Every destination top, journalled first (a block device too: a failed move gives it back blank). An
    RBD image that holds the lower layers as snapshots was made with its first layer."""
    for disk in work.plan.disks:
        if disk.precreated or disk.dst_top in work.created:
            continue  # the caller's file: checked in PREPARING, never created nor removed here
        await record_created(roots, ctx, work, disk.dst_top, Step.CREATING_TOPS)
        await create_top(host, work.dst, disk)
