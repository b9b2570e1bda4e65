"""One agent per state directory: a second one on the same journal stops before it resumes any task."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.api.server import StateDirInUse, hold_state_dir


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = hold_state_dir(state)
    try:
        assert (state / "agent.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(StateDirInUse, match=f"pid {os.getpid()}.*{state}"):
            hold_state_dir(state)
    finally:
        first.close()
    hold_state_dir(state).close()  # free again once the first let go
