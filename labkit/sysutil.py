"""Running commands and handling processes by pid, the only way the lab ever stops anything."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


class LabError(Exception):
    """Something in the lab is not as it should be; the message says what, for a human."""


def log(message: str) -> None:
    """Progress goes to stderr so that stdout stays machine-readable (uuids, JSON)."""
    print(f"lab: {message}", file=sys.stderr, flush=True)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float | None = 120,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; on failure raise LabError with the command and its stderr."""
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(
            args, input=input, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
        )
    except FileNotFoundError as err:
        raise LabError(f"{args[0]}: not installed (run scripts/setup)") from err
    except subprocess.TimeoutExpired as err:
        raise LabError(f"{' '.join(args)}: timed out after {timeout} s") from err
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"{' '.join(args)}: exit {proc.returncode}: {detail}")
    return proc


def wait_for(what: str, probe: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    """Poll until probe() is true; raise LabError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int | None) -> bool:
    """True for a live process; a zombie counts as dead (this machine's PID 1 does not reap orphans)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the command name, which is in parentheses and may contain spaces.
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def pid_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def pid_matches(pid: int | None, needle: str) -> bool:
    """A live process whose command line mentions `needle`: guards every kill against pid reuse."""
    return bool(pid) and pid_alive(pid) and any(needle in part for part in pid_cmdline(pid or 0))


def netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def pids_in_netns(inodes: Iterable[int]) -> list[int]:
    """Every live process in one of the given network namespaces: all of them were started by the lab."""
    wanted = set(inodes)
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            pid = int(entry.name)
            if netns_inode(pid) in wanted and pid_alive(pid):
                found.append(pid)
    return found


def kill_pids(pids: Sequence[int], *, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to each pid, wait up to `grace` seconds, then SIGKILL whatever is still alive."""
    for pid in pids:
        _signal(pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if pid_alive(pid):
            _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)


def _signal(pid: int, sig: int) -> None:
    if pid <= 0:  # 0 or -N would signal a whole process group (the caller's own, for 0)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def write_file(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write `text` if it differs from what is there; return whether the file changed."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def tail_file(path: Path, lines: int = 15) -> str:
    """The end of a log file, for error messages that should say why a daemon died."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path}: no log)"
