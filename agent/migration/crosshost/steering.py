"""Steering a running migration, one tick at a time: progress, the disk mirrors' pacing, a stall, and the
convergence controller's actions on the memory phase."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

import libvirt

from agent.errors import AgentError, Code, MigrationFailed
from agent.migration import convergence, hotdisk
from agent.migration.crosshost.params import MiB, first_mirror_speed
from agent.migration.engine import TaskContext
from agent.migration.pacer import BY_REMAINING, JobFigures, MirrorPacer, PacedMirror, judge_budget
from agent.migration.pacing import AllocationIndex, SteeringClock
from agent.migration.plan import MigrationPlan
from agent.migration.request import Strategy
from agent.migration.states import TaskState
from agent.virt.host import VirtHost

#: A migration whose byte counters do not move for this long is stuck (a cut link does not end it in
#: libvirt 9.0: the NBD mirror fails and the job waits forever); it is aborted with a clear error.
STALL_S = 30.0
#: Assumed time for a disk speed change to land until one has been timed (see ``SteeringClock``): a call
#: takes milliseconds, but the first samples of a migration can come late on a busy host.
FIRST_CHANGE_S = 0.5


class Steering:
    """One tick of the running migration: progress, disk pacing, and the convergence controller."""

    def __init__(
        self,
        host: VirtHost,
        ctx: TaskContext,
        plan: MigrationPlan,
        indexes: Mapping[str, AllocationIndex],
        controller: convergence.ConvergenceController,
        *,
        tick_s: float,
    ) -> None:
        self.host = host
        self.ctx = ctx
        self.plan = plan
        self.controller = controller
        # libvirt starts every mirror at the migration's bandwidth (migration_params).
        first = first_mirror_speed(ctx.bandwidth, plan) if ctx.bandwidth else 0
        self.mirrors = {
            d.target: PacedMirror(d.target, indexes[d.target], d.virtual_size, speed=first)
            for d in plan.disks
        }
        # Speed changes go through libvirt's QMP passthrough: they run in the background, one per disk at a
        # time, and speeds are planned for as long as changes are seen to take (a busy libvirtd answers late).
        clock = SteeringClock(tick_s, first_s=FIRST_CHANGE_S, margin=1.0)
        self.pacer = MirrorPacer(ctx, BY_REMAINING, clock, self.mirrors, hotdisk.BudgetMeter())
        self.changing: dict[str, asyncio.Task[None]] = {}
        self.last_reading: convergence.MigrationSample | None = None  # for explain_deadline
        self.postcopy_started = False
        self.memory_phase = False
        self.verdict: AgentError | None = None
        self.decisions: list[dict[str, Any]] = []
        self.samples = 0
        self.aliases: dict[str, str] = {}
        self.last_counter = -1
        self.last_moved_at = time.monotonic()

    def watch_disks(
        self, written: Mapping[str, int], rates: Mapping[str, float], write_blocking: bool
    ) -> None:
        """Watch every disk's guest writes from here on (``written``: the counters when the migration
        started; ``rates``: as measured before it, for the figures until the window fills)."""
        mode = hotdisk.Mode.WRITE_BLOCKING if write_blocking else hotdisk.Mode.BACKGROUND
        self.pacer.start(time.monotonic())
        for disk in self.plan.disks:
            mirror = self.mirrors[disk.target]
            mirror.watch = hotdisk.DiskWatch(disk.target, mode=mode)
            mirror.written_at_start = mirror.written = written[disk.target]

    def judge_budget(self) -> None:
        """The disk phase's real-bytes rate against the cap; over it by more than 10 %: say so."""
        judge_budget(self.ctx, self.pacer.meter, self.pacer.watches, phase="disks")

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
            self.pacer.counting = False  # the disks' budget is judged on their own phase
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
                    code=Code.MIGRATION_STALLED,
                    details="the link to the destination or the destination itself does not answer",
                )
            )

    async def _give_up(self, verdict: AgentError) -> None:
        self.verdict = verdict
        self.ctx.log.error("aborting the migration: %s", verdict.description)
        await self.host.abort_job(self.ctx.vm_uuid)

    async def _disks(self) -> None:
        """Pace the NBD mirrors (the shared mirror pacer) so the budget is charged for real bytes, across all
        disks; a mirror that cannot converge ends the migration early (libvirt has one copy mode for a whole
        migration, chosen at its start)."""
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
        sampled = time.monotonic()
        pacer = self.pacer
        writes: dict[str, int] = {}
        if pacer.watches:
            with contextlib.suppress(AgentError):
                writes = await self.host.block_writes(self.ctx.vm_uuid, list(pacer.watches))
        figures: dict[str, JobFigures] = {}
        devices: dict[str, str] = {}
        for disk in self.plan.disks:
            job = by_disk.get(disk.target)
            if job is None:
                continue
            if job.get("status") == "concluded" and job.get("error") and self.verdict is None:
                await self._give_up(
                    MigrationFailed(
                        f"copying {disk.target} to the destination failed: {job['error']}",
                        code=Code.DISK_COPY_FAILED,
                        details="the link or the destination storage failed; the VM keeps running here",
                    )
                )
                return
            figures[disk.target] = JobFigures(int(job["offset"]), int(job["len"]), bool(job.get("ready")))
            devices[disk.target] = str(job["device"])
        samples = pacer.observe(sampled, figures, writes)
        shares = pacer.shares(samples)
        pacer.figures(sampled, shares)
        losing = pacer.losing(shares, sampled)
        if losing and self.verdict is None:
            await self._give_up(self._disk_verdict(losing[0], shares))
            return
        for target, sample in samples.items():
            speed = pacer.next_speed(target, sample, shares.get(target))
            pending = self.changing.get(target)
            if speed is not None and (pending is None or pending.done()):
                self.changing[target] = asyncio.create_task(self._set_speed(target, devices[target], speed))

    def _disk_verdict(self, target: str, shares: Mapping[str, int | None]) -> AgentError:
        watch, share, budget = self.mirrors[target].watch, shares[target], self.ctx.bandwidth
        assert watch is not None and share is not None and budget is not None
        hint = (
            None
            if self.ctx.request.primaryStorageMigrateVm.strategy is Strategy.PRECOPY
            else "auto started it in background mode from the write rate it measured first"
        )
        return hotdisk.disk_verdict(watch, share, budget, len(self.pacer.watches), hint=hint)

    async def _set_speed(self, target: str, device: str, speed: int) -> None:
        asked = time.monotonic()
        with contextlib.suppress(AgentError):
            await self.host.qmp(self.ctx.vm_uuid, "block-job-set-speed", {"device": device, "speed": speed})
            self.mirrors[target].speed = speed
        self.pacer.clock.landed(time.monotonic() - asked)

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
