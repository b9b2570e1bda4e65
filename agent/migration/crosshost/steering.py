"""Steering a running migration, one tick at a time: progress, the disk mirrors' pacing, a stall, and the
convergence controller's actions on the memory phase. Every limit it changes goes through the migration's
``LiveLimits`` (``agent.migration.limits``), which a PATCH uses too."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

import libvirt

from agent.errors import AgentError, Code, MigrationFailed
from agent.migration import convergence
from agent.migration.crosshost.streams import MigrationStreams, job_device, stream_target
from agent.migration.engine import TaskContext
from agent.migration.limits import LiveLimits, Targets
from agent.migration.mirrors import hotdisk
from agent.migration.mirrors.pacer import (
    BY_REMAINING,
    FIGURES_EVERY_S,
    JobFigures,
    MirrorPacer,
    PacedMirror,
    judge_budget,
)
from agent.migration.mirrors.speeds import UNLIMITED_SPEED, AllocationIndex, SteeringClock
from agent.migration.plan import MigrationPlan
from agent.migration.request import Strategy
from agent.migration.states import TaskState
from agent.virt.domxml import parse_disks
from agent.virt.host import VirtHost

#: A migration whose byte counters do not move for this long is stuck (a cut link does not end it in
#: libvirt 9.0: the NBD mirror fails and the job waits forever); it is aborted with a clear error.
STALL_S = 30.0
#: Assumed time for a disk speed change to land until one has been timed (see ``SteeringClock``): a call
#: takes milliseconds, but the first samples of a migration can come late on a busy host.
FIRST_CHANGE_S = 0.5


async def disk_aliases(host: VirtHost, vm_uuid: str) -> dict[str, str]:
    """target -> libvirt's alias of each disk of the running domain (its mirror job's name in QEMU)."""
    return {d.target: d.alias for d in parse_disks(await host.live_xml(vm_uuid)) if d.alias}


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
        aliases: Mapping[str, str],
        tick_s: float,
    ) -> None:
        """``aliases``: target -> libvirt's alias of each disk, naming its mirror job (``disk_aliases``)."""
        self.host = host
        self.ctx = ctx
        self.plan = plan
        self.controller = controller
        # Each mirror's speed in effect is read from QEMU every tick (libvirt starts them at the migration's
        # bandwidth when it began, which a PATCH may have changed since).
        self.mirrors = {
            d.target: PacedMirror(d.target, indexes[d.target], d.virtual_size) for d in plan.disks
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
        self.last_counter = -1
        self.last_moved_at = time.monotonic()
        self.streams = MigrationStreams(
            host,
            ctx,
            self.pacer,
            controller,
            dict(aliases),
            last_reading=lambda: self.last_reading,
            on_note=self._note,
        )
        self.limits = LiveLimits(ctx, self.streams)
        self.pacer.limits = self.limits  # the pacer paces within them; they set speeds through the streams
        # Made and attached with no await between: a PATCH journalled meanwhile is either read by the limits
        # (ctx.bandwidth) or applied through them.
        ctx.attach_limits(self.limits)
        self._stream_read_at = 0.0

    @property
    def aliases(self) -> dict[str, str]:
        """target -> libvirt's alias of the disk, which names its mirror job."""
        return dict(self.streams.aliases)

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
            await self.ctx.enter(TaskState.CONVERGING)
        await self._stream()
        sample = convergence.MigrationSample.from_job_stats(stats, time.monotonic())
        self.last_reading = sample
        self.controller.retune(max_downtime_ms=self.limits.downtime_ms, bandwidth=self.limits.budget)
        for action in self.controller.observe(sample):
            await self._apply(action)

    async def _stream(self) -> None:
        """The migration stream carries the whole budget (libvirt started it, and every mirror, at one
        share); its speed and the downtime are read back from QEMU about once a second."""
        now = time.monotonic()
        if now - self._stream_read_at < FIGURES_EVERY_S:
            return
        self._stream_read_at = now
        limits = self.limits
        try:
            limits.observe(await self.streams.read_stream())
        except AgentError as err:
            self.ctx.log.debug("limits: query-migrate-parameters failed: %s", err.description)
        await limits.apply(Targets(stream=stream_target(limits.budget)), limits.generation)

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
        by_device = {str(job.get("device", "")): job for job in jobs or []}
        by_disk: dict[str, Mapping[str, Any]] = {}
        for target, alias in self.streams.aliases.items():
            job = job_device(by_device, alias)
            if job is not None:
                by_disk[target] = job
        if not by_disk:
            return
        effective = self.streams.disks_of(jobs)
        self.limits.observe(effective)
        for target, in_effect in effective.disks.items():
            self.mirrors[target].speed = in_effect  # what QEMU runs it at, not what was asked
        sampled = time.monotonic()
        pacer = self.pacer
        writes: dict[str, int] = {}
        if pacer.watches:
            with contextlib.suppress(AgentError):
                writes = await self.host.block_writes(self.ctx.vm_uuid, list(pacer.watches))
        figures: dict[str, JobFigures] = {}
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
            self.streams.devices[disk.target] = str(job["device"])
        samples = pacer.observe(sampled, figures, writes)
        shares = pacer.shares(samples)
        pacer.figures(sampled, shares)
        losing = pacer.losing(shares, sampled)
        if losing and self.verdict is None:
            await self._give_up(self._disk_verdict(losing[0], shares))
            return
        generation = self.limits.generation  # the budget the shares were made under
        steady = pacer.speed_shares(samples)
        for target, sample in samples.items():
            speed = pacer.next_speed(target, sample, steady.get(target))
            pending = self.changing.get(target)
            if speed is not None and (pending is None or pending.done()):
                self.changing[target] = asyncio.create_task(self._set_speed(target, speed, generation))

    def _disk_verdict(self, target: str, shares: Mapping[str, int | None]) -> AgentError:
        watch, share, budget = self.mirrors[target].watch, shares[target], self.pacer.budget
        assert watch is not None and share is not None and budget is not None
        hint = (
            None
            if self.ctx.request.primaryStorageMigrateVm.strategy is Strategy.PRECOPY
            else "auto started it in background mode from the write rate it measured first"
        )
        return hotdisk.disk_verdict(watch, share, budget, len(self.pacer.watches), hint=hint)

    async def _set_speed(self, target: str, speed: int, generation: int) -> None:
        """In the background: a busy libvirtd answers QMP late, and the tick must go on meanwhile."""
        await self.limits.apply(Targets(disks={target: speed}), generation)

    async def close(self) -> None:
        """The job is over: speed changes still on their way are of no use; cancelled and awaited. A PATCH
        from here on has no stream to apply to."""
        self.ctx.attach_limits(None)
        pending = list(self.changing.values())
        for task in pending:
            task.cancel()
        # Their failures were logged where they ran; here only their end matters.
        await asyncio.gather(*pending, return_exceptions=True)
        self.changing.clear()

    def _note(self, note: convergence.Note) -> None:
        self.ctx.log.info("convergence: %s %s", note.message, note.figures)
        self.decisions.append({"message": note.message, **dict(note.figures)})
        self.ctx.note("decisions", self.decisions[-20:])

    async def _apply(self, action: convergence.Action) -> None:
        vm = self.ctx.vm_uuid
        if isinstance(action, convergence.Note):
            self._note(action)
        elif isinstance(action, convergence.SetDowntime):
            await self.limits.apply(Targets(downtime_ms=action.ms))
        elif isinstance(action, convergence.SetBandwidth):
            speed = None if action.bytes_per_s >= UNLIMITED_SPEED else action.bytes_per_s
            await self.limits.apply(Targets(stream=stream_target(speed)), self.limits.generation)
        elif isinstance(action, convergence.StartPostCopy):
            self.ctx.log.warning("switching to post-copy: from here a failure cannot roll back")
            await self.host.start_postcopy(vm)
            self.postcopy_started = True
            self.ctx.note("postcopy", "started; a failure after this point cannot roll back")
        elif isinstance(action, convergence.Abort):
            await self._give_up(action.to_error())

    def summary(self) -> dict[str, Any]:
        return {"samples": self.samples, "postcopy": self.postcopy_started, "decisions": self.decisions[-20:]}
