"""A Debian 12 container with a real systemd as PID 1, for the installer and unit tests.

- ``cached_root()``: ``debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm`` plus the
  Debian packages ``scripts/install`` wants (so that the install inside runs offline), built once under
  ``CACHE_DIR`` (under a lock; concurrent test runs wait and share it), keyed by the package list.
- ``wheelhouse()``: the agent's Python dependencies as wheels, pinned to this checkout's ``.venv``; cached.
- ``Container``: a throw-away overlay over the cached root (writes go to a temp dir), commands run in it
  without booting (``systemd-nspawn`` as a plain chroot-like runner), then booted with
  ``systemd-nspawn -b --register=no --keep-unit --private-network`` as a process this module owns and stops
  by its pid; commands go into the booted container through ``nsenter`` on its PID 1.

Only loopback exists inside (``--private-network``); the network is used only while building the cache
(debootstrap and apt-get to the Debian mirror, pip to the configured index on the host).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path("/var/cache/ksa-system")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP = ["debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus", SUITE]
#: Where the project is copied inside the container.
SRC_IN_CONTAINER = "/usr/src/kvm-storage-agent"
WHEELS_IN_CONTAINER = "/usr/src/ksa-wheels"
#: Without a system bus on the host, nspawn works only without registering with machined (LAB-NOTES).
NSPAWN = ("systemd-nspawn", "-q", "--register=no", "--keep-unit")
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check")
#: The parts of the checkout the installer needs.
PROJECT_PARTS = ("pyproject.toml", "README.md", "agent", "scripts/install", "systemd", "docs")


#: The environment of commands run in the booted container (none of the host's: pip settings, pyenv...).
CLEAN_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "LANG=C.UTF-8",
)


class ContainerError(Exception):
    """The container could not be built, booted or reached; the message says which step."""


def run(cmd: Sequence[str], *, timeout: float = 600, check: bool = True, **kwargs: Any) -> str:
    """Run a host command; on failure raise with its output (the test shows why)."""
    try:
        proc = subprocess.run(
            list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kwargs
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ContainerError(f"{' '.join(cmd)}: {err}") from err
    if check and proc.returncode != 0:
        raise ContainerError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc.stdout


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_stale(paths: Iterable[Path]) -> None:
    """Old cache entries, unless another run (another checkout) may be using one: an overlay over it is
    mounted, or it was used within the hour."""
    mounts = Path("/proc/mounts").read_text()
    for path in paths:
        if f"lowerdir={path}," in mounts or time.time() - path.stat().st_mtime < 3600:
            continue
        shutil.rmtree(path, ignore_errors=True)


def install_packages() -> list[str]:
    """The Debian packages ``scripts/install --wheelhouse`` would install (it says so itself)."""
    out = run([str(REPO / "scripts/install"), "--wheelhouse", "/nonexistent", "--print-packages"])
    return out.split()


def cached_root() -> Path:
    """The Debian root with systemd and the installer's packages; built on first use (about 2 minutes)."""
    packages = install_packages()
    key = hashlib.sha256(json.dumps([DEBOOTSTRAP, MIRROR, packages]).encode()).hexdigest()[:12]
    root = CACHE_DIR / f"root-{key}"
    with _cache_lock():
        if (root / ".ksa-complete").exists():
            os.utime(root)
            return root
        _remove_stale(CACHE_DIR.glob("root-*"))
        building = CACHE_DIR / f"building-{key}"
        shutil.rmtree(building, ignore_errors=True)
        run([*DEBOOTSTRAP[:-1], SUITE, str(building), MIRROR], timeout=900)
        script = (
            "set -e; export DEBIAN_FRONTEND=noninteractive; apt-get update -q; "
            f"apt-get install -y -q --no-install-recommends {' '.join(packages)}; apt-get clean"
        )
        # Not booted, host network: apt-get reaches the Debian mirror as the package manager does.
        run(
            [*NSPAWN, "-D", str(building), "-M", f"ksa-build-{key}", "sh", "-c", script],
            timeout=900,
        )
        (building / ".ksa-complete").write_text(" ".join(packages) + "\n")
        building.rename(root)
    return root


def wheelhouse() -> Path:
    """The agent's dependencies (plus setuptools and wheel, to build the agent offline) as wheels, pinned to
    the versions in this checkout's ``.venv``; the agent's own wheel is not in it (built per run)."""
    freeze = run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"])
    pyproject = (REPO / "pyproject.toml").read_bytes()
    key = hashlib.sha256(pyproject + freeze.encode()).hexdigest()[:12]
    target = CACHE_DIR / f"wheels-{key}"
    with _cache_lock():
        if (target / ".ksa-complete").exists():
            os.utime(target)
            return target
        _remove_stale(CACHE_DIR.glob("wheels-*"))
        building = CACHE_DIR / f"building-wheels-{key}"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir()
        with tempfile.TemporaryDirectory() as tmp:
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text(freeze)
            source = copy_project(Path(tmp) / "src")
            run(
                [
                    *PIP_WHEEL,
                    "-w",
                    str(building),
                    "-c",
                    str(constraints),
                    str(source),
                    "setuptools>=68",
                    "wheel",
                ],
                timeout=900,
            )
        for own in building.glob("kvm_storage_agent-*.whl"):
            own.unlink()
        (building / ".ksa-complete").write_text(freeze)
        building.rename(target)
    return target


def build_agent_wheel(dest: Path, wheels: Path) -> Path:
    """This checkout's agent as a wheel (offline, build dependencies from ``wheels``)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = copy_project(Path(tmp) / "src")
        run(
            [*PIP_WHEEL, "--no-deps", "--no-index", "--find-links", str(wheels), "-w", str(dest), str(source)]
        )
    (wheel,) = dest.glob("kvm_storage_agent-*.whl")
    return wheel


def copy_project(dest: Path) -> Path:
    """The parts of the working tree the installer uses (not the venv, caches or git)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in PROJECT_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=ignore)
        elif src.exists():
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
    return dest


class Container:
    """An overlay over the cached root; ``boot()`` starts systemd in it, ``close()`` stops and removes all."""

    def __init__(self, lower: Path) -> None:
        self.lower = lower
        self.name = f"ksa-test-{uuid.uuid4().hex[:8]}"
        self.workdir = Path(tempfile.mkdtemp(prefix="ksa-system-"))
        self.root = self.workdir / "root"
        self.console_log = self.workdir / "console.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None
        for name in ("upper", "work", "root"):
            (self.workdir / name).mkdir()
        layers = f"lowerdir={lower},upperdir={self.workdir / 'upper'},workdir={self.workdir / 'work'}"
        run(["mount", "-t", "overlay", "overlay", "-o", layers, str(self.root)])
        self._mounted = True

    def path(self, inside: str) -> Path:
        """A path inside the container, seen from the host."""
        return self.root / inside.lstrip("/")

    # -- not booted ---------------------------------------------------------------------------------------

    def run_unbooted(self, *cmd: str, timeout: float = 600) -> str:
        """Run a command in the container's tree with no init (like a chroot, with /proc, /dev, /sys)."""
        assert self.nspawn is None, "the container is booted"
        return run(
            [*NSPAWN, "-D", str(self.root), "-M", self.name, "--private-network", "--", *cmd],
            timeout=timeout,
        )

    # -- booted -------------------------------------------------------------------------------------------

    def boot(self, timeout: float = 90) -> None:
        with self.console_log.open("wb") as console:
            self.nspawn = subprocess.Popen(
                [
                    *NSPAWN,
                    "-D",
                    str(self.root),
                    "-M",
                    self.name,
                    "-b",
                    "--private-network",
                    "--console=read-only",
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while self.init_pid is None:
            if self.nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited {self.nspawn.returncode}:\n{self.console()}")
            if time.monotonic() > deadline:
                raise ContainerError(f"no systemd in the container after {timeout} s:\n{self.console()}")
            self.init_pid = self._find_init(self.nspawn.pid)
            time.sleep(0.1)
        # Until systemd has its private bus up, systemctl fails to connect: ask again.
        while True:
            state = self.exec("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
            state = state.strip()
            if state in ("running", "degraded"):
                return
            if "Failed to connect to bus" not in state or time.monotonic() > deadline:
                raise ContainerError(f"the container's systemd is {state!r}:\n{self.console()}")
            time.sleep(0.2)

    @staticmethod
    def _find_init(nspawn_pid: int) -> int | None:
        """The container's PID 1 seen from the host: the nspawn process's child that runs systemd."""
        children: list[str] = []
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{nspawn_pid}/task").iterdir():
                children += (task / "children").read_text().split()
        for child in children:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        return None

    def exec(self, *cmd: str, check: bool = True, timeout: float = 120) -> str:
        """Run a command inside the booted container (all its namespaces, its file system)."""
        assert self.init_pid is not None, "the container is not booted"
        return run(
            [*self._enter_all(), "env", "-i", *CLEAN_ENV, *cmd],
            check=check,
            timeout=timeout,
        )

    def _enter_all(self) -> list[str]:
        return ["nsenter", "-t", str(self.init_pid), "-m", "-u", "-i", "-n", "-p", "--"]

    def exec_net(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        """Run a host command in the booted container's network namespace only (its loopback)."""
        assert self.init_pid is not None, "the container is not booted"
        return run(["nsenter", "-t", str(self.init_pid), "-n", "--", *cmd], check=check, timeout=timeout)

    def console(self) -> str:
        with contextlib.suppress(OSError):
            return self.console_log.read_text(errors="replace")[-4000:]
        return ""

    def shutdown(self, timeout: float = 30) -> None:
        """Power the container off (SIGTERM to nspawn: a clean systemd shutdown), else kill it."""
        proc, self.nspawn = self.nspawn, None
        init_pid, self.init_pid = self.init_pid, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Killing the container's PID 1 ends every process in its PID namespace.
                if init_pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(init_pid, signal.SIGKILL)
                proc.kill()
                proc.wait(30)

    def close(self) -> None:
        try:
            self.shutdown()
        finally:
            if self._mounted:
                if subprocess.run(["umount", str(self.root)], check=False).returncode != 0:
                    subprocess.run(["umount", "-l", str(self.root)], check=False)
                self._mounted = False
            shutil.rmtree(self.workdir, ignore_errors=True)
