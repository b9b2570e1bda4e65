"""The mirror pacer: one tick of pacing for every disk mirror of a task, in both live engines.

Each tick the engine reads its mirror jobs (same host: libvirt's block jobs; across hosts: the migration's
NBD mirrors through QMP) and hands the figures here. The pacer turns them into real bytes (``speeds``):
progress, the task's budget meter, each disk's watch (``hotdisk``); splits the budget into shares by the
engine's rule; names the mirrors that cannot converge at their share; and plans each job's next speed. The
engine decides what a losing mirror means and sets the speeds its own way.

Two budget rules, on purpose (``BudgetRule``):

- ``EQUAL_SHARES`` (same host): the guest's writes that must cross anyway (a write-blocking disk's, a READY
  mirror's) are charged first, the rest is split equally among the mirrors still copying
  (``hotdisk.disk_shares``). Each disk is its own block job with its own copy mode (one can be restarted
  in write-blocking mode alone), and a speed change is a direct libvirt call answered within the tick, so
  the equal shares are simply re-split as mirrors become READY.
- ``BY_REMAINING`` (across hosts): shares in proportion to the real bytes each mirror has left
  (``speeds.split_by_remaining``), so that all finish together and the budget stays in use to the end
  without another change: each change travels through libvirt's QMP passthrough, which a busy libvirtd
  answers late, and libvirt starts the memory phase only when every mirror is READY, so a mirror done early
  only waits. The migration has one copy mode for all disks; in write-blocking mode the guest's writes are
  charged first. A non-positional job's speed changes only when its share moved by ``SPEED_SLACK``: the
  shares drift with every progress report.

The speeds follow a steady split (``MirrorPacer.speed_shares``) under ``BY_REMAINING``: the shares made when
the budget or the set of mirrors still copying last changed, kept until one of them changes or a share moves
by ``RESPLIT_FACTOR``. QEMU 7.2's mirror copies up to its 16 MiB buffer at once, then sleeps as long as its
speed requires, and a raised speed wakes a sleeping job (``block_job_set_speed`` kicks its timer unless the
speed went down), which copies its next buffer at once. A split re-made at every tick moved one mirror's
share up each time the other one's burst took 16 MiB off its remaining bytes: the other mirror was woken,
burst early, and the two together ran over the budget (lab, issue 27: 4.66 MiB/s under a 4 MiB/s cap). A
lowered speed never wakes a job: it holds from the end of the sleep under way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.migration.engine import TaskContext, budget_of
from agent.migration.limits import LiveLimits
from agent.migration.mirrors import hotdisk
from agent.migration.mirrors.hotdisk import BudgetMeter, DiskWatch, Mode
from agent.migration.mirrors.speeds import (
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

#: How often the per-disk figures and a rate sample go to the task's details.
FIGURES_EVERY_S = 1.0
#: A steady split is made again when a mirror's share moved by this factor (a hot disk's remaining bytes
#: that grow, a write-blocking charge that changed): far above what one 16 MiB burst does to the shares of
#: mirrors with more than 32 MiB left between them.
RESPLIT_FACTOR = 2.0


@dataclass
class PacedMirror:
    """One mirror job as the pacer keeps it: its source's data, the guest's writes, what it moved."""

    target: str
    index: AllocationIndex
    virtual_size: int
    watch: DiskWatch | None = None  # None: the guest's writes are not watched (nor the bytes counted)
    ready: bool = False
    speed: int | None = None  # in effect (0: no limit; None: unknown)
    done: int = 0  # real bytes, READY counting as complete
    total: int = 0
    written_at_start: int = 0  # the guest's wr_bytes when this mirror started
    written: int = 0  # the latest wr_bytes
    copied: int = 0  # real bytes the background copy moved (-1: unknown until the next sample)

    @property
    def mode(self) -> Mode:
        return self.watch.mode if self.watch else Mode.BACKGROUND

    def restarted(self, speed: int, written: int) -> None:
        """A new job of this disk started at ``speed``: it moves from nothing again."""
        self.speed = speed
        self.ready = False
        self.done = self.copied = 0
        self.written_at_start = self.written = written


@dataclass(frozen=True)
class JobFigures:
    """What the hypervisor says of one mirror job this tick (``cur``/``end``, or QMP's ``offset``/``len``)."""

    cur: int
    end: int
    ready: bool


class BudgetRule(Protocol):
    """How one budget is shared among the mirrors sampled this tick, and how far a speed may drift."""

    #: Whether the speeds follow a steady split (``MirrorPacer.speed_shares``) rather than every tick's.
    steady: bool

    def shares(
        self, budget: int | None, mirrors: Mapping[str, PacedMirror], sampled: Collection[str]
    ) -> dict[str, int | None]: ...

    def slack(self, sample: MirrorSample) -> float: ...


class _EqualShares:
    steady = False  # the shares move only when a mirror becomes READY or changes its copy mode

    def shares(
        self, budget: int | None, mirrors: Mapping[str, PacedMirror], sampled: Collection[str]
    ) -> dict[str, int | None]:
        watches = {t: m.watch for t, m in mirrors.items() if m.watch is not None}
        return hotdisk.disk_shares(budget, watches, {t for t, m in mirrors.items() if m.ready})

    def slack(self, sample: MirrorSample) -> float:
        return POSITIONAL_SLACK


class _ByRemaining:
    steady = True  # the remaining bytes move in 16 MiB steps, one mirror at a time

    def shares(
        self, budget: int | None, mirrors: Mapping[str, PacedMirror], sampled: Collection[str]
    ) -> dict[str, int | None]:
        blocking = [
            m.watch for m in mirrors.values() if m.watch is not None and m.mode is Mode.WRITE_BLOCKING
        ]
        if budget is not None and blocking:
            charged = sum(w.write_bps for w in blocking)
            budget = hotdisk.background_budget(budget, charged)
        left = {t: mirrors[t].total - mirrors[t].done for t in sampled if not mirrors[t].ready}
        return split_by_remaining(budget, left or {t: 0 for t in sampled})

    def slack(self, sample: MirrorSample) -> float:
        # A job that walks the whole disk crosses holes at speeds that change by factors; one charged for
        # real bytes only is left alone unless its share really moved.
        return POSITIONAL_SLACK if sample.positional else SPEED_SLACK


EQUAL_SHARES: BudgetRule = _EqualShares()
BY_REMAINING: BudgetRule = _ByRemaining()


@dataclass
class _Interval:
    """Bytes moved since the last rate sample: background copy, and guest writes in write-blocking mode."""

    since: float | None = None
    background: int = 0
    guest: int = 0

    def take(self, now: float, started: float | None) -> dict[str, Any] | None:
        since, self.since = self.since, now
        background, guest = self.background, self.guest
        self.background = self.guest = 0
        if since is None or now <= since:
            return None
        return {
            "at": round(now - (started or since), 2),
            "seconds": round(now - since, 2),
            "backgroundBytesPerSecond": int(background / (now - since)),
            "guestWriteBytesPerSecond": int(guest / (now - since)),
        }


def _near(kept: int | None, fresh: int | None) -> bool:
    if kept is None or fresh is None:
        return kept is fresh
    return max(kept, fresh) <= RESPLIT_FACTOR * max(1, min(kept, fresh))


@dataclass(frozen=True)
class _Split:
    """A steady split: the budget it was made under, the mirrors that were still copying, their shares."""

    budget: int | None
    copying: frozenset[str]
    shares: Mapping[str, int | None]


@dataclass
class MirrorPacer:
    """The mirrors of one task under one budget (``ctx.bandwidth``, read every tick: it may be re-tuned).

    The mirrors, the meter and the rates are the engine's (they outlive a pacer); a pacer is one run of
    the engine's loop: its clock and its rate samples start afresh."""

    ctx: TaskContext
    rule: BudgetRule
    clock: SteeringClock
    mirrors: Mapping[str, PacedMirror]
    meter: BudgetMeter
    rates: list[dict[str, Any]] = field(default_factory=list)
    #: Whether the bytes moved count against the budget (across hosts: not once the memory phase began).
    counting: bool = True
    #: The migration's limits (``agent.migration.limits``): the budget in force is theirs when given.
    limits: LiveLimits | None = None
    #: The latest samples of the jobs, for a retune between two ticks (``speeds``).
    last_samples: dict[str, MirrorSample] = field(default_factory=dict)
    _interval: _Interval = field(default_factory=_Interval)
    _split: _Split | None = None
    _last_sample: float | None = None
    _figures_at: float = 0.0

    def __post_init__(self) -> None:
        self._interval.since = self.meter.started

    def start(self, now: float) -> None:
        """The mirrors start now: the budget meter and the rate samples count from here."""
        self.meter.start(now)
        self._interval.since = self.meter.started

    @property
    def budget(self) -> int | None:
        """Bytes/s for all the mirrors now (None: uncapped)."""
        return self.limits.budget if self.limits is not None else budget_of(self.ctx)

    @property
    def watches(self) -> dict[str, DiskWatch]:
        return {t: m.watch for t, m in self.mirrors.items() if m.watch is not None}

    def observe(
        self,
        now: float,
        jobs: Mapping[str, JobFigures],
        writes: Mapping[str, int],
    ) -> dict[str, MirrorSample]:
        """Take this tick's figures of the jobs found (``writes``: the guest's wr_bytes per disk, where
        known): progress, the watches, and (while ``counting``) the real bytes charged to the budget."""
        # A speed set now stays in effect until the next sample at least: the gaps count as latency too.
        if self._last_sample is not None:
            self.clock.landed(now - self._last_sample)
        self._last_sample = now
        samples: dict[str, MirrorSample] = {}
        for target, job in jobs.items():
            mirror = self.mirrors[target]
            written = writes.get(target)
            guest = max(0, (written or 0) - mirror.written_at_start)
            cur, end = job.cur, job.end
            if mirror.mode is Mode.WRITE_BLOCKING:
                # QEMU counts the guest's synchronous copies as progress too; the rest is background.
                cur = max(0, cur - guest)
                end = max(cur, end - guest)
            mirror.ready = job.ready
            sample = MirrorSample(cur, end, mirror.virtual_size, mirror.index, mirror.ready)
            samples[target] = sample
            mirror.done, mirror.total = real_bytes_done(sample)
            self.ctx.progress(f"disk:{target}", mirror.done, mirror.total)
            if mirror.watch is None or written is None:
                continue
            # READY says the copy is complete, not that the background moved it all (write-blocking writes
            # covered part): the budget counts what the background really moved.
            copied = real_bytes_done(dataclasses.replace(sample, ready=False))[0]
            moved = max(0, copied - mirror.copied) if mirror.copied >= 0 else 0
            mirror.copied = max(mirror.copied, copied)
            new_writes = max(0, written - mirror.written) if mirror.mode is Mode.WRITE_BLOCKING else 0
            mirror.written = written
            mirror.watch.observe(now, written, mirror.total - mirror.done)
            if self.counting:
                self.meter.add(now, moved + new_writes)
                self._interval.background += moved
                self._interval.guest += new_writes
        self.last_samples = samples
        return samples

    def shares(self, sampled: Collection[str]) -> dict[str, int | None]:
        """Each mirror's share of the budget now (what it is judged against, what the figures show)."""
        return self.rule.shares(self.budget, self.mirrors, sampled)

    def speed_shares(self, sampled: Collection[str]) -> dict[str, int | None]:
        """The shares the jobs' speeds follow now: the steady split under a rule that keeps one."""
        return self._steady(self.budget, sampled)

    def _steady(self, budget: int | None, sampled: Collection[str]) -> dict[str, int | None]:
        fresh = self.rule.shares(budget, self.mirrors, sampled)
        if not self.rule.steady:
            return fresh
        copying = frozenset(t for t in sampled if not self.mirrors[t].ready)
        kept = self._split
        if (
            kept is not None
            and kept.budget == budget
            and kept.copying == copying
            and kept.shares.keys() == fresh.keys()
            and all(_near(kept.shares[t], share) for t, share in fresh.items())
        ):
            return dict(kept.shares)
        self._split = _Split(budget, copying, dict(fresh))
        return fresh

    def speeds(self, budget: int | None) -> dict[str, int]:
        """Every job's speed from now under ``budget`` (None: 0 each, no limit), from the latest samples,
        whatever is in effect: what a retune sets at once (``LiveLimits.retune``); a new budget makes a new
        steady split."""
        samples = self.last_samples
        shares = self._steady(budget, samples)
        horizon = self.clock.horizon_s
        return {t: job_speed(sample, shares.get(t), horizon) for t, sample in samples.items()}

    def losing(self, shares: Mapping[str, int | None], now: float) -> list[str]:
        """The mirrors still copying that cannot converge at their share (``hotdisk.cannot_converge``)."""
        return [
            t
            for t, m in self.mirrors.items()
            if t in shares and not m.ready and m.watch and hotdisk.cannot_converge(m.watch, shares[t], now)
        ]

    def next_speed(self, target: str, sample: MirrorSample, share: int | None) -> int | None:
        """The speed this job should run at from now, or None when the one in effect is close enough."""
        mirror = self.mirrors[target]
        horizon = self.clock.horizon_s
        speed = job_speed(sample, share, horizon)
        self.ctx.log.debug(
            "disk steering: %s at %d/%d (%d of %d real bytes), guest %d B/s, %s, speed %s -> %d B/s "
            "for %.2f s",
            target,
            sample.cur,
            sample.end,
            mirror.done,
            mirror.total,
            int(mirror.watch.write_bps) if mirror.watch else 0,
            mirror.mode.value,
            mirror.speed,
            speed,
            horizon,
        )
        return speed if worth_changing(mirror.speed, speed, self.rule.slack(sample)) else None

    def figures(self, now: float, shares: Mapping[str, int | None], *, force: bool = False) -> None:
        """Each ``FIGURES_EVERY_S``: every disk's figures, and the copy rates since the last time."""
        if not self.watches or (now - self._figures_at < FIGURES_EVERY_S and not force):
            return
        self._figures_at = now
        self.ctx.note("disks", {t: w.figures(shares.get(t)) for t, w in self.watches.items()})
        if force:
            return
        rates = self._interval.take(now, self.meter.started)
        if rates is not None and self.counting:
            self.rates.append({**rates, "capBytesPerSecond": self.budget})
            self.ctx.note("copyRates", self.rates[-120:])


def judge_budget(
    ctx: TaskContext, meter: BudgetMeter, watches: Mapping[str, DiskWatch], **extra: Any
) -> None:
    """The real-bytes rate of the mirrors against the cap, in the task's details; over it by more than 10 %
    (one buffer per mirror aside): say so, and why."""
    budget = ctx.bandwidth
    ctx.note(
        "budget",
        {
            "realBytesPerSecond": int(meter.rate),
            "capBytesPerSecond": budget,
            "realBytes": meter.bytes,
            **extra,
        },
    )
    if budget is not None and meter.over(budget, len(watches)):
        note = hotdisk.over_budget_note(meter, budget, watches)
        ctx.log.warning("over the budget: %s", note["message"])
        ctx.note("overBudget", note)
