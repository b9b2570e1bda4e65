"""What the request allows the controller to do, and the controller's tunables."""

from __future__ import annotations

from dataclasses import dataclass

from agent.migration.request import MigrationRequest, Strategy

MAX_THROTTLE_PCT = 99  # QEMU's cpu-throttle-max default


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
    #: ``auto`` never starts under this (``convergence.floor``: QEMU builds that harm TCG guests switched
    #: over at less); 0: no floor. The request's ``downTime`` still bounds it.
    switchover_floor_ms: int = 0
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
        cls,
        request: MigrationRequest,
        *,
        time_left_s: float | None,
        allow_pause: bool = False,
        switchover_floor_ms: int = 0,
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
            switchover_floor_ms=switchover_floor_ms,
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
