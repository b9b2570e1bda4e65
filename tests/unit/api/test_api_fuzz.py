"""API fuzzing generated from the agent's own OpenAPI document (schemathesis; issue 8).

What runs: the real aiohttp app (``make_app``: routes, validation, auth, error middleware, task manager,
journal, outbox, incoming-migration service with real storage roots and real qemu-img) on a loopback port in
a thread, with the fake engine the service tests use in place of libvirt. Why not a lab agent: generated
requests would start real migrations of whatever VMs the lab holds (teammates' guests among them) and leave
tasks in a shared journal; the fake engine keeps every run isolated and repeatable, and everything above the
engine, where untrusted input is handled, is the production code.

Each operation gets positive and negative examples (schemathesis 4, hypothesis underneath); every response
is checked for no 5xx, a documented status code and a body matching its schema; every call has a 10 s
timeout (no hang). Afterwards: the agent still answers /v1/health, no file appeared anywhere a request asked
for outside the storage roots, nothing was written under the test directory outside the roots and the
state directory, and at least 2,000 requests went out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from service_fakes import TOKEN, make_config

from agent.api.routes import openapi_document

AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 90  # per operation and mode: 19 operations x (positive + negative) -> about 3,000 requests
SCHEMA = schemathesis.openapi.from_dict(openapi_document())
COUNTS: Counter[str] = Counter()
ASKED_PATHS: set[str] = set()  # every path-like string a request carried, to look for afterwards


def not_a_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx but the documented 502/503 of an absent libvirt (never here: the inventory is a fake)."""
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code}"
    return None


SERVER = """
import asyncio, sys
sys.path.insert(0, {unit!r})
from pathlib import Path
from aiohttp import web
from service_fakes import TOKEN, VM_1, VM_2, FakeFactory, FakeInventory, Script, make_config
from agent.api.app import make_app

config = make_config(Path({base!r}), limits={{"max_request_bytes": 64 * 1024}})
# Plain HTTP, the token doubling as the cluster token: the caller has both roles, so that the generated
# requests reach the agent-to-agent handlers too (agent/api/access.py).
app = make_app(config, token=TOKEN, cluster_token=TOKEN,
               engine_factory=FakeFactory(Script(steps=2, step_s=0.01)), inventory=FakeInventory(VM_1, VM_2))

async def main():
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()

asyncio.run(main())
"""


class LiveAgent:
    """The app on 127.0.0.1 in a process of its own (so generating requests and serving them use both
    cores), with its storage roots, state directory and token under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.config = make_config(base, limits={"max_request_bytes": 64 * 1024})
        self.roots = [Path(r.path) for r in self.config.storage]
        self.url = ""
        self.started_at = time.time()
        self.session = requests.Session()  # one keep-alive connection for the whole run
        self.session.trust_env = False  # loopback only, never through a proxy from the environment

    def start(self) -> None:
        code = SERVER.format(unit=str(Path(__file__).resolve().parents[1]), base=str(self.base))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        port = self.proc.stdout.readline().strip()
        assert port.isdigit(), self.proc.stderr.read() if self.proc.stderr else port
        self.url = f"http://127.0.0.1:{port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            _out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
        return err


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAgent]:
    live = LiveAgent(tmp_path_factory.mktemp("fuzz"))
    live.start()
    yield live
    live.stop()


def _collect_paths(value: Any) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str) and key in ("top", "name", "installPath", "dstInstallPath"):
                ASKED_PATHS.add(item)
            _collect_paths(item)
    elif isinstance(value, list):
        for item in value:
            _collect_paths(item)


@SCHEMA.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_generated_requests(agent: LiveAgent, case: schemathesis.Case) -> None:
    _collect_paths(case.body)
    response = case.call(base_url=agent.url, headers=AUTH, session=agent.session, timeout=10)
    COUNTS[case.operation.label] += 1
    COUNTS[f"status {response.status_code // 100}xx"] += 1
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )


def _outside_roots(agent: LiveAgent, path: str) -> list[Path]:
    """Where a requested path could have landed outside the roots, if it exists there."""
    found = []
    candidates = [Path(path)] if os.path.isabs(path) else [root / path for root in agent.roots]
    candidates += [agent.base / Path(path).name, Path("/tmp") / Path(path).name]
    for candidate in candidates:
        try:
            real = Path(os.path.realpath(candidate))
        except (OSError, ValueError):
            continue
        if any(real == r or r in real.parents for r in agent.roots):
            continue
        try:
            if real.is_file() and real.stat().st_mtime >= agent.started_at:
                found.append(real)
        except OSError:  # a name too long for the filesystem cannot have been written either
            continue
    return found


def test_after_the_run_the_agent_is_healthy_and_wrote_only_inside_its_roots(
    agent: LiveAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    assert agent.alive(), "the agent process died"
    session = requests.Session()
    session.trust_env = False
    assert session.get(f"{agent.url}/v1/health", timeout=5).status_code == 200
    tasks = session.get(f"{agent.url}/v1/tasks", headers=AUTH, timeout=5)
    assert tasks.status_code == 200
    # Nothing under the test directory but the roots and the state directory.
    allowed = [*agent.roots, agent.config.state_dir, agent.base / "token"]
    for dirpath, _dirs, files in os.walk(agent.base):
        for name in files:
            path = Path(dirpath) / name
            assert any(path == a or a in path.parents for a in allowed), f"written outside: {path}"
    # No requested path exists outside the roots (absolute, relative to a root, or its name in /tmp).
    escaped = {str(p) for asked in ASKED_PATHS if "\x00" not in asked for p in _outside_roots(agent, asked)}
    assert not escaped, f"files outside the storage roots: {sorted(escaped)[:10]}"
    operations = {k: n for k, n in COUNTS.items() if not k.startswith("status ")}
    total = sum(operations.values())
    with capsys.disabled():
        statuses = ", ".join(f"{k[7:]} {n}" for k, n in sorted(COUNTS.items()) if k.startswith("status "))
        print(f"\nAPI fuzzing: {total} generated requests over {len(operations)} operations; {statuses}")
    if operations:  # the generated requests ran in this session (not deselected)
        assert total >= 2000, COUNTS
