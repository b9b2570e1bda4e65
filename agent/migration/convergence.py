"""Convergence of a live migration's memory phase: what to do after each job-stats sample (pure logic).

The engine samples libvirt's job statistics every 0.5-1 s, builds a ``MigrationSample`` and hands it to a
``ConvergenceController``, which answers with ``Action``s: set the allowed downtime or the bandwidth, switch
to post-copy, pause the guest (only when allowed) or abort with a ``ConvergenceVerdict``. Every decision
comes with a ``Note`` holding the figures behind it, for the log and the task's report.

Why (LAB-NOTES, TCG guest, QEMU 7.2): a guest that keeps rewriting a 48 MiB buffer over a 5 MiB/s link leaves
28-50 MiB to send after every pass, and an auto-converge throttle of 80 % changes nothing, because the working
set, not the guest's CPU, bounds it; only more downtime, more bandwidth or post-copy finish it. A guest whose
dirtying is bound by its CPU dirties less as the throttle rises. ``auto`` tells the two apart in a few passes
when the dirty rate shows the guest's speed; when a guest rewrites its working set within every pass, the
rate reads as the link's whatever the guest does (lab: a CPU-bound guest over 20 MiB/s shrank only from a
70 % throttle on), and ``auto`` lets the throttle climb to ``throttle_judge_pct`` before it judges.

QEMU's counters: ``memory_iteration`` counts dirty-bitmap syncs: 0 before the memory phase (libvirt's disk
mirrors come first), 1 during the first full pass, n during the n-th pass. ``memory_remaining`` jumps at each
sync (the pages dirtied during the pass before) and falls as pages are sent, so the highest value seen in a
pass is what the guest re-dirtied while the previous pass ran: its working set at that rate.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.errors import ConvergenceFailed
from agent.migration.pacing import UNLIMITED_SPEED
from agent.migration.request import MigrationRequest, Strategy

DEFAULT_PAGE_SIZE = 4096
MAX_THROTTLE_PCT = 99  # QEMU's cpu-throttle-max default
#: The disk mirrors count as caught up for a switch to post-copy when this little is left: a guest that
#: keeps writing always leaves a few KiB behind a rate-limited mirror (they are in sync mode by then; the
#: switch completes them), and waiting for exactly zero could wait forever.
DISKS_CAUGHT_UP_BYTES = 1024 * 1024
MiB = 1024 * 1024

Figures = Mapping[str, float]


def _num(stats: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = stats.get(key)
    if value is None or isinstance(value, bool):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


@dataclass(frozen=True)
class MigrationSample:
    """One reading of ``virDomainGetJobStats`` (bytes, bytes/s, pages/s) at monotonic ``time`` (s)."""

    time: float
    memory_iteration: int = 0
    memory_total: int = 0
    memory_processed: int = 0
    memory_remaining: int = 0
    memory_bps: int = 0
    memory_dirty_rate: int = 0  # pages/s
    memory_page_size: int = DEFAULT_PAGE_SIZE
    downtime_ms: int | None = None  # libvirt's expected downtime while the job runs
    disk_total: int = 0
    disk_processed: int = 0
    disk_remaining: int = 0
    auto_converge_throttle: int = 0
    postcopy_active: bool = False

    @classmethod
    def from_job_stats(
        cls, stats: Mapping[str, Any], now: float, *, postcopy_active: bool = False
    ) -> MigrationSample:
        """Read libvirt's keys, tolerating missing ones (older QEMU, the disk phase, a finished job)."""
        downtime = stats.get("downtime")
        return cls(
            time=now,
            memory_iteration=_num(stats, "memory_iteration"),
            memory_total=_num(stats, "memory_total"),
            memory_processed=_num(stats, "memory_processed"),
            memory_remaining=_num(stats, "memory_remaining"),
            memory_bps=_num(stats, "memory_bps"),
            memory_dirty_rate=_num(stats, "memory_dirty_rate"),
            memory_page_size=_num(stats, "memory_page_size") or DEFAULT_PAGE_SIZE,
            downtime_ms=None if downtime is None else _num(stats, "downtime"),
            disk_total=_num(stats, "disk_total"),
            disk_processed=_num(stats, "disk_processed"),
            disk_remaining=_num(stats, "disk_remaining"),
            auto_converge_throttle=_num(stats, "auto_converge_throttle"),
            postcopy_active=postcopy_active or _num(stats, "memory_postcopy_requests") > 0,
        )

    @property
    def dirty_rate_bps(self) -> int:
        return self.memory_dirty_rate * self.memory_page_size

    @property
    def in_disk_phase(self) -> bool:
        """Disk mirrors still copying and the memory phase not past its first pass: nothing to judge yet."""
        return self.memory_iteration == 0 or (self.memory_iteration <= 1 and self.disk_remaining > 0)


@dataclass(frozen=True)
class ConvergencePolicy:
    """What the request allows, plus the controller's tunables."""

    strategy: Strategy
    max_downtime_ms: int  # the request's downTime: the largest pause the user accepts
    allow_postcopy: bool
    allow_pause: bool = False
    bandwidth: int | None = None  # bytes/s, None = uncapped
    timeout_s: float | None = None
    initial_downtime_ms: int = 50  # auto starts here and raises only as far as the passes show is needed
    downtime_margin: float = 1.25  # allowed downtime = predicted x margin
    downtime_granularity_ms: int = 10
    window: int = 3  # passes over which the working set is taken (median of the per-pass peaks)
    trend_window: int = 6  # passes over which a steady fall shows that throttling works, however slowly
    min_trend: float = 0.01  # the least steady fall per pass that counts
    trend_t: float = 2.0  # how far above the noise (t statistic of the slope) that fall must stand
    rate_samples: int = 10  # transfer-rate readings whose median is the rate
    min_progress: float = 0.2  # a fall of this fraction in the working set counts as progress
    throttle_response: float = 0.5  # share of the proportional dirty-rate fall that shows throttling works
    throttle_steps: int = 3  # throttle steps without progress that show the working set bounds the guest
    stall_iterations: int = 5  # passes without progress (throttle or not) before giving up
    #: A dirty rate this close to the transfer rate is pinned there: a guest that rewrites its working set
    #: within every pass shows working set / pass time, whatever its real speed (lab, CPU-bound guest: 19-20
    #: MiB/s at a 20 MiB/s cap for every throttle from 0 to 70 %). Only a shrinking working set can then show
    #: that the throttle helps, once the throttle slows the guest below the link.
    saturation: float = 0.9
    #: While the dirty rate is pinned, the throttle QEMU is still raising is given up to this, and one pass
    #: at it, before the working set is judged (lab: a CPU-bound guest over 20 MiB/s first shrank at 70 %, and
    #: a guest dirtying 32 MiB/s over 20 MiB/s, judged at 70 %, converged when let go on).
    throttle_judge_pct: int = 90
    # For the engine: libvirt's auto_converge.initial and .increment. Coarser than QEMU's 20 + 10: a guest the
    # throttle helps gets there in fewer passes, and one it does not help is judged sooner.
    throttle_initial_pct: int = 30
    throttle_increment_pct: int = 20

    def __post_init__(self) -> None:
        if self.max_downtime_ms < 1:
            raise ValueError("max_downtime_ms must be at least 1")
        if self.bandwidth is not None and self.bandwidth < 1:
            raise ValueError("bandwidth must be positive or None")
        if (
            self.window < 1
            or self.trend_window < 4
            or self.rate_samples < 1
            or self.stall_iterations < 1
            or self.throttle_steps < 1
        ):
            raise ValueError("window, rate_samples, stall_iterations, throttle_steps >= 1; trend_window >= 4")
        if not 0 < self.min_progress < 1 or not 0 < self.throttle_response <= 1:
            raise ValueError("min_progress must be in (0, 1) and throttle_response in (0, 1]")
        if self.downtime_margin < 1:
            raise ValueError("downtime_margin must be >= 1")
        if not 0 < self.saturation <= 1 or not 0 < self.throttle_judge_pct <= MAX_THROTTLE_PCT:
            raise ValueError(
                f"saturation must be in (0, 1] and throttle_judge_pct in (0, {MAX_THROTTLE_PCT}]"
            )

    @classmethod
    def from_request(
        cls, request: MigrationRequest, *, time_left_s: float | None, allow_pause: bool = False
    ) -> ConvergencePolicy:
        """``time_left_s``: the seconds left until the task's deadline (``TaskContext.deadline``) when the
        controller starts; the skeleton enforces it, the controller only plans with it."""
        return cls(
            strategy=request.primaryStorageMigrateVm.strategy,
            max_downtime_ms=request.migrateVm.downTime,
            allow_postcopy=request.allowPostCopy,
            allow_pause=allow_pause,
            bandwidth=request.bandwidth_bytes,
            timeout_s=time_left_s,
        )

    @property
    def postcopy_permitted(self) -> bool:
        """The ``postcopy`` strategy is itself the user's consent; ``auto`` needs ``allowPostCopy``."""
        return self.strategy is Strategy.POSTCOPY or (self.strategy is Strategy.AUTO and self.allow_postcopy)

    @property
    def wants_postcopy_flag(self) -> bool:
        """Start libvirt's migration with ``VIR_MIGRATE_POSTCOPY`` (it cannot be enabled later)."""
        return self.postcopy_permitted

    @property
    def wants_auto_converge(self) -> bool:
        """Start with ``VIR_MIGRATE_AUTO_CONVERGE``: QEMU cannot enable it once the migration runs."""
        return self.strategy in (Strategy.AUTO, Strategy.AUTO_CONVERGE)


class VerdictKind(enum.StrEnum):
    WILL_NOT_CONVERGE = "will-not-converge"
    TIMED_OUT = "timed-out"


@dataclass(frozen=True)
class ConvergenceVerdict:
    """Why pre-copy cannot finish within what the request allows, and what would be needed."""

    kind: VerdictKind
    message: str
    elapsed_s: float
    iteration: int
    throttle_pct: int
    working_set_bytes: int | None = None
    dirty_rate_bps: int | None = None
    transfer_rate_bps: int | None = None
    downtime_needed_ms: int | None = None
    bandwidth_needed_bps: int | None = None

    def figures(self) -> dict[str, float]:
        out: dict[str, float] = {
            "elapsed_s": round(self.elapsed_s, 1),
            "iteration": self.iteration,
            "throttle_pct": self.throttle_pct,
        }
        for key in (
            "working_set_bytes",
            "dirty_rate_bps",
            "transfer_rate_bps",
            "downtime_needed_ms",
            "bandwidth_needed_bps",
        ):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class SetDowntime:
    ms: int


@dataclass(frozen=True)
class SetBandwidth:
    """Memory migration speed; ``UNLIMITED_SPEED`` when the budget was lifted."""

    bytes_per_s: int


@dataclass(frozen=True)
class StartPostCopy:
    pass


@dataclass(frozen=True)
class PauseGuest:
    """Suspend the guest so the migration finishes; the whole pause is downtime and must be reported."""

    expected_downtime_ms: int | None


@dataclass(frozen=True)
class Abort:
    error: ConvergenceVerdict

    def to_error(self) -> ConvergenceFailed:
        return ConvergenceFailed(
            self.error.message,
            details="the migration was aborted; the VM keeps running on the source",
            verdict=self.error.kind.value,
            figures=self.error.figures(),
        )


@dataclass(frozen=True)
class Note:
    message: str
    figures: Figures = field(default_factory=dict)


Action = SetDowntime | SetBandwidth | StartPostCopy | PauseGuest | Abort | Note


class ControllerState(enum.StrEnum):
    IDLE = "idle"
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    PAUSED = "paused"
    ABORTED = "aborted"


class _Keep(enum.Enum):
    KEEP = "keep"


KEEP = _Keep.KEEP


@dataclass(frozen=True)
class _Estimate:
    iteration: int
    remaining: int
    working_set: int  # median of the recent per-pass peaks
    latest_peak: int
    dirty: int  # bytes/s
    rate: int  # bytes/s
    throttle: int

    @property
    def predicted_ms(self) -> float:
        """Downtime if QEMU switched over after this pass: the smaller of the recent and the typical set."""
        return min(self.latest_peak, self.working_set) / self.rate * 1000


@dataclass
class _Reference:
    """Where the working set and dirty rate stood when the controller last saw progress."""

    iteration: int
    working_set: int
    dirty: int
    throttle: int
    stalled: int = 0
    throttle_steps: int = 0
    since_rise: int = 0


class ConvergenceController:
    """Feed it every sample; apply the actions it returns, in order. Not thread-safe; one per migration."""

    def __init__(self, policy: ConvergencePolicy) -> None:
        self._policy = policy
        self._state = ControllerState.IDLE
        self._started_at = 0.0
        self._downtime: int | None = None
        # (iteration, highest remaining seen in that pass), passes >= 2 at the current bandwidth
        self._peaks: deque[tuple[int, int]] = deque(maxlen=max(policy.window, policy.trend_window))
        self._rates: deque[int] = deque(maxlen=policy.rate_samples)
        self._iteration = 0
        self._last_throttle = 0
        self._ref: _Reference | None = None
        self._retuned_downtime = False
        self._retuned_bandwidth = False
        self._bandwidth_sent = policy.bandwidth
        self._postcopy_verdict: ConvergenceVerdict | None = None
        self._noted: set[str] = set()
        self._history: list[Action] = []
        self._kept: dict[int, MigrationSample] = {}  # first sample of each iteration, for the summary
        self._last: MigrationSample | None = None

    @property
    def policy(self) -> ConvergencePolicy:
        return self._policy

    @property
    def state(self) -> ControllerState:
        return self._state

    @property
    def downtime_ms(self) -> int | None:
        """The downtime currently allowed (None before ``start``)."""
        return self._downtime

    @property
    def actions(self) -> tuple[Action, ...]:
        return tuple(self._history)

    def start(self, now: float) -> list[Action]:
        """The initial downtime, at the first sample at the latest (QEMU's default 300 ms may be too much)."""
        if self._state is not ControllerState.IDLE:
            return []
        p = self._policy
        self._state = ControllerState.PRECOPY
        self._started_at = now
        if p.strategy is Strategy.AUTO:
            initial = min(p.max_downtime_ms, p.initial_downtime_ms)
            how = f"raised step by step up to {p.max_downtime_ms} ms as the passes show what is needed"
        else:
            initial = p.max_downtime_ms
            how = "set once"
        extra = ""
        if p.postcopy_permitted:
            extra = "; post-copy allowed if pre-copy stalls"
        if p.allow_pause:
            extra += "; pausing the guest allowed as a last resort (it counts as downtime)"
        out: list[Action] = [
            SetDowntime(initial),
            Note(
                f"strategy {p.strategy.value}: allowing {initial} ms of downtime, {how}{extra}",
                {"downtime_ms": initial, "max_downtime_ms": p.max_downtime_ms},
            ),
        ]
        self._downtime = initial
        self._retuned_downtime = self._retuned_bandwidth = False
        self._bandwidth_sent = p.bandwidth
        return self._log(out)

    def retune(
        self, *, max_downtime_ms: int | None = None, bandwidth: int | Literal[_Keep.KEEP] | None = KEEP
    ) -> None:
        """Take a live change of ``downTime`` or bandwidth (None = uncapped). Idempotent, so it may be called
        before every sample; the resulting actions come out of the next ``observe``."""
        if max_downtime_ms is not None and max_downtime_ms != self._policy.max_downtime_ms:
            self._policy = dataclasses.replace(self._policy, max_downtime_ms=max_downtime_ms)
            self._retuned_downtime = True
        if bandwidth is not KEEP and bandwidth != self._policy.bandwidth:
            self._policy = dataclasses.replace(self._policy, bandwidth=bandwidth)
            self._retuned_bandwidth = True

    def observe(self, sample: MigrationSample) -> list[Action]:
        """Actions to apply after this sample (often none)."""
        out: list[Action] = []
        if self._state is ControllerState.IDLE:
            out += self.start(sample.time)
        out += self._apply_retune(sample)
        self._keep(sample)
        if self._state in (ControllerState.PAUSED, ControllerState.ABORTED):
            return self._log(out)
        elapsed = sample.time - self._started_at
        if self._state is ControllerState.POSTCOPY or sample.postcopy_active:
            if self._state is ControllerState.PRECOPY:
                self._state = ControllerState.POSTCOPY
                out.append(Note("post-copy is active: a failure from here cannot be rolled back"))
            return self._log(out)
        if sample.in_disk_phase:
            return self._log(out)
        if sample.memory_bps > 0:
            self._rates.append(sample.memory_bps)
        if self._postcopy_verdict is not None:
            if sample.disk_remaining <= DISKS_CAUGHT_UP_BYTES:
                out += self._start_postcopy(self._postcopy_verdict)
            return self._log(out)
        if sample.memory_iteration > self._iteration:
            self._iteration = sample.memory_iteration
            if sample.memory_iteration >= 2:
                self._peaks.append((sample.memory_iteration, sample.memory_remaining))
                out += self._evaluate(sample, elapsed)
        elif self._peaks and self._peaks[-1][0] == sample.memory_iteration:
            it, peak = self._peaks[-1]
            self._peaks[-1] = (it, max(peak, sample.memory_remaining))
        return self._log(out)

    def summary(self) -> dict[str, Any]:
        samples = list(self._kept.values())
        if self._last is not None and (not samples or samples[-1] is not self._last):
            samples.append(self._last)
        return summarise(samples, self._history)

    def _apply_retune(self, sample: MigrationSample) -> list[Action]:
        p = self._policy
        out: list[Action] = []
        if self._retuned_downtime:
            self._retuned_downtime = False
            if self._state is ControllerState.PRECOPY and self._downtime is not None:
                target = self._downtime
                if p.strategy is not Strategy.AUTO or target > p.max_downtime_ms:
                    target = p.max_downtime_ms
                if target != self._downtime:
                    self._downtime = target
                    out.append(SetDowntime(target))
                out.append(
                    Note(
                        f"downTime retuned to {p.max_downtime_ms} ms: allowing {target} ms",
                        {"downtime_ms": target, "max_downtime_ms": p.max_downtime_ms},
                    )
                )
        # The memory stream's speed matters from the memory phase on; the engine paces the disk mirrors.
        if self._retuned_bandwidth and not sample.in_disk_phase:
            self._retuned_bandwidth = False
            live = self._state in (ControllerState.PRECOPY, ControllerState.POSTCOPY)
            if live and p.bandwidth != self._bandwidth_sent:
                self._bandwidth_sent = p.bandwidth
                out.append(SetBandwidth(UNLIMITED_SPEED if p.bandwidth is None else p.bandwidth))
                self._rates.clear()  # passes at the old rate say nothing about the new one
                self._peaks.clear()
                self._ref = None
                shown = "uncapped" if p.bandwidth is None else f"{_mib(p.bandwidth)}/s"
                out.append(
                    Note(
                        f"bandwidth retuned to {shown}: judging convergence afresh",
                        {"bandwidth_bps": p.bandwidth or 0},
                    )
                )
        return out

    # -- decisions ---------------------------------------------------------------------------------------

    def _evaluate(self, sample: MigrationSample, elapsed: float) -> list[Action]:
        est = self._estimate(sample)
        if est is None:
            if self._once("no-rate"):
                return [
                    Note(f"pass {sample.memory_iteration}: no transfer rate yet, cannot predict downtime")
                ]
            return []
        if self._policy.strategy is Strategy.AUTO:
            return self._evaluate_auto(est, elapsed)
        if self._policy.strategy is Strategy.POSTCOPY:
            return self._evaluate_postcopy(est, elapsed)
        return []  # precopy and auto-converge: downtime set once, the timeout decides

    def _estimate(self, sample: MigrationSample) -> _Estimate | None:
        rate = int(statistics.median(self._rates)) if self._rates else (self._policy.bandwidth or 0)
        if rate <= 0:
            return None
        peaks = [peak for _it, peak in self._peaks][-self._policy.window :]
        return _Estimate(
            iteration=sample.memory_iteration,
            remaining=sample.memory_remaining,
            working_set=int(statistics.median(peaks)),
            latest_peak=peaks[-1],
            dirty=sample.dirty_rate_bps,
            rate=rate,
            throttle=sample.auto_converge_throttle,
        )

    def _evaluate_auto(self, est: _Estimate, elapsed: float) -> list[Action]:
        p = self._policy
        out: list[Action] = []
        assert self._downtime is not None
        predicted = est.predicted_ms
        if predicted <= p.max_downtime_ms:
            self._ref = None
            self._last_throttle = est.throttle
            target = self._just_enough(predicted)
            if target <= self._downtime:
                return out
            if self._shrinking(est, self._downtime):
                # QEMU switches over as soon as what is left fits the allowed downtime: raising it now would
                # trade a shorter migration for a longer pause, while the next passes get there anyway.
                if self._once(f"shrinking-{self._downtime}"):
                    out.append(
                        Note(
                            f"pass {est.iteration}: the guest dirties {_mib(est.dirty)}/s, less than the "
                            f"{_mib(est.rate)}/s sent: keeping {self._downtime} ms while pre-copy shrinks",
                            self._figures(est),
                        )
                    )
                return out
            return self._set_downtime(
                target,
                f"pass {est.iteration}: {_mib(min(est.latest_peak, est.working_set))} left at "
                f"{_mib(est.rate)}/s predicts {predicted:.0f} ms of downtime: allowing {target} ms",
                est,
            )
        if self._ref is None:
            out.append(
                Note(
                    f"pass {est.iteration}: predicted downtime {predicted:.0f} ms is above the "
                    f"{p.max_downtime_ms} ms allowed: watching whether the working set falls or throttling "
                    "helps",
                    self._figures(est),
                )
            )
        ref = self._ref
        steps = _throttle_steps(self._last_throttle, est.throttle, p.throttle_increment_pct)
        self._last_throttle = est.throttle
        if ref is None:
            self._ref = _Reference(est.iteration, est.working_set, est.dirty, est.throttle)
            return out
        set_fell = est.working_set <= ref.working_set * (1 - p.min_progress)
        proportional = (100 - est.throttle) / max(100 - ref.throttle, 1)
        dirty_fell = (
            est.throttle > ref.throttle
            and ref.dirty > 0
            and est.dirty <= ref.dirty * (1 - p.throttle_response * (1 - proportional))
        )
        recent = [peak for _it, peak in self._peaks][-p.trend_window :]
        trend = _log_trend(recent)
        steady = trend is not None and trend[0] <= math.log(1 - p.min_trend) and trend[1] <= -p.trend_t
        if set_fell or dirty_fell or steady:
            if set_fell:
                why = f"the working set fell from {_mib(ref.working_set)} to {_mib(est.working_set)}"
            elif dirty_fell:
                why = (
                    f"the dirty rate fell from {_mib(ref.dirty)}/s to {_mib(est.dirty)}/s as the throttle "
                    f"rose from {ref.throttle} % to {est.throttle} %"
                )
            else:
                assert trend is not None
                per_pass = 100 * (1 - math.exp(trend[0]))
                why = (
                    f"the working set fell steadily over the last {len(recent)} passes "
                    f"({_mib(recent[0])} to {_mib(recent[-1])}, {per_pass:.0f} % a pass)"
                )
            if est.throttle:
                why += f", throttle at {est.throttle} %"
            out.append(
                Note(f"pass {est.iteration}: {why}: pre-copy is converging, waiting", self._figures(est))
            )
            self._ref = _Reference(est.iteration, est.working_set, est.dirty, est.throttle)
            return out
        ref.since_rise = 0 if steps else ref.since_rise + 1
        if est.dirty >= p.saturation * est.rate and est.throttle < MAX_THROTTLE_PCT:
            waiting = self._wait_for_the_throttle(est, ref, elapsed)
            if waiting is not None:
                return out + waiting
        ref.stalled += 1
        ref.throttle_steps += steps
        throttle_judged = ref.throttle_steps >= p.throttle_steps and ref.since_rise >= 1
        if not throttle_judged and ref.stalled < p.stall_iterations:
            return out
        if ref.throttle_steps:
            reason = (
                f"the auto-converge throttle rose from {ref.throttle} % to {est.throttle} % and neither the "
                f"working set nor the dirty rate fell: the working set, not the guest's CPU, bounds it"
            )
        else:
            reason = f"the working set has not fallen over {ref.stalled} passes"
            if est.throttle >= MAX_THROTTLE_PCT:
                reason += f" with the throttle at its maximum {est.throttle} %"
        return out + self._give_up(self._verdict(est, elapsed, reason))

    def _wait_for_the_throttle(self, est: _Estimate, ref: _Reference, elapsed: float) -> list[Action] | None:
        """The dirty rate is pinned at the transfer rate, so it cannot tell a guest the throttle will slow
        from one it will not: let QEMU raise the throttle up to ``throttle_judge_pct`` while the working set
        is watched, then judge. Actions while waiting or at the verdict; None when there is no time to wait
        or QEMU stopped raising the throttle (the usual counting decides)."""
        p = self._policy
        step = p.throttle_increment_pct
        steps_left = math.ceil(max(p.throttle_judge_pct - est.throttle, 0) / step) + (est.throttle == 0)
        pass_s = est.working_set / max(est.rate, 1)
        # QEMU raises the throttle every second pass at best.
        judged_in = steps_left * 2 * pass_s
        fits = p.timeout_s is None or elapsed + judged_in <= p.timeout_s
        if est.throttle >= p.throttle_judge_pct and ref.since_rise >= 1:
            reason = (
                f"the auto-converge throttle rose from {ref.throttle} % to {est.throttle} % and the "
                f"working set did not fall: the working set, not the guest's CPU, bounds it"
            )
            return self._give_up(self._verdict(est, elapsed, reason))
        # Waiting would outlast the request, or QEMU stopped raising the throttle: the usual counting decides
        # (it also sees a working set that falls without the throttle, e.g. as the allowed downtime rises).
        if not fits or (ref.since_rise >= 3 and est.throttle < p.throttle_judge_pct):
            return None
        if not self._once(f"saturated-{est.throttle}"):
            return []
        return [
            Note(
                f"pass {est.iteration}: the guest dirties at least the {_mib(est.rate)}/s sent, so the dirty "
                f"rate says nothing of its speed; letting the throttle (now {est.throttle} %) rise up to "
                f"{p.throttle_judge_pct} % while the working set is watched",
                self._figures(est),
            )
        ]

    def _evaluate_postcopy(self, est: _Estimate, elapsed: float) -> list[Action]:
        p = self._policy
        if est.predicted_ms <= p.max_downtime_ms:
            return []
        if self._downtime is not None and self._shrinking(est, self._downtime):
            if self._once(f"postcopy-shrinking-{est.iteration // 10}"):
                return [
                    Note(
                        f"pass {est.iteration}: the guest dirties {_mib(est.dirty)}/s, less than the "
                        f"{_mib(est.rate)}/s sent: pre-copy still shrinks, not switching yet",
                        self._figures(est),
                    )
                ]
            return []
        reason = f"the guest re-dirties {_mib(est.dirty)}/s against {_mib(est.rate)}/s sent"
        return self._give_up(self._verdict(est, elapsed, reason))

    def _give_up(self, verdict: ConvergenceVerdict) -> list[Action]:
        """The least disruptive way out that the request allows: post-copy, then a pause, then abort."""
        p = self._policy
        if p.postcopy_permitted:
            if self._last is not None and self._last.disk_remaining > DISKS_CAUGHT_UP_BYTES:
                self._postcopy_verdict = verdict
                return [
                    Note(
                        f"{verdict.message}; switching to post-copy once the disk mirrors have caught up",
                        verdict.figures(),
                    )
                ]
            return self._start_postcopy(verdict)
        if p.allow_pause:
            return self._pause(verdict)
        self._state = ControllerState.ABORTED
        message = f"{verdict.message}. Allow post-copy, raise downTime or raise the bandwidth"
        verdict = dataclasses.replace(verdict, message=message)
        return [Note(f"aborting: {message}", verdict.figures()), Abort(verdict)]

    def _start_postcopy(self, verdict: ConvergenceVerdict) -> list[Action]:
        self._state = ControllerState.POSTCOPY
        self._postcopy_verdict = None
        return [
            Note(
                f"{verdict.message}; switching to post-copy: from here the guest runs on the destination and "
                "a failure (link, destination host) cannot be rolled back",
                verdict.figures(),
            ),
            StartPostCopy(),
        ]

    def _pause(self, verdict: ConvergenceVerdict) -> list[Action]:
        self._state = ControllerState.PAUSED
        expected = verdict.downtime_needed_ms
        shown = "unknown" if expected is None else f"about {expected} ms"
        return [
            Note(
                f"{verdict.message}; pausing the guest to finish, as the request allows: the pause counts as "
                f"downtime ({shown}, above the {self._policy.max_downtime_ms} ms asked)",
                verdict.figures(),
            ),
            PauseGuest(expected),
        ]

    def explain_deadline(self, sample: MigrationSample) -> ConvergenceVerdict:
        """Why the migration had not finished when the task's deadline passed (the skeleton enforces the
        deadline and puts this, figures included, into its AGENT.TIMEOUT error)."""
        p = self._policy
        elapsed = sample.time - (self._started_at or sample.time)
        base = f"timed out after {elapsed:.0f} s of migration"
        if sample.in_disk_phase:
            reason = f"{base}, during the disk phase, {_mib(sample.disk_remaining)} of disk still to copy"
            return ConvergenceVerdict(
                VerdictKind.TIMED_OUT, reason, elapsed, sample.memory_iteration, sample.auto_converge_throttle
            )
        reason = f"{base}: pre-copy did not converge within {p.max_downtime_ms} ms of downtime"
        est = self._estimate(sample) if self._peaks else None
        if est is None:
            return ConvergenceVerdict(
                VerdictKind.TIMED_OUT, reason, elapsed, sample.memory_iteration, sample.auto_converge_throttle
            )
        return self._verdict(est, elapsed, "", kind=VerdictKind.TIMED_OUT, lead=reason)

    # -- helpers -----------------------------------------------------------------------------------------

    def _verdict(
        self,
        est: _Estimate,
        elapsed: float,
        reason: str,
        *,
        kind: VerdictKind = VerdictKind.WILL_NOT_CONVERGE,
        lead: str | None = None,
    ) -> ConvergenceVerdict:
        p = self._policy
        needed_ms = math.ceil(est.working_set / est.rate * 1000)
        needed_bw = math.ceil(est.working_set / (p.max_downtime_ms / 1000))
        lead = lead or f"pre-copy will not converge within {p.max_downtime_ms} ms of downtime"
        message = (
            f"{lead}: the guest re-dirties about {_mib(est.working_set)} per pass (dirty rate "
            f"{_mib(est.dirty)}/s) while {_mib(est.rate)}/s reach the destination, so the switchover would "
            f"need about {needed_ms} ms of downtime, or about {_mib(needed_bw)}/s of bandwidth to fit in "
            f"{p.max_downtime_ms} ms"
        )
        if reason:
            message += f"; {reason}"
        return ConvergenceVerdict(
            kind=kind,
            message=message,
            elapsed_s=elapsed,
            iteration=est.iteration,
            throttle_pct=est.throttle,
            working_set_bytes=est.working_set,
            dirty_rate_bps=est.dirty,
            transfer_rate_bps=est.rate,
            downtime_needed_ms=needed_ms,
            bandwidth_needed_bps=needed_bw,
        )

    def _shrinking(self, est: _Estimate, downtime_ms: int) -> bool:
        """Passes shrink clearly, so that ``downtime_ms`` fits within ``stall_iterations`` more of them."""
        p = self._policy
        ratio = est.dirty / est.rate  # what the next pass will hold, relative to this one
        if est.dirty <= 0 or ratio > 1 - p.min_progress:
            return False
        if len(self._peaks) >= 2 and self._peaks[-1][1] >= self._peaks[-2][1]:
            return False  # the dirty rate says shrinking, the passes do not
        threshold = est.rate * downtime_ms / 1000
        size = min(est.latest_peak, est.working_set)
        return size <= threshold or math.log(threshold / size) / math.log(ratio) <= p.stall_iterations

    def _just_enough(self, predicted_ms: float) -> int:
        p = self._policy
        step = max(p.downtime_granularity_ms, 1)
        wanted = math.ceil(predicted_ms * p.downtime_margin / step) * step
        return max(1, min(p.max_downtime_ms, wanted))

    def _set_downtime(self, ms: int, why: str, est: _Estimate) -> list[Action]:
        self._downtime = ms
        return [SetDowntime(ms), Note(why, self._figures(est))]

    def _figures(self, est: _Estimate) -> dict[str, float]:
        return {
            "iteration": est.iteration,
            "remaining_bytes": est.remaining,
            "working_set_bytes": est.working_set,
            "dirty_rate_bps": est.dirty,
            "transfer_rate_bps": est.rate,
            "predicted_downtime_ms": round(est.predicted_ms),
            "downtime_ms": self._downtime or 0,
            "max_downtime_ms": self._policy.max_downtime_ms,
            "throttle_pct": est.throttle,
        }

    def _once(self, key: str) -> bool:
        if key in self._noted:
            return False
        self._noted.add(key)
        return True

    def _keep(self, sample: MigrationSample) -> None:
        self._kept.setdefault(sample.memory_iteration, sample)
        self._last = sample

    def _log(self, actions: list[Action]) -> list[Action]:
        self._history += actions
        return actions


def _log_trend(values: list[int]) -> tuple[float, float] | None:
    """Least-squares slope of ln(value) per pass and its t statistic; None with fewer than 4 values."""
    n = len(values)
    if n < 4 or min(values) <= 0:
        return None
    ys = [math.log(v) for v in values]
    mx, my = (n - 1) / 2, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in range(n))
    slope = sum((x - mx) * (y - my) for x, y in zip(range(n), ys, strict=True)) / sxx
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(range(n), ys, strict=True))
    stderr = math.sqrt(residual / (n - 2) / sxx)
    if stderr == 0:
        return slope, -math.inf if slope < 0 else math.inf if slope > 0 else 0.0
    return slope, slope / stderr


def _throttle_steps(before: int, after: int, increment: int) -> int:
    """Throttle steps between two readings (QEMU steps 0 -> initial, then + increment)."""
    if after <= before:
        return 0
    if before == 0:
        return 1
    return max(1, round((after - before) / max(increment, 1)))


def summarise(samples: Iterable[MigrationSample], actions: Iterable[Action] = ()) -> dict[str, Any]:
    """The convergence part of the final report: passes, throttle, downtime allowed, outcome, decisions."""
    iterations = 0
    max_throttle = 0
    postcopy = False
    for sample in samples:
        iterations = max(iterations, sample.memory_iteration)
        max_throttle = max(max_throttle, sample.auto_converge_throttle)
        postcopy = postcopy or sample.postcopy_active
    final_downtime: int | None = None
    paused = False
    aborted: str | None = None
    decisions: list[str] = []
    for action in actions:
        if isinstance(action, SetDowntime):
            final_downtime = action.ms
        elif isinstance(action, StartPostCopy):
            postcopy = True
        elif isinstance(action, PauseGuest):
            paused = True
        elif isinstance(action, Abort):
            aborted = action.error.message
        elif isinstance(action, Note):
            decisions.append(action.message)
    return {
        "iterations": iterations,
        "maxThrottlePct": max_throttle,
        "finalDowntimeMs": final_downtime,
        "postCopy": postcopy,
        "paused": paused,
        "aborted": aborted,
        "decisions": decisions,
    }
