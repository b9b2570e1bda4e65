"""The limits one migration runs under, and the one place that applies them to its streams (issue 27).

A migration's streams and their knobs in QEMU:

- each disk mirror: its block job's speed (bytes/s, 0 = no limit; ``block-job-set-speed``, or libvirt's
  ``blockJobSetSpeed`` on the same host);
- the migration stream (memory, then the device state at the switch): ``max-bandwidth``, set through
  libvirt's ``migrateSetMaxSpeed`` in MiB/s, ``UNCAPPED_MIB`` (libvirt's largest value, its own default) for
  no limit; in post-copy QEMU paces it by ``max-postcopy-bandwidth`` (0 = no limit);
- the switchover: ``downtime-limit`` (ms, ``migrateSetMaxDowntime``);
- a stopped VM's files: the agent's own rate limiter, which reads ``LiveLimits.budget`` for every chunk.

``LiveLimits`` belongs to one running migration. Every change of any knob goes through ``apply``: the pacer's
disk speeds every tick, the convergence controller's downtime and stream steps, a ``PATCH`` of the task
(``retune``) and the host-wide budget (``retune(host_share=...)``, issue 24). The engine supplies the
``Streams``: how it reaches each knob, and what each stream should run at under a budget. The rules (each
unit tested, tests/unit/migration/test_limits.py):

1. The budget in force is the smallest of the task's cap and the host's share; neither: uncapped (None).
2. ``retune`` asks the engine what every stream should run at under the new budget, now
   (``Streams.targets``): uncapped, every disk mirror 0 and the stream ``None`` (``UNCAPPED_MIB``); capped,
   the pacer's shares and the whole budget for the stream. The convergence controller takes its new targets
   there too, so its later steps start from them.
3. A knob is set only when the value differs from what QEMU last reported for it (read back, never assumed
   from an earlier request).
4. A change computed under an older budget than the one in force is dropped (a tick's speed still on its
   way when a PATCH lands must not put the old cap back). Changes of one knob never overlap.
5. A change that fails is logged with the knob (the disk) and the value, retried once, and counted in the
   view (``failedChanges``, ``unapplied``); the view keeps what QEMU reports. ``retune`` then raises
   ``LimitsNotApplied`` (HTTP 503) naming each knob, value and error.
6. The effective limits are what QEMU reports: read back after every ``retune``, and with the progress
   (``observe`` from the engine's own reads, ``refresh``); in the task's details under ``limits``.

Where to find one: while a move's streams run, its engine attaches its ``LiveLimits`` to the task
(``ctx.attach_limits``; ``Task.live_limits`` in ``agent.tasks``), and detaches it when they end. A caller
outside the engine (a PATCH in ``TaskManager.retune``; the host budget) awaits ``live_limits.retune(...)``
with a timeout of its own. Before the streams start (and between two runs of them) there is none: the
engine reads ``ctx.bandwidth`` when it starts them, and builds its ``LiveLimits`` from it (a host share
meant for a task that has not started yet must reach it the same way, before the streams start).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.errors import AgentError, Code, LimitsNotApplied
from agent.migration.engine import TaskContext
from agent.units import MiB

#: libvirt's largest migration speed (QEMU_DOMAIN_MIG_BANDWIDTH_MAX, MiB/s) and its default: no limit.
UNCAPPED_MIB = (2**63 - 1) // MiB
#: A read-back ``max-bandwidth`` at least this large is no limit (libvirt's largest, in bytes/s).
UNCAPPED_BPS = UNCAPPED_MIB * MiB
#: How many times a failed change is tried in all.
ATTEMPTS = 2
#: How many unapplied changes the view keeps (the newest).
KEEP_UNAPPLIED = 10


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


#: Leaves an input of ``retune`` or a knob of ``Targets`` as it is.
KEEP: Any = _Keep()


@dataclass(frozen=True)
class Targets:
    """What to set. ``disks``: bytes/s per disk mirror (0: no limit); ``stream``: the migration stream's
    bytes/s (None: no limit); ``downtime_ms``: the switchover's limit. ``KEEP`` (or a disk left out) leaves
    a knob as it is."""

    disks: Mapping[str, int] = field(default_factory=dict)
    stream: int | None = KEEP
    downtime_ms: int = KEEP


@dataclass(frozen=True)
class Effective:
    """The limits as QEMU reports them (``None``: not read yet, or no such stream)."""

    disks: Mapping[str, int] = field(default_factory=dict)  # block job speed, bytes/s, 0: no limit
    has_stream: bool = False  # a migration stream exists (across hosts)
    stream: int | None = None  # max-bandwidth, bytes/s; None: no limit (with has_stream)
    postcopy_stream: int | None = None  # max-postcopy-bandwidth, bytes/s; None: no limit
    downtime_ms: int | None = None
    has_transfer: bool = False  # the agent moves the files itself (a stopped VM)
    transfer: int | None = None  # the rate its limiter reads, bytes/s; None: no limit (with has_transfer)
    transfer_pinned: str | None = None  # why the transfer runs at a rate a retune does not reach now
    read_at: float | None = None  # wall clock

    def merged(self, newer: Effective) -> Effective:
        """This reading with what ``newer`` read (a partial reading keeps the rest)."""
        stream = newer.has_stream
        return Effective(
            disks={**self.disks, **newer.disks},
            has_stream=self.has_stream or stream,
            stream=newer.stream if stream else self.stream,
            postcopy_stream=newer.postcopy_stream if stream else self.postcopy_stream,
            downtime_ms=newer.downtime_ms if newer.downtime_ms is not None else self.downtime_ms,
            has_transfer=self.has_transfer or newer.has_transfer,
            transfer=newer.transfer if newer.has_transfer else self.transfer,
            transfer_pinned=newer.transfer_pinned if newer.has_transfer else self.transfer_pinned,
            read_at=newer.read_at or self.read_at,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"disks": {t: {"bytesPerSecond": s} for t, s in sorted(self.disks.items())}}
        if self.has_stream:
            out["migrationBytesPerSecond"] = self.stream
            out["postcopyBytesPerSecond"] = self.postcopy_stream
            out["downtimeLimitMs"] = self.downtime_ms
        if self.has_transfer:
            out["agentTransferBytesPerSecond"] = self.transfer
            if self.transfer_pinned is not None:
                out["agentTransferPinned"] = self.transfer_pinned
        out["readAt"] = None if self.read_at is None else round(self.read_at, 3)
        return out


def pending_view(cap: int | None, downtime_ms: int) -> dict[str, Any]:
    """``details.limits`` before the streams start (or between two runs of them): what was asked; the
    streams start with it, and the view is then read back from QEMU."""
    return {
        "asked": {"bandwidthBytesPerSecond": cap, "hostShareBytesPerSecond": None, "downTimeMs": downtime_ms},
        "budgetBytesPerSecond": cap,
        "effective": None,
        "pending": "no stream runs now; the next ones start with these limits",
        "failedChanges": 0,
        "unapplied": [],
    }


def stream_speed(max_bandwidth: int) -> int | None:
    """QEMU's ``max-bandwidth`` (bytes/s) as the view shows it: None for libvirt's largest (no limit)."""
    return None if max_bandwidth >= UNCAPPED_BPS else max_bandwidth


class Streams(Protocol):
    """One migration's knobs as an engine reaches them (cross host: QMP through libvirt; same host: libvirt's
    block job calls; a stopped VM: none, its rate limiter reads the budget)."""

    def targets(self, budget: int | None, downtime_ms: int) -> Targets:
        """What every stream should run at now under ``budget`` (None: uncapped); hands the convergence
        controller its new targets."""

    async def set_disk_speed(self, target: str, bytes_per_s: int) -> None: ...

    async def set_stream_speed(self, bytes_per_s: int | None) -> None: ...

    async def set_downtime(self, ms: int) -> None: ...

    async def read(self) -> Effective:
        """Every knob as QEMU reports it now."""


class AgentTransfer:
    """A stopped VM's files, which the agent moves itself (``Streams``): its rate limiter reads the budget
    before every chunk (``LiveLimits.budget``), so there is no knob to set; the view shows what it reads.
    A copy that took its rate once (``qemu-img convert -r`` flattening a chain) pins it while it runs
    (``pin``): the view shows that rate and a retune that asks for another one is not applied (rule 5)."""

    def __init__(self) -> None:
        self.limits: LiveLimits | None = None
        self.pinned: tuple[int | None, str] | None = None

    def pin(self, rate: int | None, why: str) -> None:
        self.pinned = (rate, why)

    def unpin(self) -> None:
        self.pinned = None

    def targets(self, budget: int | None, downtime_ms: int) -> Targets:
        return Targets()

    async def set_disk_speed(self, target: str, bytes_per_s: int) -> None:
        raise AgentError("a stopped VM's transfer has no disk mirror", code=Code.INTERNAL)

    async def set_stream_speed(self, bytes_per_s: int | None) -> None:
        raise AgentError("a stopped VM's transfer has no migration stream", code=Code.INTERNAL)

    async def set_downtime(self, ms: int) -> None:
        raise AgentError("a stopped VM's transfer has no downtime", code=Code.INTERNAL)

    async def read(self) -> Effective:
        if self.pinned is not None:
            rate, why = self.pinned
            return Effective(has_transfer=True, transfer=rate, transfer_pinned=why, read_at=time.time())
        budget = self.limits.budget if self.limits is not None else None
        return Effective(has_transfer=True, transfer=budget, read_at=time.time())


@dataclass(frozen=True)
class Unapplied:
    """A change that failed every attempt."""

    knob: str  # "disk vda", "migration stream", "downtime"
    value: int | None
    error: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"knob": self.knob, "value": self.value, "error": self.error, "at": round(self.at, 3)}


class LiveLimits:
    """The limits of one running migration: their inputs, the one way to apply them, what QEMU reports."""

    def __init__(self, ctx: TaskContext, streams: Streams) -> None:
        self.ctx = ctx
        self.streams = streams
        self.cap: int | None = ctx.bandwidth  # the task's own (request, then PATCH), bytes/s
        self.downtime_ms: int = ctx.downtime_ms
        self.host_share: int | None = ctx.host_share  # the host-wide budget's share for this task (issue 24)
        self.generation = 0  # bumped by every retune (rule 4)
        self.effective = Effective()
        self.failed_changes = 0  # failed attempts
        self.unapplied: list[Unapplied] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._noted: dict[str, Any] | None = None

    # -- rule 1 ------------------------------------------------------------------------------------------

    @property
    def budget(self) -> int | None:
        """Bytes/s for the whole task now: the smallest of the task's cap and the host's share."""
        given = [b for b in (self.cap, self.host_share) if b]
        return min(given) if given else None

    # -- rules 2 and 6: a retune -------------------------------------------------------------------------

    async def retune(
        self,
        *,
        cap: int | None = KEEP,
        downtime_ms: int = KEEP,
        host_share: int | None = KEEP,
    ) -> dict[str, Any]:
        """Take new inputs (bytes/s, None: uncapped; ms), apply what they call for to every stream now, read
        the result back from QEMU and return the view. Raises ``LimitsNotApplied`` when a change failed."""
        if cap is not KEEP:
            self.cap = cap or None
        if downtime_ms is not KEEP:
            self.downtime_ms = downtime_ms
        if host_share is not KEEP:
            self.host_share = host_share or None
        self.generation += 1
        budget = self.budget
        self.ctx.log.info(
            "limits: budget %s, downtime %d ms (cap %s, host share %s)",
            _shown(budget),
            self.downtime_ms,
            _shown(self.cap),
            _shown(self.host_share),
        )
        failed = await self.apply(self.streams.targets(budget, self.downtime_ms), self.generation)
        await self.refresh()
        pinned = self.effective.transfer_pinned
        if self.effective.has_transfer and pinned is not None and self.effective.transfer != budget:
            failed.append(Unapplied("agent transfer", budget, pinned, time.time()))
            self.unapplied = [*self.unapplied, failed[-1]][-KEEP_UNAPPLIED:]
            self._note()
        if failed:
            what = "; ".join(f"{u.knob} to {_shown(u.value)}: {u.error}" for u in failed)
            raise LimitsNotApplied(
                f"the new limits could not be applied to every stream of the migration: {what}",
                details="QEMU keeps the values the task's details show under limits; the move's steering "
                "sets the disks' and the stream's speeds again at its next steps, a downtime only with "
                "another PATCH",
                field="bandwidth" if any(u.knob != "downtime" for u in failed) else "downTime",
            )
        return self.view()

    # -- rules 3, 4, 5: applying -------------------------------------------------------------------------

    async def apply(self, targets: Targets, generation: int | None = None) -> list[Unapplied]:
        """Set every knob ``targets`` names that QEMU does not already report at that value; ``generation``:
        the one the targets were computed under (older than ``self.generation``: dropped). Returns the
        changes that failed every attempt (logged, counted, kept in the view)."""
        calls: list[Awaitable[Unapplied | None]] = []
        known = self.effective
        for target, speed in targets.disks.items():
            if known.disks.get(target) != speed:
                calls.append(self._set_disk(target, speed, generation))
        if targets.stream is not KEEP and not (known.has_stream and known.stream == targets.stream):
            stream = targets.stream
            calls.append(
                self._set(
                    "migration stream",
                    stream,
                    generation,
                    lambda: self.streams.set_stream_speed(stream),
                    lambda: Effective(
                        has_stream=True, stream=stream, postcopy_stream=self.effective.postcopy_stream
                    ),
                )
            )
        if targets.downtime_ms is not KEEP and known.downtime_ms != targets.downtime_ms:
            ms = targets.downtime_ms
            calls.append(
                self._set(
                    "downtime",
                    ms,
                    generation,
                    lambda: self.streams.set_downtime(ms),
                    lambda: Effective(downtime_ms=ms),
                )
            )
        results = await asyncio.gather(*calls)
        return [r for r in results if r is not None]

    def _set_disk(self, target: str, speed: int, generation: int | None) -> Awaitable[Unapplied | None]:
        return self._set(
            f"disk {target}",
            speed,
            generation,
            lambda: self.streams.set_disk_speed(target, speed),
            lambda: Effective(disks={target: speed}),
        )

    async def _set(
        self,
        knob: str,
        value: int | None,
        generation: int | None,
        call: Callable[[], Awaitable[None]],
        landed: Callable[[], Effective],
    ) -> Unapplied | None:
        async with self._locks.setdefault(knob, asyncio.Lock()):
            if generation is not None and generation != self.generation:
                self.ctx.log.debug("limits: %s to %s dropped: the limits changed since", knob, _shown(value))
                return None
            error = ""
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    await call()
                except AgentError as err:
                    self.failed_changes += 1
                    error = err.description
                    self.ctx.log.warning(
                        "limits: setting %s to %s failed (attempt %d of %d): %s",
                        knob,
                        _shown(value),
                        attempt,
                        ATTEMPTS,
                        error,
                    )
                    continue
                # Until the next reading, QEMU took what it answered to without an error.
                self.effective = self.effective.merged(landed())
                self._note()
                return None
            failed = Unapplied(knob, value, error, time.time())
            self.unapplied = [*self.unapplied, failed][-KEEP_UNAPPLIED:]
            self._note()
            return failed

    # -- rule 6: reading back ----------------------------------------------------------------------------

    def observe(self, reading: Effective) -> None:
        """What the engine read of QEMU on its own (a tick's ``query-block-jobs``), into the view."""
        self.effective = self.effective.merged(reading)
        self._note()

    def _note(self) -> None:
        view = self.view()
        shown = {**view, "effective": {**view["effective"], "readAt": None}}
        if shown != self._noted:  # the details change (and wake their readers) only when a limit did
            self._noted = shown
            self.ctx.note("limits", view)

    async def refresh(self) -> None:
        """Read every knob back from QEMU; a failed read leaves the last one (and says so in the log)."""
        try:
            reading = await self.streams.read()
        except AgentError as err:
            self.ctx.log.warning("limits: reading them back from QEMU failed: %s", err.description)
            return
        self.observe(reading)

    def view(self) -> dict[str, Any]:
        """The task's ``details.limits``: what was asked, the budget in force, what QEMU reports."""
        return {
            "asked": {
                "bandwidthBytesPerSecond": self.cap,
                "hostShareBytesPerSecond": self.host_share,
                "downTimeMs": self.downtime_ms,
            },
            "budgetBytesPerSecond": self.budget,
            "effective": self.effective.to_json(),
            "failedChanges": self.failed_changes,
            "unapplied": [u.to_json() for u in self.unapplied],
        }


def _shown(value: int | None) -> str:
    return "uncapped" if value is None else str(value)
