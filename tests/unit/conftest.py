"""Fixtures shared by the unit tests."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

# tests/unit mirrors agent/ (tests/unit/migration/test_mirror_speeds.py tests agent/migration/mirrors/
# speeds.py); the helpers every folder shares (service_fakes, fake_agent_api, cli_helpers) live here and
# are imported by name.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def qemu_tools() -> None:
    """Tests that run the real QEMU tools (scripts/setup installs them). A missing one fails the test: a
    skip would let a broken setup pass unnoticed."""
    missing = [tool for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run scripts/setup (Debian package qemu-utils)")
