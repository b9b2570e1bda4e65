"""Task states and the transitions between them.

PENDING -> [QUEUED ->] PREPARING -> COPYING -> CONVERGING -> SWITCHING -> VERIFYING -> SUCCEEDED
QUEUED: every slot for a running task on this host is taken; the task waits its turn (``tasks.admission``).
Any non-final state may go to FAILED or CANCELLING; CANCELLING ends in CANCELLED (or FAILED when the
cleanup itself fails, or SUCCEEDED when the cancel lost the race against a switch that already happened).
Engines may skip states (a same-host copy has no CONVERGING), never go back.
"""

from __future__ import annotations

import enum


class TaskState(enum.StrEnum):
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    PREPARING = "PREPARING"
    COPYING = "COPYING"
    CONVERGING = "CONVERGING"
    SWITCHING = "SWITCHING"
    VERIFYING = "VERIFYING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return self in _FINAL

    @property
    def active(self) -> bool:
        return not self.final

    def reached(self, state: TaskState) -> bool:
        """Whether a task in this state has already come as far as ``state`` on the forward path."""
        return self in _FORWARD and state in _FORWARD and _FORWARD.index(self) >= _FORWARD.index(state)

    @property
    def waiting(self) -> bool:
        """Not started yet: accepted, or queued for a slot."""
        return self in (TaskState.PENDING, TaskState.QUEUED)


_FINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})
_FORWARD = [
    TaskState.PENDING,
    TaskState.QUEUED,
    TaskState.PREPARING,
    TaskState.COPYING,
    TaskState.CONVERGING,
    TaskState.SWITCHING,
    TaskState.VERIFYING,
    TaskState.SUCCEEDED,
]


def can_transition(src: TaskState, dst: TaskState) -> bool:
    """Whether a task in ``src`` may move to ``dst``."""
    if src.final:
        return False
    if src is TaskState.CANCELLING:
        return dst in (TaskState.CANCELLED, TaskState.FAILED, TaskState.SUCCEEDED)
    if dst in (TaskState.FAILED, TaskState.CANCELLING):
        return True
    if dst is TaskState.CANCELLED:
        # Only a task that never started work may end CANCELLED without a CANCELLING step.
        return src in (TaskState.PENDING, TaskState.QUEUED)
    if src in _FORWARD and dst in _FORWARD:
        return _FORWARD.index(dst) > _FORWARD.index(src)
    return False
