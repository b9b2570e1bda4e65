"""``evacuate`` and ``evacuation show|watch|cancel`` against the real API (fake engine) on loopback: the body
built from the options, the per-VM and total progress, the exit codes (0 only when every VM moved)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import Run, run_cli
from fake_agent_api import ThreadedServer
from service_fakes import TOKEN, VM_1, VM_2, VM_3, FakeFactory, FakeInventory, Script, make_config

from agent.api.app import make_app
from agent.cli.evacuate import BarsView, LineView, evacuation_body
from agent.cli.exits import UsageError
from agent.cli.output import Output
from agent.errors import MigrationFailed

HOST_B = "22222222-3333-4444-8555-666666666601"
DST_STORAGE = "0b0f1c3a-3333-4a4a-8b8b-000000000003"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KSA_AGENT_URL", raising=False)
    monkeypatch.delenv("KSA_TOKEN_FILE", raising=False)


@contextlib.contextmanager
def serve(tmp_path: Path, script: Script) -> Iterator[str]:
    app = make_app(
        make_config(tmp_path, limits={"outgoing_migrations": 4}),
        token=TOKEN,
        engine_factory=FakeFactory(script),
        inventory=FakeInventory(VM_1, VM_2, VM_3),
    )
    server = ThreadedServer(app)
    try:
        yield server.start()
    finally:
        server.stop()


def options(tmp_path: Path, url: str) -> list[str]:
    token = tmp_path / "token-file"
    token.write_text(TOKEN)
    return ["--agent", url, "--token-file", str(token), "--poll-interval", "0.05"]


def destination() -> list[str]:
    return [
        "--dst-host-uuid",
        HOST_B,
        "--dst-agent",
        "http://127.0.0.1:1",
        "--dst-storage",
        DST_STORAGE,
        "--dst-incoming",
        "2",
    ]


def evacuate(capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str, *argv: str) -> Run:
    return run_cli(capsys, "evacuate", *argv, *options(tmp_path, url))


def test_evacuate_waits_with_a_line_per_second_and_a_summary(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with serve(tmp_path, Script()) as url:
        result = evacuate(capsys, tmp_path, url, "--vm", VM_1, "--vm", VM_2, *destination(), "--wait")
        assert result.code == 0, result
        assert "SUCCEEDED, 2/2 VMs done (2 succeeded)" in result.out
        assert result.out.count(f"-> {HOST_B}") == 2
        # --json: one JSON document, every verdict true.
        result = evacuate(
            capsys, tmp_path, url, "--all", *destination(), "--wait", "--json", "--priority", "30"
        )
        assert result.code == 0, result
        view = json.loads(result.out)
        assert [vm["verdict"] for vm in view["vms"]] == [True] * 3 and view["request"]["priority"] == 30


def test_a_failed_vm_makes_the_exit_code_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with serve(tmp_path, Script(fail=MigrationFailed("the copy broke"))) as url:
        result = evacuate(capsys, tmp_path, url, "--vm", VM_1, *destination(), "--wait")
        assert result.code == 1, result
        assert "FAILED" in result.out and "AGENT.MIGRATION_FAILED: the copy broke" in result.out


def test_without_wait_it_prints_the_uuid_and_show_and_cancel_use_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    script = Script(step_s=0.5, steps=20)
    with serve(tmp_path, script) as url:
        started = evacuate(capsys, tmp_path, url, "--vm", VM_1, "--vm", VM_2, "--vm", VM_3, *destination())
        assert started.code == 0, started
        uuid = started.out.strip()
        shown = run_cli(capsys, "evacuation", "show", uuid, *options(tmp_path, url), "--json")
        assert shown.code == 0 and json.loads(shown.out)["evacuationUuid"] == uuid
        cancelled = run_cli(capsys, "evacuation", "cancel", uuid, "--rollback", *options(tmp_path, url))
        assert cancelled.code == 0 and "CANCELLING" in cancelled.out, cancelled
        watched = run_cli(capsys, "evacuation", "watch", uuid, *options(tmp_path, url))
        assert watched.code == 1 and "CANCELLED" in watched.out, watched


def args(**given: Any) -> argparse.Namespace:
    base: dict[str, Any] = dict(
        body=None,
        all=False,
        vm=None,
        dst_host_uuid=HOST_B,
        dst_agent="http://127.0.0.1:1",
        dst_migration_address=None,
        dst_token_file=None,
        dst_storage=DST_STORAGE,
        dst_incoming=None,
        bandwidth=None,
        downtime=None,
        priority=None,
        evacuation_uuid=None,
        strategy=None,
        with_data_volumes=False,
        with_snapshots=False,
        allow_postcopy=False,
    )
    base.update(given)
    return argparse.Namespace(**base)


def test_the_body_from_options_or_a_file(tmp_path: Path) -> None:
    body = evacuation_body(args(vm=[VM_1], bandwidth=40, downtime=500))
    assert body["vms"] == [VM_1] and body["migrateVm"] == {"bandwidth": 40, "downTime": 500}
    assert body["destinations"][0]["dstHost"] == {"uuid": HOST_B, "agentUrl": "http://127.0.0.1:1"}
    with pytest.raises(UsageError, match="--vm UUID"):
        evacuation_body(args())
    with pytest.raises(UsageError, match="--dst-host-uuid"):
        evacuation_body(args(all=True, dst_agent=None))
    path = tmp_path / "body.json"
    path.write_text(json.dumps({"vms": "all", "destinations": [], "priority": 5}))
    assert evacuation_body(args(body=path, priority=7))["priority"] == 7
    path.write_text(json.dumps({"vms": "all", "destinations": [{"dstHost": {}}]}))
    with pytest.raises(UsageError, match="destinations"):
        evacuation_body(args(body=path))


def view(percent: float, state: str = "RUNNING") -> dict[str, Any]:
    return {
        "evacuationUuid": "e",
        "state": state,
        "progress": {"vmsDone": 0, "vmsTotal": 1, "percent": percent, "bytesDone": 10, "bytesTotal": 100},
        "vms": [{"vmUuid": VM_1, "state": "COPYING", "percent": percent, "bytesDone": 10, "bytesTotal": 100}],
    }


def test_the_bars_never_go_back_and_lines_are_throttled(capsys: pytest.CaptureFixture[str]) -> None:
    out = Output(sys.stdout, sys.stderr)
    bars = BarsView(out)
    bars.update(view(40.0))
    bars.update(view(30.0))
    assert bars._percent == {"total": 40.0, VM_1: 40.0}
    bars.close()
    clock = iter([0.0, 0.5, 2.0]).__next__
    lines = LineView(out, clock=clock)
    for percent in (10.0, 20.0, 30.0):
        lines.update(view(percent))
    printed = capsys.readouterr().out
    assert " 10.0%" in printed and " 20.0%" not in printed and " 30.0%" in printed
