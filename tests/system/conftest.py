"""When every system test ran and passed, record the digest of their files (``trigger.py``):
``./scripts/test`` skips them until one of those files changes. A run of only some of them (a file, ``-k``)
records nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import trigger

HERE = Path(__file__).resolve().parent
_outcomes: dict[str, bool] = {}  # node id -> passed (every phase)
_deselected: list[str] = []


def _ours(nodeid: str) -> bool:
    return nodeid.startswith("tests/system/")


def pytest_deselected(items: list[pytest.Item]) -> None:
    _deselected.extend(item.nodeid for item in items if _ours(item.nodeid))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _ours(report.nodeid):  # setup, call and teardown must each pass; a skip is not a pass
        _outcomes[report.nodeid] = _outcomes.get(report.nodeid, True) and report.passed


def pytest_sessionfinish(session: pytest.Session) -> None:
    items = [item for item in session.items if _ours(item.nodeid)]
    every_file = {path.name for path in HERE.glob("test_*.py")} == {item.path.name for item in items}
    all_passed = all(_outcomes.get(item.nodeid) for item in items)
    if items and every_file and not _deselected and all_passed and not session.shouldfail:
        trigger.record_pass()
