"""Steering a running migration, one tick at a time: progress, the disk mirrors' pacing, a stall, and the
convergence controller's actions on the memory phase."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import libvirt

from agent.errors import AgentError, MigrationFailed
from agent.migration import convergence, hotdisk
from agent.migration.crosshost.params import MiB, first_mirror_speed
from agent.migration.engine import TaskContext
from agent.migration.pacing import (
    POSITIONAL_SLACK,
    SPEED_SLACK,
    AllocationIndex,
    MirrorSample,
    SteeringClock,
    job_speed,
    real_bytes_done,
    split_by_remaining,
    worth_changing,
)
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
        self.indexes = indexes
        self.controller = controller
        # libvirt starts every mirror at the migration's bandwidth (migration_params).
        first = first_mirror_speed(ctx.bandwidth, plan) if ctx.bandwidth else 0
        self.speeds: dict[str, int] = {d.target: first for d in plan.disks}
        # Speed changes go through libvirt's QMP passthrough: they run in the background, one per disk at a
        # time, and speeds are planned for as long as changes are seen to take (a busy libvirtd answers late).
        self.clock = SteeringClock(tick_s, first_s=FIRST_CHANGE_S, margin=1.0)
        self.changing: dict[str, asyncio.Task[None]] = {}
        self.last_sample: float | None = None
        self.last_reading: convergence.MigrationSample | None = None  # for explain_deadline
        self.postcopy_started = False
        self.memory_phase = False
        self.verdict: AgentError | None = None
        self.decisions: list[dict[str, Any]] = []
        self.samples = 0
        self.aliases: dict[str, str] = {}
        self.last_counter = -1
        self.last_moved_at = time.monotonic()
        # Hot disks (issue 16): each disk's guest writes and whether its mirror gains.
        self.watches: dict[str, hotdisk.DiskWatch] = {}
        self.written_at_start: dict[str, int] = {}
        self.written: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.meter = hotdisk.BudgetMeter()
        self.figures_at = 0.0
        self.rates: list[dict[str, Any]] = []
        self.interval_bytes = [0, 0]  # background, guest writes (write-blocking) since the last rate sample
        self.interval_at: float | None = None
        self.disk_mode = hotdisk.Mode.BACKGROUND

    def watch_disks(
        self, written: Mapping[str, int], rates: Mapping[str, float], write_blocking: bool
    ) -> None:
        """Watch every disk's guest writes from here on (``written``: the counters when the migration
        started; ``rates``: as measured before it, for the figures until the window fills)."""
        mode = hotdisk.Mode.WRITE_BLOCKING if write_blocking else hotdisk.Mode.BACKGROUND
        self.meter.start(time.monotonic())
        self.interval_at = self.meter.started
        for disk in self.plan.disks:
            self.watches[disk.target] = hotdisk.DiskWatch(disk.target, mode=mode)
            self.written_at_start[disk.target] = self.written[disk.target] = written[disk.target]
        self.disk_mode = mode

    def judge_budget(self) -> None:
        """The disk phase's real-bytes rate against the cap; over it by more than 10 %: say so."""
        budget = self.ctx.bandwidth
        self.ctx.note(
            "budget",
            {
                "realBytesPerSecond": int(self.meter.rate),
                "capBytesPerSecond": budget,
                "realBytes": self.meter.bytes,
                "phase": "disks",
            },
        )
        if budget is not None and self.meter.over(budget, len(self.watches)):
            note = hotdisk.over_budget_note(self.meter, budget, self.watches)
            self.ctx.log.warning("over the budget: %s", note["message"])
            self.ctx.note("overBudget", note)

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
                    code="AGENT.MIGRATION_STALLED",
                    details="the link to the destination or the destination itself does not answer",
                )
            )

    async def _give_up(self, verdict: AgentError) -> None:
        self.verdict = verdict
        self.ctx.log.error("aborting the migration: %s", verdict.description)
        await self.host.abort_job(self.ctx.vm_uuid)

    async def _disks(self) -> None:
        """Steer the NBD mirrors so the budget is charged for real bytes, across all disks."""
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
        # A speed set now stays in effect until the next sample at least, so the gaps between samples count as
        # latency too.
        sampled = time.monotonic()
        if self.last_sample is not None:
            self.clock.landed(sampled - self.last_sample)
        self.last_sample = sampled
        samples: dict[str, tuple[MirrorSample, str]] = {}
        writes: dict[str, int] = {}
        if self.watches:
            with contextlib.suppress(AgentError):
                writes = await self.host.block_writes(self.ctx.vm_uuid, list(self.watches))
        blocking = self.watches and self.disk_mode is hotdisk.Mode.WRITE_BLOCKING
        for disk in self.plan.disks:
            job = by_disk.get(disk.target)
            if job is None:
                continue
            offset, length = int(job["offset"]), int(job["len"])
            guest = max(0, writes.get(disk.target, 0) - self.written_at_start.get(disk.target, 0))
            if blocking:  # QEMU counts the guest's synchronous copies as progress too (hotdisk)
                offset = max(0, offset - guest)
                length = max(offset, length - guest)
            if job.get("status") == "concluded" and job.get("error") and self.verdict is None:
                await self._give_up(
                    MigrationFailed(
                        f"copying {disk.target} to the destination failed: {job['error']}",
                        code="AGENT.DISK_COPY_FAILED",
                        details="the link or the destination storage failed; the VM keeps running here",
                    )
                )
                return
            sample = MirrorSample(
                offset,
                length,
                disk.virtual_size,
                self.indexes[disk.target],
                bool(job.get("ready")),
            )
            samples[disk.target] = (sample, str(job["device"]))
        left: dict[str, int] = {}
        for target, (sample, _device) in samples.items():
            done, total = real_bytes_done(sample)
            self.ctx.progress(f"disk:{target}", done, total)
            if not sample.ready:
                left[target] = total - done
            # READY completes ``done``; the budget counts what the background really moved.
            copied = real_bytes_done(dataclasses.replace(sample, ready=False))[0]
            self._observe_disk(target, sampled, writes.get(target), copied, total - done, bool(blocking))
        # Shares in proportion to what each mirror has left: they finish together, so the budget is used to
        # the end without another change. In write-blocking mode the guest's writes are charged first.
        budget = self.ctx.bandwidth
        if budget is not None and blocking:
            charged = sum(w.write_bps for w in self.watches.values())
            budget = int(max(budget - charged, hotdisk.MIN_BACKGROUND * budget))
        shares = split_by_remaining(budget, left or {t: 0 for t in samples})
        if await self._judge_disks(shares, sampled):
            return
        horizon = self.clock.horizon_s
        for target, (sample, device) in samples.items():
            speed = job_speed(sample, shares.get(target), horizon)
            current = self.speeds.get(target)
            self.ctx.log.debug(
                "disk steering: %s at %d/%d (%d real bytes left), speed %s -> %d B/s for %.1f s",
                target,
                sample.cur,
                sample.end,
                left.get(target, 0),
                current,
                speed,
                horizon,
            )
            # A job that walks the whole disk crosses holes at speeds that change by factors; one charged for
            # real bytes only is left alone unless its share really moved.
            slack = POSITIONAL_SLACK if sample.positional else SPEED_SLACK
            wanted = worth_changing(current, speed, slack)
            pending = self.changing.get(target)
            if wanted and (pending is None or pending.done()):
                self.changing[target] = asyncio.create_task(self._set_speed(target, device, speed))

    def _observe_disk(
        self, target: str, now: float, written: int | None, copied: int, remaining: int, blocking: bool
    ) -> None:
        watch = self.watches.get(target)
        if watch is None or written is None:
            return
        moved = max(0, copied - self.done.get(target, 0))
        self.done[target] = max(copied, self.done.get(target, 0))
        new_writes = max(0, written - self.written.get(target, written)) if blocking else 0
        self.written[target] = written
        watch.observe(now, written, remaining)
        if not self.memory_phase:
            self.meter.add(now, moved + new_writes)
            self.interval_bytes[0] += moved
            self.interval_bytes[1] += new_writes

    async def _judge_disks(self, shares: Mapping[str, int | None], now: float) -> bool:
        """Figures to the details each second; a mirror that cannot converge ends the migration early
        (libvirt has one copy mode for a whole migration, chosen at its start). True when it gave up."""
        if not self.watches:
            return False
        if now - self.figures_at >= 1.0:
            self.figures_at = now
            self.ctx.note("disks", {t: w.figures(shares.get(t)) for t, w in self.watches.items()})
            if self.interval_at is not None and now > self.interval_at and not self.memory_phase:
                seconds = now - self.interval_at
                self.rates.append(
                    {
                        "at": round(now - (self.meter.started or now), 2),
                        "seconds": round(seconds, 2),
                        "backgroundBytesPerSecond": int(self.interval_bytes[0] / seconds),
                        "guestWriteBytesPerSecond": int(self.interval_bytes[1] / seconds),
                        "capBytesPerSecond": self.ctx.bandwidth,
                    }
                )
                self.ctx.note("copyRates", self.rates[-120:])
            self.interval_at, self.interval_bytes = now, [0, 0]
        budget = self.ctx.bandwidth
        for target, watch in self.watches.items():
            share = shares.get(target)
            if budget is None or share is None or self.verdict is not None:
                continue
            if hotdisk.cannot_converge(watch, share, now):
                hint = (
                    None
                    if self.ctx.request.primaryStorageMigrateVm.strategy is Strategy.PRECOPY
                    else "auto started it in background mode from the write rate it measured first"
                )
                await self._give_up(hotdisk.disk_verdict(watch, share, budget, len(self.watches), hint=hint))
                return True
        return False

    async def _set_speed(self, target: str, device: str, speed: int) -> None:
        asked = time.monotonic()
        with contextlib.suppress(AgentError):
            await self.host.qmp(self.ctx.vm_uuid, "block-job-set-speed", {"device": device, "speed": speed})
            self.speeds[target] = speed
        self.clock.landed(time.monotonic() - asked)

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
