"""The block copies themselves: one mirror per disk, started with ``VirtHost.block_copy`` (shallow unless a
chain is flattened or the target may hold old bytes: ``DiskPlan.shallow``), restarted in write-blocking
mode when it loses to the guest, and followed through libvirt's block-job events."""

from __future__ import annotations

import libvirt

from agent.errors import Code, MigrationFailed
from agent.migration.engine import Step, TaskContext
from agent.migration.mirrors import hotdisk
from agent.migration.mirrors.hotdisk import Mode
from agent.migration.samehost.work import Mirror, Work
from agent.migration.volumes import start_over
from agent.virt.domxml import block_copy_dest_xml
from agent.virt.host import DomainEvent, VirtHost


async def start_mirror(
    host: VirtHost, ctx: TaskContext, work: Work, mirror: Mirror, share: int | None
) -> None:
    """Start the block copy of one disk at ``share`` bytes/s (None: no limit), in the mirror's mode."""
    flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
    if mirror.disk.shallow:
        flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
    if mirror.mode is Mode.WRITE_BLOCKING:
        flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES
    target = mirror.disk.target
    written = (await host.block_writes(ctx.vm_uuid, [target]))[target]
    await host.block_copy(
        ctx.vm_uuid,
        target,
        block_copy_dest_xml(work.dst_source(mirror.disk)),
        bandwidth=share,
        flags=flags,
    )
    mirror.restarted(share or 0, written)
    ctx.log.info(
        "mirror of %s started: %s -> %s%s, %s",
        target,
        mirror.disk.src_top,
        mirror.disk.dst_top,
        " (shallow)" if mirror.disk.shallow else " (full)",
        mirror.mode.value,
    )


async def restart_write_blocking(host: VirtHost, ctx: TaskContext, work: Work, mirror: Mirror) -> None:
    """Restart a losing background mirror in write-blocking mode (QEMU 7.2 cannot switch a running job):
    abort it without pivot, start the destination top over, mirror again."""
    target = mirror.disk.target
    mirror.ends_to_ignore += 1
    if not await host.abort_block_job_and_wait(ctx.vm_uuid, target):
        raise MigrationFailed(f"the background mirror of {target} did not end after its abort")
    if not mirror.disk.precreated:
        await start_over(host, work.dst, mirror.disk)
    assert mirror.watch is not None
    mirror.watch.restart(Mode.WRITE_BLOCKING)
    await ctx.checkpoint(work.checkpoint_data(Step.MIRRORING))
    shares = hotdisk.disk_shares(ctx.bandwidth, work.watches, work.ready)
    await start_mirror(host, ctx, work, mirror, shares[target])


def on_event(work: Work, event: DomainEvent) -> None:
    """A block-job event: READY marks the mirror ready; a failed or cancelled mirror fails the task
    (``AGENT.BLOCK_JOB_FAILED``), unless this task aborted it to restart it."""
    if event.kind != "block-job" or event.job_type != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY:
        return
    mirror = next((m for t, m in work.mirrors.items() if event.disk in (t, m.disk.src_top)), None)
    if mirror is None:
        return
    ended = (
        libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED,
        libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED,
        libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED,
    )
    if event.status in ended and mirror.ends_to_ignore:
        mirror.ends_to_ignore -= 1  # a mirror this task aborted to restart it
        return
    if event.status == libvirt.VIR_DOMAIN_BLOCK_JOB_READY:
        mirror.ready = True
    elif event.status in (libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED, libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED):
        what = "failed" if event.status == libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED else "was cancelled"
        raise MigrationFailed(
            f"the mirror of {mirror.disk.target} {what}",
            code=Code.BLOCK_JOB_FAILED,
            details="often the destination storage ran out of space; see the libvirt log",
        )
