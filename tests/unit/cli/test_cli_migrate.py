"""``kvm-storage-agent migrate``: the body it builds, what it prints, and the exit codes scripts rely on."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import Run, run_cli
from fake_agent_api import BASE_PATH, NEW_PATH, STORAGE_UUID, TOKEN, VM_UUID, FakeAgent, error_code, running

DST_HOST = "3c2b1a09-8f7e-4d6c-9b5a-4f3e2d1c0b9a"
TASK_UUID = "6e5d4c3b-2a19-4807-b6a5-9483726150ab"

Migrate = Callable[..., Run]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KSA_AGENT_URL", raising=False)
    monkeypatch.delenv("KSA_TOKEN_FILE", raising=False)


@pytest.fixture
def fake() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
def url(fake: FakeAgent) -> Iterator[str]:
    with running(fake) as base:
        yield base


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def migrate(capsys: pytest.CaptureFixture[str], url: str, token_file: Path) -> Migrate:
    """``migrate VM_UUID --agent --token-file --dst-storage`` plus the given options."""

    def invoke(*options: str) -> Run:
        base = [
            "migrate",
            VM_UUID,
            "--agent",
            url,
            "--token-file",
            str(token_file),
            "--dst-storage",
            STORAGE_UUID,
        ]
        return run_cli(capsys, *base, *options)

    return invoke


def test_minimal_body_and_the_task_uuid_alone_on_stdout(migrate: Migrate, fake: FakeAgent) -> None:
    result = migrate()
    assert result.code == 0
    (call,) = fake.calls("POST")
    assert call.path == f"/v1/vms/{VM_UUID}/storage-migrations"
    assert call.headers["Authorization"] == f"Bearer {TOKEN}"
    assert call.body == {
        "primaryStorageMigrateVm": {
            "dstPrimaryStorageUuid": STORAGE_UUID,
            "withDataVolumes": False,
            "withSnapshots": False,
            "strategy": "auto",
        },
        "migrateVm": {},
        "systemTags": [],
        "userTags": [],
    }
    (task_uuid,) = fake.tasks
    assert result.out == f"{task_uuid}\n"


def test_full_cross_host_body(migrate: Migrate, fake: FakeAgent, tmp_path: Path) -> None:
    dst_token = tmp_path / "dst-token"
    dst_token.write_text("peer-token\n")
    result = migrate(
        "--dst-host-uuid", DST_HOST.replace("-", ""),  # ZStack's 32-hex form is accepted and normalised
        "--dst-agent", "http://127.0.0.2:7070",
        "--dst-migration-address", "127.0.0.2",
        "--dst-token-file", str(dst_token),
        "--with-data-volumes", "--with-snapshots",
        "--bandwidth", "50", "--downtime", "200",
        "--strategy", "postcopy", "--allow-postcopy", "--priority", "20",
        "--timeout", "600", "--task-uuid", TASK_UUID,
    )  # fmt: skip
    assert result.code == 0, result.err
    assert fake.calls("POST")[0].body == {
        "primaryStorageMigrateVm": {
            "dstPrimaryStorageUuid": STORAGE_UUID,
            "withDataVolumes": True,
            "withSnapshots": True,
            "strategy": "postcopy",
            "dstHostUuid": DST_HOST,
        },
        "migrateVm": {"downTime": 200, "bandwidth": 50},
        "systemTags": [],
        "userTags": [],
        "dstHost": {
            "uuid": DST_HOST,
            "agentUrl": "http://127.0.0.2:7070",
            "migrationAddress": "127.0.0.2",
            "token": "peer-token",
        },
        "taskUuid": TASK_UUID,
        "timeout": 600.0,
        "allowPostCopy": True,
        "priority": 20,
    }
    assert result.out == f"{TASK_UUID}\n"


def test_json_prints_the_agents_answer(migrate: Migrate, fake: FakeAgent) -> None:
    result = migrate("--json", "--task-uuid", TASK_UUID)
    assert result.code == 0
    answer = json.loads(result.out)
    assert answer["taskUuid"] == TASK_UUID
    assert answer["state"] == "PENDING"


def test_wait_shows_progress_then_the_summary_and_exits_0(migrate: Migrate) -> None:
    result = migrate("--wait", "--task-uuid", TASK_UUID)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == f"task {TASK_UUID}"
    # Off a terminal: plain progress lines (here at most one, the run takes well under a second).
    assert "%" in lines[1]
    assert "ETA" in lines[1]
    assert f"task {TASK_UUID}: SUCCEEDED" in lines
    assert "downtime   23 ms" in lines
    assert f"volume     vol-root (vda, Root): {NEW_PATH}  storage {STORAGE_UUID}" in lines
    assert f"             <- {BASE_PATH}" in lines


def test_wait_json_prints_only_the_final_task(migrate: Migrate) -> None:
    result = migrate("--wait", "--json")
    assert result.code == 0
    final = json.loads(result.out)
    assert final["state"] == "SUCCEEDED"
    assert final["inventory"]["volumes"][0]["installPath"] == NEW_PATH


def test_wait_on_a_failed_task_exits_1_with_the_error(migrate: Migrate, fake: FakeAgent) -> None:
    fake.script = "failed"
    result = migrate("--wait")
    assert result.code == 1
    assert ": FAILED" in result.out
    assert "memory did not converge within 300 ms downtime [AGENT.CONVERGENCE_FAILED]" in result.out
    assert "dirty rate 900 MiB/s" in result.out


def test_wait_json_on_a_failed_task_keeps_stdout_json(migrate: Migrate, fake: FakeAgent) -> None:
    fake.script = "failed"
    result = migrate("--wait", "--json")
    assert result.code == 1
    assert json.loads(result.out)["error"]["code"] == "AGENT.CONVERGENCE_FAILED"
    assert "AGENT.CONVERGENCE_FAILED" in result.err


def test_wait_on_a_cancelled_task_exits_1(migrate: Migrate, fake: FakeAgent) -> None:
    fake.script = "cancelled"
    result = migrate("--wait")
    assert result.code == 1
    assert ": CANCELLED" in result.out


def test_wait_by_polling(migrate: Migrate, fake: FakeAgent) -> None:
    result = migrate("--wait", "--no-events", "--poll-interval", "0.01")
    assert result.code == 0
    assert fake.calls("GET", "/events") == []
    assert len(fake.calls("GET")) >= 4


def test_agent_and_token_from_the_environment(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    token_file: Path,
    fake: FakeAgent,
) -> None:
    monkeypatch.setenv("KSA_AGENT_URL", url)
    monkeypatch.setenv("KSA_TOKEN_FILE", str(token_file))
    result = run_cli(capsys, "migrate", VM_UUID, "--dst-storage", STORAGE_UUID)
    assert result.code == 0
    assert fake.calls("POST")[0].headers["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--dst-agent", "http://127.0.0.2:7070"], "--dst-agent needs --dst-host-uuid"),
        (["--bandwidth", "-1"], "must be at least 0 (0: uncapped)"),
        (["--downtime", "soon"], "not a whole number"),
        (["--strategy", "fast"], "invalid choice"),
        (["--task-uuid", "nope"], "'nope' is not a uuid"),
        (
            ["--dst-host-uuid", DST_HOST, "--dst-agent", "ftp://x"],
            "--dst-agent: Value error, must be an http(s) URL",
        ),
        (["--downtime", "600001"], "--downtime: Input should be less than or equal to 600000"),
    ],
)
def test_usage_errors_exit_2_before_any_request(
    migrate: Migrate,
    fake: FakeAgent,
    options: list[str],
    message: str,
) -> None:
    result = migrate(*options)
    assert result.code == 2
    assert message in result.err
    assert fake.requests == []


def test_no_agent_url_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "migrate", VM_UUID, "--dst-storage", STORAGE_UUID)
    assert result.code == 2
    assert "--agent URL (or KSA_AGENT_URL) is required" in result.err


def test_unreadable_token_file_exits_2(capsys: pytest.CaptureFixture[str], url: str, tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    result = run_cli(capsys, "tasks", "--agent", url, "--token-file", str(missing))
    assert result.code == 2
    assert f"--token-file: cannot read {missing}" in result.err


def test_no_token_is_401_and_exits_2_with_a_hint(capsys: pytest.CaptureFixture[str], url: str) -> None:
    result = run_cli(capsys, "migrate", VM_UUID, "--agent", url, "--dst-storage", STORAGE_UUID)
    assert result.code == 2
    assert "missing or wrong token [AGENT.UNAUTHORIZED] (HTTP 401)" in result.err
    assert "--token-file" in result.err


@pytest.mark.parametrize(
    ("status", "code", "exit_code"),
    [
        (400, "AGENT.STORAGE_NOT_FOUND", 2),
        (404, "AGENT.NOT_FOUND", 1),
        (409, "AGENT.CONFLICT", 1),
        (413, "AGENT.PAYLOAD_TOO_LARGE", 2),
        (500, "AGENT.INTERNAL", 1),
        (503, "AGENT.STOPPING", 3),
    ],
)
def test_agent_refusals_map_to_exit_codes(
    migrate: Migrate,
    fake: FakeAgent,
    status: int,
    code: str,
    exit_code: int,
) -> None:
    fake.fail_with = (status, error_code(code, "refused", field="dstPrimaryStorageUuid"))
    result = migrate()
    assert result.code == exit_code
    assert f"refused [{code}] (field dstPrimaryStorageUuid) (HTTP {status})" in result.err
    assert result.out == ""


def test_refusal_with_json_is_json_on_stdout(migrate: Migrate, fake: FakeAgent) -> None:
    refusal = error_code("AGENT.CONFLICT", "the VM already has a task")
    fake.fail_with = (409, refusal)
    result = migrate("--json")
    assert result.code == 1
    assert json.loads(result.out) == {"error": refusal, "httpStatus": 409}


def test_unreachable_agent_exits_3(capsys: pytest.CaptureFixture[str], token_file: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [
        "--agent",
        f"http://127.0.0.1:{port}",
        "--token-file",
        str(token_file),
        "--dst-storage",
        STORAGE_UUID,
    ]
    result = run_cli(capsys, "migrate", VM_UUID, *args)
    assert result.code == 3
    assert "unreachable" in result.err
