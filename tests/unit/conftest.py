"""Fixtures shared by the unit tests."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def qemu_tools() -> None:
    """Tests that run the real QEMU tools (scripts/setup installs them). A missing one fails the test: a
    skip would let a broken setup pass unnoticed."""
    missing = [tool for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run scripts/setup (Debian package qemu-utils)")
