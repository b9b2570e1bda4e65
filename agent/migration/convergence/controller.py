"""The convergence controller: fed every job-stats sample of a live migration, it answers with actions.

It sets the allowed downtime at the start, takes live retunes of ``downTime`` and bandwidth, keeps the
passes (``passes``), leaves the ``auto`` strategy's judgement to ``auto`` and the ``postcopy`` strategy's
to itself, and when pre-copy will not converge takes the least disruptive way out the request allows:
post-copy, then a pause of the guest, then an abort.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Literal

from agent.migration.convergence.actions import (
    Abort,
    Action,
    ConvergenceVerdict,
    Note,
    PauseGuest,
    SetBandwidth,
    SetDowntime,
    StartPostCopy,
    VerdictKind,
)
from agent.migration.convergence.auto import AutoJudge
from agent.migration.convergence.passes import Estimate, PassWindow
from agent.migration.convergence.policy import ConvergencePolicy
from agent.migration.convergence.report import summarise
from agent.migration.convergence.samples import MigrationSample, mib
from agent.migration.mirrors.speeds import UNLIMITED_SPEED
from agent.migration.request import Strategy

#: The disk mirrors count as caught up for a switch to post-copy when this little is left: a guest that
#: keeps writing always leaves a few KiB behind a rate-limited mirror (they are in sync mode by then; the
#: switch completes them), and waiting for exactly zero could wait forever.
DISKS_CAUGHT_UP_BYTES = 1024 * 1024


class ControllerState(enum.StrEnum):
    IDLE = "idle"
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    PAUSED = "paused"
    ABORTED = "aborted"


class _Keep(enum.Enum):
    KEEP = "keep"


KEEP = _Keep.KEEP


class ConvergenceController:
    """Feed it every sample; apply the actions it returns, in order. Not thread-safe; one per migration."""

    def __init__(self, policy: ConvergencePolicy) -> None:
        self._policy = policy
        self._state = ControllerState.IDLE
        self._started_at = 0.0
        self._downtime: int | None = None
        self._passes = PassWindow(policy)
        self._auto = AutoJudge(self._passes)
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
            initial = min(p.max_downtime_ms, max(p.initial_downtime_ms, p.switchover_floor_ms))
            how = f"raised step by step up to {p.max_downtime_ms} ms as the passes show what is needed"
            if p.initial_downtime_ms < p.switchover_floor_ms <= p.max_downtime_ms:
                how += (
                    f"; not under {p.switchover_floor_ms} ms on this QEMU under TCG, which harmed guests"
                    " switched over at 50 ms (docs/reliability.md)"
                )
        else:
            initial = p.max_downtime_ms
            how = "set once"
        extra = ""
        if p.postcopy_permitted:
            extra = "; post-copy allowed if pre-copy stalls"
        if p.allow_pause:
            extra += "; pausing the guest allowed as a last resort (it counts as downtime)"
        if initial < p.switchover_floor_ms:
            extra += (
                f"; WARNING: under the {p.switchover_floor_ms} ms this QEMU needs under TCG, where"
                " switchovers at 50 ms harmed guests (docs/reliability.md): a larger downTime is safer"
            )
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

    def resume(self, sample: MigrationSample, downtime_ms: int | None) -> list[Action]:
        """Take over a migration that an earlier life of the agent started (it survived a restart): carry on
        from what QEMU runs with now, the allowed downtime (``downtime_ms``, read back; None if it could not
        be) and the auto-converge throttle of ``sample``. Nothing is set: a resumed controller never restarts
        the schedule (``start`` would put the downtime back to its initial value in the middle of a
        migration, a change QEMU then runs with for the passes left)."""
        if self._state is not ControllerState.IDLE:
            return []
        p = self._policy
        self._state = ControllerState.PRECOPY
        self._started_at = sample.time
        known = downtime_ms is not None
        # Unknown: judged as if the most allowed were in force, so nothing is ever raised on a guess.
        self._downtime = downtime_ms if downtime_ms is not None else p.max_downtime_ms
        self._bandwidth_sent = p.bandwidth
        self._auto.resume(sample.auto_converge_throttle)
        shown = f"{self._downtime} ms" if known else "an unknown downtime (not read back; nothing raised)"
        return self._log(
            [
                Note(
                    f"resumed after an agent restart: carrying on with {shown} allowed and the throttle at "
                    f"{sample.auto_converge_throttle} %, as QEMU runs them; nothing was reset",
                    {"downtime_ms": self._downtime, "throttle_pct": sample.auto_converge_throttle},
                )
            ]
        )

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

    def take_retune(self, sample: MigrationSample) -> list[Action]:
        """The actions a retune calls for now (those ``observe`` would begin with), for a caller that applies
        a live change at once (``agent.migration.limits``); ``sample``: the latest reading."""
        return self._log(self._apply_retune(sample))

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
        self._passes.add_rate(sample)
        if self._postcopy_verdict is not None:
            if sample.disk_remaining <= DISKS_CAUGHT_UP_BYTES:
                out += self._start_postcopy(self._postcopy_verdict)
            return self._log(out)
        if self._passes.new_pass(sample):
            out += self._evaluate(sample, elapsed)
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
                self._passes.clear()  # passes at the old rate say nothing about the new one
                self._auto.forget()
                shown = "uncapped" if p.bandwidth is None else f"{mib(p.bandwidth)}/s"
                out.append(
                    Note(
                        f"bandwidth retuned to {shown}: judging convergence afresh",
                        {"bandwidth_bps": p.bandwidth or 0},
                    )
                )
        return out

    # -- decisions ---------------------------------------------------------------------------------------

    def _evaluate(self, sample: MigrationSample, elapsed: float) -> list[Action]:
        est = self._passes.estimate(sample, self._policy)
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

    def _evaluate_auto(self, est: Estimate, elapsed: float) -> list[Action]:
        assert self._downtime is not None
        judged = self._auto.judge(est, elapsed, self._policy, self._downtime)
        if judged.downtime_ms is not None:
            return self._set_downtime(judged.downtime_ms, judged.why, est)
        out: list[Action] = list(judged.notes)
        if judged.verdict is not None:
            out += self._give_up(judged.verdict)
        return out

    def _evaluate_postcopy(self, est: Estimate, elapsed: float) -> list[Action]:
        p = self._policy
        if est.predicted_ms <= p.max_downtime_ms:
            return []
        if self._downtime is not None and self._passes.shrinking(est, self._downtime, p):
            if self._once(f"postcopy-shrinking-{est.iteration // 10}"):
                return [
                    Note(
                        f"pass {est.iteration}: the guest dirties {mib(est.dirty)}/s, less than the "
                        f"{mib(est.rate)}/s sent: pre-copy still shrinks, not switching yet",
                        self._figures(est),
                    )
                ]
            return []
        reason = f"the guest re-dirties {mib(est.dirty)}/s against {mib(est.rate)}/s sent"
        return self._give_up(est.verdict(elapsed, reason, p.max_downtime_ms))

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
            reason = f"{base}, during the disk phase, {mib(sample.disk_remaining)} of disk still to copy"
            return ConvergenceVerdict(
                VerdictKind.TIMED_OUT, reason, elapsed, sample.memory_iteration, sample.auto_converge_throttle
            )
        reason = f"{base}: pre-copy did not converge within {p.max_downtime_ms} ms of downtime"
        est = self._passes.estimate(sample, p) if self._passes.peaks else None
        if est is None:
            return ConvergenceVerdict(
                VerdictKind.TIMED_OUT, reason, elapsed, sample.memory_iteration, sample.auto_converge_throttle
            )
        return est.verdict(elapsed, "", p.max_downtime_ms, kind=VerdictKind.TIMED_OUT, lead=reason)

    # -- helpers -----------------------------------------------------------------------------------------

    def _set_downtime(self, ms: int, why: str, est: Estimate) -> list[Action]:
        self._downtime = ms
        return [SetDowntime(ms), Note(why, self._figures(est))]

    def _figures(self, est: Estimate) -> dict[str, float]:
        return est.figures(self._downtime, self._policy.max_downtime_ms)

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
