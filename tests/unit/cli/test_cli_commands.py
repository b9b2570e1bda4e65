"""The other subcommands (tasks, show, watch, cancel, retune, vms, vm, host, health, serve), `-m agent`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import Run, run_cli
from fake_agent_api import (
    NEW_PATH,
    STORAGE_UUID,
    TOKEN,
    VM_UUID,
    FakeAgent,
    failure_script,
    running,
    success_script,
)

import agent.api
from agent.config import ConfigError, load_config

TASK = "6e5d4c3b-2a19-4807-b6a5-9483726150ab"
OTHER = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
REPO = Path(__file__).resolve().parents[3]

Cli = Callable[..., Run]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KSA_AGENT_URL", raising=False)
    monkeypatch.delenv("KSA_TOKEN_FILE", raising=False)


@pytest.fixture
def fake() -> FakeAgent:
    agent = FakeAgent()
    agent.add_task(TASK, success_script(TASK))
    agent.add_task(OTHER, failure_script(OTHER))
    # The shape of agent.virt.inventory.describe_vm (the list only has uuid, name, state, persistent).
    agent.vms = [
        {
            "uuid": VM_UUID,
            "name": "guest-a",
            "state": "running",
            "persistent": True,
            "disks": [
                {
                    "target": "vda",
                    "device": "disk",
                    "type": "file",
                    "source": "/var/lib/ksa/storage-a/root.qcow2",
                    "format": "qcow2",
                    "chain": [
                        {
                            "path": "/var/lib/ksa/storage-a/root.qcow2",
                            "format": "qcow2",
                            "virtualSize": 4 * 1024**3,
                        },
                        {
                            "path": "/var/lib/ksa/storage-a/base.qcow2",
                            "format": "raw",
                            "virtualSize": 4 * 1024**3,
                        },
                    ],
                },
                {
                    "target": "sda",
                    "device": "cdrom",
                    "type": "file",
                    "source": None,
                    "format": None,
                    "chain": [],
                },
            ],
        }
    ]
    return agent


@pytest.fixture
def url(fake: FakeAgent) -> Iterator[str]:
    with running(fake) as base:
        yield base


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], url: str, tmp_path: Path) -> Cli:
    """``COMMAND ARGS... --agent URL --token-file F``."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)

    def invoke(*argv: str) -> Run:
        return run_cli(capsys, *argv, "--agent", url, "--token-file", str(token_file))

    return invoke


def test_tasks_table(cli: Cli) -> None:
    result = cli("tasks")
    assert result.code == 0
    header, *rows = [line for line in result.out.splitlines() if line.strip() and not line.startswith("─")]
    assert header.split() == ["TASK", "VM", "STATE", "PHASE", "PROGRESS", "RATE", "ERROR"]
    assert any(TASK in row and VM_UUID in row and "PENDING" in row for row in rows)
    assert any(OTHER in row for row in rows)


def test_tasks_json(cli: Cli) -> None:
    result = cli("tasks", "--json")
    assert [task["taskUuid"] for task in json.loads(result.out)] == [TASK, OTHER]


def test_tasks_when_there_are_none(cli: Cli, fake: FakeAgent) -> None:
    fake.tasks.clear()
    assert cli("tasks").out == "no tasks\n"


def test_show(cli: Cli, fake: FakeAgent) -> None:
    fake.tasks[TASK].cursor = 2
    fake.tasks[TASK].snapshots[2]["tuning"] = {"bandwidth": None, "downTime": 300}
    fake.tasks[TASK].snapshots[2]["volumes"] = [
        {"name": "vol-root", "bytesDone": 512, "bytesTotal": 1024, "percent": 50.0}
    ]
    result = cli("show", TASK)
    assert result.code == 0
    assert f"task       {TASK}" in result.out
    assert "state      COPYING" in result.out
    assert "progress   60.0%  2.0 GiB / 4.0 GiB" in result.out
    assert "rate       100.0 MiB/s" in result.out
    assert "tuning     bandwidth uncapped, downtime 300 ms" in result.out
    assert "item       vol-root  50.0%  512 B / 1.0 KiB" in result.out


def test_show_says_where_a_queued_task_waits_and_why(cli: Cli, fake: FakeAgent) -> None:
    fake.tasks[TASK].cursor = 0
    reason = "waiting for a slot: 2 of 2 outgoing migrations run on this host (limits.outgoing_migrations)"
    fake.tasks[TASK].snapshots[0].update(state="QUEUED", queue={"position": 3, "reason": reason})
    result = cli("show", TASK)
    assert "state      QUEUED" in result.out
    assert f"queue      position 3: {reason}" in result.out


def test_show_json_and_an_unknown_task(cli: Cli) -> None:
    assert json.loads(cli("show", TASK, "--json").out)["taskUuid"] == TASK
    missing = cli("show", "00000000-0000-4000-8000-000000000000")
    assert missing.code == 1
    assert "no such task [AGENT.NOT_FOUND] (HTTP 404)" in missing.err


def test_watch_exit_codes(cli: Cli) -> None:
    ok = cli("watch", TASK)
    assert ok.code == 0
    assert f"task {TASK}: SUCCEEDED" in ok.out
    assert NEW_PATH in ok.out
    failed = cli("watch", OTHER, "--json")
    assert failed.code == 1
    assert json.loads(failed.out)["state"] == "FAILED"


def test_cancel(cli: Cli, fake: FakeAgent) -> None:
    result = cli("cancel", TASK)
    assert result.code == 0
    assert result.out == f"task {TASK}: CANCELLING\n"
    assert fake.calls("POST")[-1].path == f"/v1/tasks/{TASK}/cancel"
    assert json.loads(cli("cancel", TASK, "--json").out)["state"] == "CANCELLING"


def test_retune(cli: Cli, fake: FakeAgent) -> None:
    result = cli("retune", TASK, "--bandwidth", "40", "--downtime", "150")
    assert result.code == 0
    assert result.out == f"task {TASK}: PENDING (bandwidth 40 MiB/s, downtime 150 ms)\n"
    assert fake.calls("PATCH")[-1].body == {"bandwidth": 40, "downTime": 150}
    assert json.loads(cli("retune", TASK, "--downtime", "90", "--json").out)["tuning"] == {"downTime": 90}


def test_retune_without_values_is_a_usage_error(cli: Cli, fake: FakeAgent) -> None:
    result = cli("retune", TASK)
    assert result.code == 2
    assert "needs --bandwidth and/or --downtime" in result.err
    assert fake.calls("PATCH") == []


def test_vms_and_vm(cli: Cli) -> None:
    listed = cli("vms")
    assert any(
        VM_UUID in line and "guest-a" in line and "running" in line for line in listed.out.splitlines()
    )
    assert json.loads(cli("vms", "--json").out)[0]["uuid"] == VM_UUID
    detail = cli("vm", VM_UUID)
    assert "disk       vda  /var/lib/ksa/storage-a/root.qcow2  qcow2  4.0 GiB" in detail.out
    assert "             <- /var/lib/ksa/storage-a/base.qcow2  raw" in detail.out
    assert "root.qcow2  qcow2\n" not in detail.out  # the top layer is the disk line itself
    assert "disk       sda  -  -  -  (cdrom)" in detail.out
    assert cli("vm", "00000000-0000-4000-8000-000000000000").code == 1


def test_host(cli: Cli) -> None:
    result = cli("host")
    assert result.code == 0
    assert "hostname   hostB" in result.out
    assert "cpu        count=2  percent=3.5  loadAverage=0.5 0.25 0.0" in result.out
    assert "memory     totalBytes=8.0 GiB  availableBytes=6.0 GiB  percent=25.0" in result.out
    assert "tasks      COPYING=1" in result.out
    assert "/gone  (No such file)" in result.out
    assert any(
        STORAGE_UUID in line and "50.0 GiB" in line and "100.0 GiB" in line
        for line in result.out.splitlines()
    )


def test_health_needs_no_token(capsys: pytest.CaptureFixture[str], url: str, fake: FakeAgent) -> None:
    result = run_cli(capsys, "health", "--agent", url)
    assert result.code == 0
    assert result.out == f"{url}: ok\n"


def fake_server_module(monkeypatch: pytest.MonkeyPatch, run: Callable[[Path], object]) -> None:
    """Stand in for ``agent.api.server``: ``serve`` only needs its ``run`` (given the config path and the
    dialects to mount, which must be the ZStack one)."""
    from agent.zstack import mount

    def run_with_dialects(config: Path, *, dialects: tuple[object, ...] = ()) -> object:
        assert dialects == (mount,)
        return run(config)

    module = types.ModuleType("agent.api.server")
    module.run = run_with_dialects  # type: ignore[attr-defined]
    module.StateDirInUse = type("StateDirInUse", (Exception,), {})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "agent.api.server", module)
    monkeypatch.setattr(agent.api, "server", module, raising=False)


def test_serve_runs_the_server_with_the_config_path(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []
    fake_server_module(monkeypatch, seen.append)
    assert run_cli(capsys, "serve", "--config", "/etc/ksa/agent.toml").code == 0
    assert seen == [Path("/etc/ksa/agent.toml")]


def test_serve_with_a_bad_config_prints_one_line_naming_the_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('token_file = "/etc/ksa/token"\nhost_uuid = "not-a-uuid"\n')
    fake_server_module(monkeypatch, load_config)
    result = run_cli(capsys, "serve", "--config", str(config))
    assert result.code == 2
    assert result.out == ""
    (line,) = result.err.splitlines()
    assert line.startswith(f"kvm-storage-agent: config error: {config}: host_uuid:")


def test_serve_with_a_missing_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(config: Path) -> None:
        raise ConfigError(f"{config}: No such file or directory")

    fake_server_module(monkeypatch, run)
    result = run_cli(capsys, "serve", "--config", "/nonexistent/agent.toml")
    assert result.code == 2
    assert (
        result.err == "kvm-storage-agent: config error: /nonexistent/agent.toml: No such file or directory\n"
    )


def test_serve_needs_a_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "serve").code == 2


def test_python_dash_m_agent(url: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    version = subprocess.run(
        [sys.executable, "-m", "agent", "--version"], capture_output=True, text=True, check=False
    )
    assert version.returncode == 0
    assert version.stdout.startswith("kvm-storage-agent ")
    env = {"KSA_AGENT_URL": url, "KSA_TOKEN_FILE": str(token_file), "PATH": "/usr/bin:/bin"}
    listed = subprocess.run(
        [sys.executable, "-m", "agent", "tasks", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 2
    watched = subprocess.run(
        [sys.executable, "-m", "agent", "watch", OTHER],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
    )
    assert watched.returncode == 1
    assert "[AGENT.CONVERGENCE_FAILED]" in watched.stdout


def test_ctrl_c_while_watching_leaves_the_task_running(url: str, fake: FakeAgent, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    fake.events_idle = True
    fake.tasks[TASK].snapshots = fake.tasks[TASK].snapshots[1:2]  # stays COPYING
    env = {"KSA_AGENT_URL": url, "KSA_TOKEN_FILE": str(token_file), "PATH": "/usr/bin:/bin"}
    watcher = _interrupted([sys.executable, "-m", "agent", "watch", TASK], env, ready="COPYING")
    assert watcher.returncode == 130
    assert f"task {TASK} goes on" in watcher.stderr
    assert fake.calls("POST") == []  # no cancel sent


#: A command that never passes its cancel on: the CLI leaves anyway, INTERRUPT_GRACE_S after the Ctrl-C.
_DEAF = """
import asyncio, sys
from agent.cli.main import _bound_interrupts
from agent.cli.output import Output

async def deaf(out):
    _bound_interrupts(out)
    with out.watching("stopped watching; the deaf task goes on"):
        print("ready", flush=True)
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                pass

asyncio.run(deaf(Output(sys.stdout, sys.stderr)))
"""


def test_ctrl_c_leaves_even_when_the_command_swallows_its_cancel() -> None:
    started = time.monotonic()
    deaf = _interrupted([sys.executable, "-c", _DEAF], {"PATH": "/usr/bin:/bin"}, ready="ready")
    assert deaf.returncode == 130, deaf.stderr
    assert "the deaf task goes on" in deaf.stderr
    assert time.monotonic() - started < 20


def _interrupted(argv: list[str], env: dict[str, str], *, ready: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv``, Ctrl-C it once it printed ``ready``; a process that does not end fails the test
    (killed, with what it printed), it never hangs the suite."""
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        try:
            ready_by = time.monotonic() + 30
            while ready not in proc.stdout.readline():
                assert time.monotonic() < ready_by and proc.poll() is None, f"never printed {ready!r}"
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
        except (AssertionError, subprocess.TimeoutExpired) as failure:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{failure}; stdout: {out!r}; stderr: {err!r}") from failure
        finally:
            if proc.poll() is None:  # e.g. the suite's own timeout struck while reading
                proc.kill()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_serve_without_the_server_module_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "agent.api.server", None)  # makes the import fail
    monkeypatch.delattr(agent.api, "server", raising=False)
    result = run_cli(capsys, "serve", "--config", "agent.toml")
    assert result.code == 1
    assert result.err.startswith("kvm-storage-agent: cannot load the server: ")


def test_tasks_filters_go_into_the_query(cli: Cli, fake: FakeAgent) -> None:
    assert cli("tasks", "--state", "copying", "--vm", VM_UUID.replace("-", "")).code == 0
    assert fake.calls("GET", "/v1/tasks")[-1].raw_path == f"/v1/tasks?state=COPYING&vmUuid={VM_UUID}"
    assert cli("tasks", "--state", "RUNNING").code == 2
