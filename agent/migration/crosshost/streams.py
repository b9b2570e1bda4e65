"""A cross-host migration's knobs, as ``LiveLimits`` applies them (``agent.migration.limits.Streams``).

The NBD disk mirrors are reached through QMP (libvirt hides a migration's mirror jobs and refuses
``blockJobSetSpeed`` while the migration job holds the domain); the migration stream's speed and the
downtime through libvirt, which keeps its own copy of them; everything is read back with QMP
(``query-block-jobs``, ``query-migrate-parameters``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.migration import convergence
from agent.migration.engine import TaskContext
from agent.migration.limits import KEEP, UNCAPPED_MIB, Effective, Targets, stream_speed
from agent.migration.mirrors.pacer import MirrorPacer
from agent.units import MiB
from agent.virt.host import VirtHost


def job_device(job_devices: Mapping[str, Mapping[str, Any]], alias: str) -> Mapping[str, Any] | None:
    """The mirror job of a disk: libvirt names a migration's mirror jobs after the disk's alias
    ("drive-virtio-disk0")."""
    return job_devices.get(f"drive-{alias}") or job_devices.get(alias)


def stream_target(budget: int | None) -> int | None:
    """The migration stream's speed for a budget as libvirt can set it: whole MiB/s, at least 1 (None: no
    limit). QEMU then reports exactly this, so a reading equal to it needs no change."""
    return None if budget is None else max(1, budget // MiB) * MiB


class MigrationStreams:
    """The knobs of one cross-host migration, for ``LiveLimits``."""

    def __init__(
        self,
        host: VirtHost,
        ctx: TaskContext,
        pacer: MirrorPacer,
        controller: convergence.ConvergenceController,
        aliases: Mapping[str, str],
        *,
        last_reading: Callable[[], convergence.MigrationSample | None],
        on_note: Callable[[convergence.Note], None],
    ) -> None:
        self.host = host
        self.ctx = ctx
        self.pacer = pacer
        self.controller = controller
        self.aliases = aliases  # target -> libvirt's disk alias (filled when the migration starts)
        self.devices: dict[str, str] = {}  # target -> its mirror job's device, as the latest reading named it
        self.last_reading = last_reading
        self.on_note = on_note

    def targets(self, budget: int | None, downtime_ms: int) -> Targets:
        """The disks at the pacer's speeds under ``budget``, the stream at the whole budget (the disks are
        paced by their own jobs; the stream carries memory), and what the controller makes of the change."""
        self.controller.retune(max_downtime_ms=downtime_ms, bandwidth=budget)
        downtime: int = KEEP
        reading = self.last_reading()
        if reading is not None:
            for action in self.controller.take_retune(reading):
                if isinstance(action, convergence.SetDowntime):
                    downtime = action.ms
                elif isinstance(action, convergence.Note):
                    self.on_note(action)
        return Targets(disks=self.pacer.speeds(budget), stream=stream_target(budget), downtime_ms=downtime)

    async def set_disk_speed(self, target: str, bytes_per_s: int) -> None:
        asked = time.monotonic()
        device = self.devices.get(target) or f"drive-{self.aliases.get(target, target)}"
        await self.host.qmp(
            self.ctx.vm_uuid, "block-job-set-speed", {"device": device, "speed": int(bytes_per_s)}
        )
        self.pacer.mirrors[target].speed = bytes_per_s
        self.pacer.clock.landed(time.monotonic() - asked)

    async def set_stream_speed(self, bytes_per_s: int | None) -> None:
        mib = UNCAPPED_MIB if bytes_per_s is None else max(1, bytes_per_s // MiB)
        await self.host.set_migration_speed(self.ctx.vm_uuid, mib)
        if self.controller.policy.postcopy_permitted:
            # Once post-copy runs QEMU paces the stream by max-postcopy-bandwidth (0: no limit), not by
            # max-bandwidth. Set through QMP: libvirt only takes it when the migration starts.
            postcopy = 0 if bytes_per_s is None else mib * MiB
            await self.host.qmp(
                self.ctx.vm_uuid, "migrate-set-parameters", {"max-postcopy-bandwidth": postcopy}
            )

    async def set_downtime(self, ms: int) -> None:
        await self.host.set_max_downtime(self.ctx.vm_uuid, ms)

    async def read(self) -> Effective:
        jobs = await self.host.qmp(self.ctx.vm_uuid, "query-block-jobs")
        return self.disks_of(jobs or []).merged(await self.read_stream())

    async def read_stream(self) -> Effective:
        """The migration stream's speeds and the downtime limit, from QEMU."""
        params = await self.host.qmp(self.ctx.vm_uuid, "query-migrate-parameters") or {}
        postcopy = int(params.get("max-postcopy-bandwidth", 0))
        return Effective(
            has_stream=True,
            stream=stream_speed(int(params.get("max-bandwidth", 0))),
            postcopy_stream=postcopy or None,
            downtime_ms=int(params["downtime-limit"]) if "downtime-limit" in params else None,
            read_at=time.time(),
        )

    def disks_of(self, jobs: list[dict[str, Any]]) -> Effective:
        """Each disk mirror's speed in a ``query-block-jobs`` answer."""
        by_device = {str(job.get("device", "")): job for job in jobs}
        disks: dict[str, int] = {}
        for target, alias in self.aliases.items():
            job = job_device(by_device, alias)
            if job is not None:
                disks[target] = int(job.get("speed", 0))
        return Effective(disks=disks, read_at=time.time())
