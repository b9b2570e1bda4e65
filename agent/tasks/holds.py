"""A seam for the phase-by-fault matrix: hold a task for a moment right after it entered a phase.

Some phases last milliseconds (PREPARING, SWITCHING): too short for a test to strike in them once the task
reports them. The lab's fault matrix (tests/lab/test_fault_matrix.py) writes ``<state_dir>/phase-holds.json``,
e.g. ``{"PREPARING": 4}``, and the agent then waits that many seconds after journalling and announcing the
state, before the step runs. Nothing else changes. An agent without the file (every production agent) pays
one ``stat`` per phase change. The file lives in the root-only state directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from agent.migration.states import TaskState

log = logging.getLogger(__name__)

FILE_NAME = "phase-holds.json"


class PhaseHolds:
    def __init__(self, path: Path | None) -> None:
        self.path = path

    def seconds(self, state: TaskState) -> float:
        if self.path is None:
            return 0.0
        try:
            holds = json.loads(self.path.read_text())
        except FileNotFoundError:
            return 0.0
        except (OSError, ValueError) as err:
            log.warning("ignoring %s: %s", self.path, err)
            return 0.0
        value = holds.get(state.value) if isinstance(holds, dict) else None
        return float(value) if isinstance(value, int | float) and value > 0 else 0.0
