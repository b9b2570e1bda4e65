"""Fixtures for lab tests (marker `lab`): the running two-host lab and test guests.

- `lab` (session): the Lab from `scripts/lab status --json`; FAILS the test (never skips) if it is not up.
- `lab_agents` (session): the same, and both agents answer GET /v1/health.
- `make_guest` (function): factory `make_guest(host="hostA", data_volumes=0, snapshots=0, dirty_mib_s=0,
  storage="ps1", disk_size_mib=1024, memory_mib=256)` -> Guest; every guest it made is destroyed at teardown,
  a failed case's guests after their console and record were copied to /var/tmp/ksa-failed-guests.
- `host_budget` (function): `await host_budget(outgoing=..., outgoingMigrations=...)` PATCHes hostA's host
  budget; the lab's own (no budget, 2 moves at once) is put back afterwards.
Guest has acks(), total_acks(), wait_for_acks(more, timeout), verify() -> VerifyResult, where(), destroy().
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from labtools import SWITCHOVER_DEATH, Guest, Lab, LabNotUp, create_guest, keep_evidence, load_lab

from labkit import ceph
from labkit.agents import agent_client, agent_healthy
from labkit.sysutil import LabError

#: The harm series (test_switchover_series.py) is run by hand, with its mode named; never by a plain run.
collect_ignore = [] if os.environ.get("KSA_SERIES_MODE") else ["test_switchover_series.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/lab is a lab test, marked or not."""
    for item in items:
        if "tests/lab/" in str(item.path) and item.get_closest_marker("lab") is None:
            item.add_marker(pytest.mark.lab)


#: Every case run again because its guest died after a live switchover (``SWITCHOVER_DEATH``).
_RERUNS: list[pytest.TestReport] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.outcome == "rerun":  # pytest-rerunfailures, `--only-rerun` on SWITCHOVER_DEATH
        _RERUNS.append(report)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Every re-run, with the guest kernel's report, closes the run's output: none is silent."""
    if not _RERUNS:
        return
    terminalreporter.section(f"{len(_RERUNS)} re-run(s): {SWITCHOVER_DEATH}", sep="!", red=True)
    for report in _RERUNS:
        terminalreporter.write_line(f"RE-RUN {report.nodeid}")
        text = str(report.longrepr)
        start = text.find(SWITCHOVER_DEATH)
        terminalreporter.write_line(text[start : start + 3000] if start >= 0 else text[-3000:])


#: Whether the case itself failed (its call phase), for the fixtures' teardown.
CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


@pytest.fixture(scope="session")
def lab() -> Lab:
    try:
        return load_lab()
    except LabNotUp as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def lab_agents(lab: Lab) -> Lab:
    down = [h.name for h in lab.hosts if not agent_healthy(h.agent_url)]
    if down:
        hosts = ", ".join(down)
        pytest.fail(f"the agent does not answer on {hosts} (scripts/lab up starts it)", pytrace=False)
    return lab


@pytest.fixture
def make_guest(lab: Lab, request: pytest.FixtureRequest) -> Iterator[Callable[..., Guest]]:
    made: list[Guest] = []
    stem = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:32]

    def make(**options: Any) -> Guest:
        name = f"t-{stem}-{uuid.uuid4().hex[:6]}"
        guest = create_guest(name, **options)
        made.append(guest)
        return guest

    yield make
    failed = request.node.stash.get(CALL_FAILED, False)
    for guest in made:
        if failed and (kept := keep_evidence(guest, request.node.nodeid)) is not None:
            print(f"{guest.name}: its console and record are kept in {kept}")
        guest.destroy()


@pytest.fixture
def taken_images(lab: Lab) -> Iterator[list[str]]:
    """RBD images (pool/name) a test made or moved a guest onto: removed at teardown, after the test's
    guests (ask for it before ``make_guest``)."""
    taken: list[str] = []
    yield taken
    for image in taken:
        pool, name = image.split("/", 1)
        if name in ceph.rbd_images(pool):
            try:
                ceph.rbd_remove(name, pool)
            except LabError as err:
                # Listed but already being removed (the agent's own cleanup of a failed move): gone.
                if "No such file or directory" not in str(err):
                    raise


@pytest.fixture
async def host_budget(lab_agents: Lab) -> AsyncIterator[Callable[..., Any]]:
    """PATCH hostA's budget; the lab's own (no budget, 2 moves at once) is put back afterwards."""
    host = lab_agents.host("hostA")

    async def patch(**body: int) -> dict[str, Any]:
        async with agent_client(lab_agents, host) as agent:
            return dict(await agent.request("PATCH", "v1", "host", "budget", json_body=body))

    yield patch
    await patch(outgoing=0, outgoingMigrations=2)
