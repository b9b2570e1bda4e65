"""Undo before the switch: every mirror aborted without pivot and every file the task created removed; the
VM never stopped using its source volumes."""

from __future__ import annotations

import asyncio

from agent.errors import AgentError
from agent.migration.engine import TaskContext
from agent.migration.samehost.work import Work
from agent.migration.volumes import release_created
from agent.storage.roots import StorageRoots
from agent.virt.host import VirtHost


async def abandon(host: VirtHost, roots: StorageRoots, ctx: TaskContext, work: Work) -> None:
    """Undo everything before the switch, shielded from the cancel that brought us here."""
    await asyncio.shield(_abandon(host, roots, ctx, work))


async def _abandon(host: VirtHost, roots: StorageRoots, ctx: TaskContext, work: Work) -> None:
    if work.mirrors and not await host.wait_reachable():
        # A mirror may still be writing into the destination files: removing them would leave a block
        # job on a deleted file that the next attempt trips over. Keep them and say so.
        ctx.log.error("libvirtd unreachable: mirrors not aborted, destination files kept")
        ctx.note("destinationFilesKept", list(work.created))
        return
    for target in work.mirrors:
        try:
            if await host.block_job(ctx.vm_uuid, target) is not None:
                await host.abort_block_job_and_wait(ctx.vm_uuid, target)
        except AgentError as err:
            ctx.log.error("could not abort the mirror of %s: %s", target, err.description)
    await remove_created(host, roots, ctx, work)
    ctx.log.info(
        "abandoned: mirrors aborted, %d destination files removed; VM %s stays on its source volumes",
        len(work.created),
        ctx.vm_uuid,
    )


async def remove_created(host: VirtHost, roots: StorageRoots, ctx: TaskContext, work: Work) -> None:
    """Undo the volumes this task created, newest first, each by its kind (``volumes.release_created``: a
    file removed, a block device given back blank); a location outside every storage is not touched."""
    for location in reversed(work.created):
        await release_created(host, roots, location, ctx.log)
