"""A same-host move's knobs, as ``LiveLimits`` applies them (``agent.migration.limits.Streams``): each disk's
block copy job, through libvirt (``blockJobSetSpeed``, read back with ``blockJobInfo``). There is no
migration stream and no downtime to set: the switch is a pivot."""

from __future__ import annotations

import time

from agent.errors import AgentError, Code
from agent.migration.engine import TaskContext
from agent.migration.limits import Effective, Targets
from agent.migration.mirrors.pacer import MirrorPacer
from agent.migration.samehost.work import Work
from agent.virt.host import VirtHost


class BlockJobStreams:
    """The block copy jobs of one same-host move, for ``LiveLimits``."""

    def __init__(self, host: VirtHost, ctx: TaskContext, work: Work) -> None:
        self.host = host
        self.ctx = ctx
        self.work = work
        self.pacer: MirrorPacer | None = None  # the pacing loop's, once it runs

    def targets(self, budget: int | None, downtime_ms: int) -> Targets:
        """The pacer's speeds under ``budget`` (before its first sample: none, its first tick sets them)."""
        return Targets(disks=self.pacer.speeds(budget) if self.pacer is not None else {})

    async def set_disk_speed(self, target: str, bytes_per_s: int) -> None:
        await self.host.set_block_job_speed(self.ctx.vm_uuid, target, bytes_per_s)
        self.work.mirrors[target].speed = bytes_per_s

    async def set_stream_speed(self, bytes_per_s: int | None) -> None:
        raise AgentError("a move on one host has no migration stream", code=Code.INTERNAL)

    async def set_downtime(self, ms: int) -> None:
        raise AgentError(
            "a move on one host has no downtime to set (the switch is a pivot)", code=Code.INTERNAL
        )

    async def read(self) -> Effective:
        disks: dict[str, int] = {}
        for target in self.work.mirrors:
            job = await self.host.block_job(self.ctx.vm_uuid, target)
            if job is not None:
                disks[target] = job.bandwidth
        return Effective(disks=disks, read_at=time.time())
