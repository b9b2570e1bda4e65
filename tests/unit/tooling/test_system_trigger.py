"""tests/system/trigger.py: the digest that decides whether ./scripts/test runs the system tests changes with
what they prove (the installer's files, their own, pyproject's [project]) and with nothing else."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

TRIGGER = Path(__file__).resolve().parents[2] / "system" / "trigger.py"
_spec = importlib.util.spec_from_file_location("trigger", TRIGGER)
assert _spec is not None and _spec.loader is not None
trigger = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trigger)

PYPROJECT = """[project]
name = "x"
dependencies = ["aiohttp"]

[tool.ruff]
line-length = 110
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    files = {
        "scripts/setup": "#!/bin/sh\n",
        "scripts/install": "#!/bin/sh\n",
        "scripts/lab": "#!/bin/sh\n",
        "systemd/kvm-storage-agent.service": "[Unit]\n",
        "tests/system/test_systemd.py": "",
        "tests/system/passed.sha256": "0\n",
        "agent/systemd.py": "",
        "agent/api/app.py": "",
        "pyproject.toml": PYPROJECT,
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "."], check=True)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("scripts/setup", "#!/bin/sh\napt-get install x\n"),
        ("systemd/kvm-storage-agent.service", "[Unit]\nAfter=x\n"),
        ("systemd/new.conf", "not yet added to git\n"),
        ("tests/system/test_systemd.py", "def test_x(): ...\n"),
        ("agent/systemd.py", "READY = 1\n"),
        ("pyproject.toml", PYPROJECT.replace('["aiohttp"]', '["aiohttp", "yarl"]')),
    ],
)
def test_a_watched_change_runs_them(repo: Path, name: str, text: str) -> None:
    before = trigger.digest(repo)
    (repo / name).write_text(text)
    assert trigger.digest(repo) != before


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("agent/api/app.py", "x = 1\n"),
        ("scripts/lab", "#!/bin/sh\necho\n"),
        ("tests/system/passed.sha256", "1\n"),
        ("pyproject.toml", PYPROJECT.replace("110", "100")),
    ],
)
def test_other_changes_do_not(repo: Path, name: str, text: str) -> None:
    before = trigger.digest(repo)
    (repo / name).write_text(text)
    assert trigger.digest(repo) == before


def test_making_the_installer_executable_counts(repo: Path) -> None:
    before = trigger.digest(repo)
    (repo / "scripts/install").chmod(0o755)
    assert trigger.digest(repo) != before
