"""What the controller answers with: the actions the engine applies, and the verdict an abort carries."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.errors import ConvergenceFailed

Figures = Mapping[str, float]


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
