"""What the passes show: per-pass peaks of what is left, the transfer rate, the estimate built on them.

``memory_remaining`` jumps at each sync (the pages dirtied during the pass before) and falls as pages are
sent, so the highest value seen in a pass is what the guest re-dirtied while the previous pass ran: its
working set at that rate.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from agent.migration.convergence.actions import ConvergenceVerdict, VerdictKind
from agent.migration.convergence.policy import ConvergencePolicy
from agent.migration.convergence.samples import MigrationSample, mib


@dataclass(frozen=True)
class Estimate:
    """The working set, dirty rate and transfer rate after one pass."""

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

    def figures(self, downtime_ms: int | None, max_downtime_ms: int) -> dict[str, float]:
        """The figures behind a note, with the downtime allowed now."""
        return {
            "iteration": self.iteration,
            "remaining_bytes": self.remaining,
            "working_set_bytes": self.working_set,
            "dirty_rate_bps": self.dirty,
            "transfer_rate_bps": self.rate,
            "predicted_downtime_ms": round(self.predicted_ms),
            "downtime_ms": downtime_ms or 0,
            "max_downtime_ms": max_downtime_ms,
            "throttle_pct": self.throttle,
        }

    def verdict(
        self,
        elapsed: float,
        reason: str,
        max_downtime_ms: int,
        *,
        kind: VerdictKind = VerdictKind.WILL_NOT_CONVERGE,
        lead: str | None = None,
    ) -> ConvergenceVerdict:
        """Why pre-copy will not fit ``max_downtime_ms``, with the downtime or bandwidth it would need."""
        needed_ms = math.ceil(self.working_set / self.rate * 1000)
        needed_bw = math.ceil(self.working_set / (max_downtime_ms / 1000))
        lead = lead or f"pre-copy will not converge within {max_downtime_ms} ms of downtime"
        message = (
            f"{lead}: the guest re-dirties about {mib(self.working_set)} per pass (dirty rate "
            f"{mib(self.dirty)}/s) while {mib(self.rate)}/s reach the destination, so the switchover would "
            f"need about {needed_ms} ms of downtime, or about {mib(needed_bw)}/s of bandwidth to fit in "
            f"{max_downtime_ms} ms"
        )
        if reason:
            message += f"; {reason}"
        return ConvergenceVerdict(
            kind=kind,
            message=message,
            elapsed_s=elapsed,
            iteration=self.iteration,
            throttle_pct=self.throttle,
            working_set_bytes=self.working_set,
            dirty_rate_bps=self.dirty,
            transfer_rate_bps=self.rate,
            downtime_needed_ms=needed_ms,
            bandwidth_needed_bps=needed_bw,
        )


class PassWindow:
    """The recent passes at the current bandwidth: each one's peak of what is left, and the transfer rates."""

    def __init__(self, policy: ConvergencePolicy) -> None:
        # (iteration, highest remaining seen in that pass), passes >= 2 at the current bandwidth
        self.peaks: deque[tuple[int, int]] = deque(maxlen=max(policy.window, policy.trend_window))
        self._rates: deque[int] = deque(maxlen=policy.rate_samples)
        self._iteration = 0

    def add_rate(self, sample: MigrationSample) -> None:
        if sample.memory_bps > 0:
            self._rates.append(sample.memory_bps)

    def new_pass(self, sample: MigrationSample) -> bool:
        """Take the sample's ``memory_remaining``; True when it opens a pass worth judging (the second on)."""
        if sample.memory_iteration > self._iteration:
            self._iteration = sample.memory_iteration
            if sample.memory_iteration >= 2:
                self.peaks.append((sample.memory_iteration, sample.memory_remaining))
                return True
        elif self.peaks and self.peaks[-1][0] == sample.memory_iteration:
            it, peak = self.peaks[-1]
            self.peaks[-1] = (it, max(peak, sample.memory_remaining))
        return False

    def clear(self) -> None:
        """Passes at the old bandwidth say nothing about the new one."""
        self._rates.clear()
        self.peaks.clear()

    def recent(self, n: int) -> list[int]:
        """The peaks of the last ``n`` passes, oldest first."""
        return [peak for _it, peak in self.peaks][-n:]

    def estimate(self, sample: MigrationSample, policy: ConvergencePolicy) -> Estimate | None:
        """None while there is no transfer rate to predict with; call only once a pass has a peak."""
        rate = int(statistics.median(self._rates)) if self._rates else (policy.bandwidth or 0)
        if rate <= 0:
            return None
        peaks = self.recent(policy.window)
        return Estimate(
            iteration=sample.memory_iteration,
            remaining=sample.memory_remaining,
            working_set=int(statistics.median(peaks)),
            latest_peak=peaks[-1],
            dirty=sample.dirty_rate_bps,
            rate=rate,
            throttle=sample.auto_converge_throttle,
        )

    def shrinking(self, est: Estimate, downtime_ms: int, policy: ConvergencePolicy) -> bool:
        """Passes shrink clearly, so that ``downtime_ms`` fits within ``stall_iterations`` more of them."""
        ratio = est.dirty / est.rate  # what the next pass will hold, relative to this one
        if est.dirty <= 0 or ratio > 1 - policy.min_progress:
            return False
        if len(self.peaks) >= 2 and self.peaks[-1][1] >= self.peaks[-2][1]:
            return False  # the dirty rate says shrinking, the passes do not
        threshold = est.rate * downtime_ms / 1000
        size = min(est.latest_peak, est.working_set)
        return size <= threshold or math.log(threshold / size) / math.log(ratio) <= policy.stall_iterations
