"""Whether the system tests must run: they prove the install (``scripts/setup`` in a brand-new Debian root,
``scripts/install`` and the unit under a real systemd, the Vagrantfile), take several minutes, and depend on
few files. ``./scripts/test`` runs them when one of those files differs from what they last passed with, and
always with ``./scripts/test --all``.

What they last passed with is the digest in ``passed.sha256`` (this folder), written by
``tests/system/conftest.py`` when every system test ran and passed, and committed with the change. In a fresh
clone (CI) the checkout's digest then matches the committed one unless a watched file was changed without a
passing run of the system tests, and then they run.

Watched (``WATCHED``): ``scripts/setup``, ``scripts/install``, ``systemd/``, ``vagrant/``, this folder (the
tests and the fresh root's recipe), ``agent/systemd.py`` (the notify and watchdog protocol the unit relies
on) and the ``[project]`` and ``[build-system]`` tables of ``pyproject.toml`` (what setup and install put
in the venv, the command's entry point). Each file counts with its path, its content and whether it is
executable.

``python3 tests/system/trigger.py``: exit 0 and one line when the system tests need not run; exit 1 and
the changed state otherwise (also when git cannot list the files: then they run).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECORD = Path(__file__).resolve().with_name("passed.sha256")
WATCHED = ("scripts/setup", "scripts/install", "systemd", "vagrant", "tests/system", "agent/systemd.py")
PYPROJECT_TABLES = ("project", "build-system")


def watched_files(repo: Path = REPO) -> list[str]:
    """The watched files git tracks, and new ones it does not ignore (a file about to be committed counts)."""
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "--cached", "--others", "--exclude-standard", "--", *WATCHED],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    record = str(RECORD.relative_to(REPO))
    return sorted({name for name in out.splitlines() if name != record and (repo / name).is_file()})


def digest(repo: Path = REPO) -> str:
    """The sha256 of every watched file (path, executable bit, content) and the watched pyproject tables."""
    total = hashlib.sha256()
    for name in watched_files(repo):
        path = repo / name
        executable = "x" if os.access(path, os.X_OK) else "-"
        total.update(f"{name}\0{executable}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    tables = {table: pyproject.get(table) for table in PYPROJECT_TABLES}
    total.update(f"pyproject.toml\0{json.dumps(tables, sort_keys=True)}\n".encode())
    return total.hexdigest()


def recorded() -> str | None:
    try:
        return RECORD.read_text().split()[0]
    except (OSError, IndexError):
        return None


def record_pass() -> None:
    """Called when every system test passed: the digest they passed with."""
    RECORD.write_text(f"{digest()}  the system tests' files when they last passed (trigger.py)\n")


def main() -> int:
    try:
        now = digest()
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"system tests: cannot digest their files ({err}); they run")
        return 1
    last = recorded()
    if now == last:
        print(f"system tests: their files are as when they last passed ({now[:12]}): skipped (--all runs)")
        return 0
    print(f"system tests: their files changed since they last passed ({last and last[:12]} -> {now[:12]})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
