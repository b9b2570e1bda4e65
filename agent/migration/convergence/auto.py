"""The ``auto`` strategy's judgement after each pass: raise the allowed downtime just enough, wait while
pre-copy converges, or find that it will not (the controller then takes the way out the request allows).

Telling the two kinds of guest apart (LAB-NOTES, TCG guest, QEMU 7.2): a guest whose dirtying is bound by its
CPU dirties less as the auto-converge throttle rises; one that keeps rewriting a working set larger than what
the link sends in the allowed downtime does not, and only more downtime, more bandwidth or post-copy finish
it. When the guest rewrites its working set within every pass, its dirty rate reads as the link's whatever
it does, so the throttle is let climb to ``throttle_judge_pct`` before the working set is judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.migration.convergence.actions import ConvergenceVerdict, Note
from agent.migration.convergence.passes import Estimate, PassWindow
from agent.migration.convergence.policy import MAX_THROTTLE_PCT, ConvergencePolicy
from agent.migration.convergence.samples import mib


@dataclass(frozen=True)
class Judgement:
    """What one pass decided: notes, then either a new allowed downtime (``why`` says it) or a verdict to
    give up with, or neither (keep watching)."""

    notes: tuple[Note, ...] = ()
    downtime_ms: int | None = None
    why: str = ""
    verdict: ConvergenceVerdict | None = None


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


class AutoJudge:
    """One per migration, fed every judged pass by the controller; it owns the progress reference."""

    def __init__(self, passes: PassWindow) -> None:
        self._passes = passes
        self._ref: _Reference | None = None
        self._last_throttle = 0
        self._noted: set[str] = set()

    def resume(self, throttle: int) -> None:
        """Taking over a running migration: the throttle already in force is not a rise seen now."""
        self._last_throttle = throttle

    def forget(self) -> None:
        """The bandwidth changed: progress is judged afresh."""
        self._ref = None

    def judge(self, est: Estimate, elapsed: float, p: ConvergencePolicy, downtime: int) -> Judgement:
        """``downtime``: the allowed downtime now; ``p``: the policy as retuned so far."""
        notes: list[Note] = []
        predicted = est.predicted_ms
        if predicted <= p.max_downtime_ms:
            self._ref = None
            self._last_throttle = est.throttle
            target = _just_enough(predicted, p)
            if target <= downtime:
                return Judgement()
            if self._passes.shrinking(est, downtime, p):
                # QEMU switches over as soon as what is left fits the allowed downtime: raising it now would
                # trade a shorter migration for a longer pause, while the next passes get there anyway.
                if self._once(f"shrinking-{downtime}"):
                    notes.append(
                        Note(
                            f"pass {est.iteration}: the guest dirties {mib(est.dirty)}/s, less than the "
                            f"{mib(est.rate)}/s sent: keeping {downtime} ms while pre-copy shrinks",
                            est.figures(downtime, p.max_downtime_ms),
                        )
                    )
                return Judgement(tuple(notes))
            return Judgement(
                downtime_ms=target,
                why=(
                    f"pass {est.iteration}: {mib(min(est.latest_peak, est.working_set))} left at "
                    f"{mib(est.rate)}/s predicts {predicted:.0f} ms of downtime: allowing {target} ms"
                ),
            )
        if self._ref is None:
            notes.append(
                Note(
                    f"pass {est.iteration}: predicted downtime {predicted:.0f} ms is above the "
                    f"{p.max_downtime_ms} ms allowed: watching whether the working set falls or throttling "
                    "helps",
                    est.figures(downtime, p.max_downtime_ms),
                )
            )
        ref = self._ref
        steps = _throttle_steps(self._last_throttle, est.throttle, p.throttle_increment_pct)
        self._last_throttle = est.throttle
        if ref is None:
            self._ref = _Reference(est.iteration, est.working_set, est.dirty, est.throttle)
            return Judgement(tuple(notes))
        set_fell = est.working_set <= ref.working_set * (1 - p.min_progress)
        proportional = (100 - est.throttle) / max(100 - ref.throttle, 1)
        dirty_fell = (
            est.throttle > ref.throttle
            and ref.dirty > 0
            and est.dirty <= ref.dirty * (1 - p.throttle_response * (1 - proportional))
        )
        recent = self._passes.recent(p.trend_window)
        trend = _log_trend(recent)
        steady = trend is not None and trend[0] <= math.log(1 - p.min_trend) and trend[1] <= -p.trend_t
        if set_fell or dirty_fell or steady:
            if set_fell:
                why = f"the working set fell from {mib(ref.working_set)} to {mib(est.working_set)}"
            elif dirty_fell:
                why = (
                    f"the dirty rate fell from {mib(ref.dirty)}/s to {mib(est.dirty)}/s as the throttle "
                    f"rose from {ref.throttle} % to {est.throttle} %"
                )
            else:
                assert trend is not None
                per_pass = 100 * (1 - math.exp(trend[0]))
                why = (
                    f"the working set fell steadily over the last {len(recent)} passes "
                    f"({mib(recent[0])} to {mib(recent[-1])}, {per_pass:.0f} % a pass)"
                )
            if est.throttle:
                why += f", throttle at {est.throttle} %"
            notes.append(
                Note(
                    f"pass {est.iteration}: {why}: pre-copy is converging, waiting",
                    est.figures(downtime, p.max_downtime_ms),
                )
            )
            self._ref = _Reference(est.iteration, est.working_set, est.dirty, est.throttle)
            return Judgement(tuple(notes))
        ref.since_rise = 0 if steps else ref.since_rise + 1
        if est.dirty >= p.saturation * est.rate and est.throttle < MAX_THROTTLE_PCT:
            waiting = self._wait_for_the_throttle(est, ref, elapsed, p, downtime)
            if waiting is not None:
                return Judgement((*notes, *waiting.notes), verdict=waiting.verdict)
        ref.stalled += 1
        ref.throttle_steps += steps
        throttle_judged = ref.throttle_steps >= p.throttle_steps and ref.since_rise >= 1
        if not throttle_judged and ref.stalled < p.stall_iterations:
            return Judgement(tuple(notes))
        if ref.throttle_steps:
            reason = (
                f"the auto-converge throttle rose from {ref.throttle} % to {est.throttle} % and neither the "
                f"working set nor the dirty rate fell: the working set, not the guest's CPU, bounds it"
            )
        else:
            reason = f"the working set has not fallen over {ref.stalled} passes"
            if est.throttle >= MAX_THROTTLE_PCT:
                reason += f" with the throttle at its maximum {est.throttle} %"
        return Judgement(tuple(notes), verdict=est.verdict(elapsed, reason, p.max_downtime_ms))

    def _wait_for_the_throttle(
        self, est: Estimate, ref: _Reference, elapsed: float, p: ConvergencePolicy, downtime: int
    ) -> Judgement | None:
        """The dirty rate is pinned at the transfer rate, so it cannot tell a guest the throttle will slow
        from one it will not: let QEMU raise the throttle up to ``throttle_judge_pct`` while the working set
        is watched, then judge. A judgement while waiting or at the verdict; None when there is no time to
        wait or QEMU stopped raising the throttle (the usual counting decides)."""
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
            return Judgement(verdict=est.verdict(elapsed, reason, p.max_downtime_ms))
        # Waiting would outlast the request, or QEMU stopped raising the throttle: the usual counting decides
        # (it also sees a working set that falls without the throttle, e.g. as the allowed downtime rises).
        if not fits or (ref.since_rise >= 3 and est.throttle < p.throttle_judge_pct):
            return None
        if not self._once(f"saturated-{est.throttle}"):
            return Judgement()
        note = Note(
            f"pass {est.iteration}: the guest dirties at least the {mib(est.rate)}/s sent, so the dirty "
            f"rate says nothing of its speed; letting the throttle (now {est.throttle} %) rise up to "
            f"{p.throttle_judge_pct} % while the working set is watched",
            est.figures(downtime, p.max_downtime_ms),
        )
        return Judgement((note,))

    def _once(self, key: str) -> bool:
        if key in self._noted:
            return False
        self._noted.add(key)
        return True


def _just_enough(predicted_ms: float, p: ConvergencePolicy) -> int:
    """The downtime to allow for ``predicted_ms``: with the margin, in steps, within the request."""
    step = max(p.downtime_granularity_ms, 1)
    wanted = math.ceil(predicted_ms * p.downtime_margin / step) * step
    return max(1, min(p.max_downtime_ms, wanted))


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
