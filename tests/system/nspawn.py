"""Debian 12 containers: one with a real systemd as PID 1, for the installer and unit tests, and a bare one.

- ``cached_root()``: ``debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm`` plus the
  Debian packages ``scripts/install`` wants (so that the install inside runs offline), built once under
  ``CACHE_DIR`` (under a lock; concurrent test runs wait and share it), keyed by the package list.
- ``bare_root()``: a plain ``debootstrap --variant=minbase bookworm``, nothing added: a brand-new machine.
  ``restore_apt_archives()``/``save_apt_archives()`` keep the packages apt downloads in such roots between
  runs (a download cache only: apt still resolves, verifies and installs everything).
- ``give_package_sources()``: what a new machine on this network has besides Debian itself: this machine's
  apt sources (with their keyrings), apt's proxy and release-date settings, and its CA certificates.
  ``pip_env()``: this machine's pip settings that reach an index (certificate, index URLs, timeouts), as
  environment. Debootstrap takes its mirror from the same apt sources: no mirror is named here.
- ``wheelhouse()``: the agent's Python dependencies as wheels, pinned to this checkout's ``.venv``; cached.
- ``Container``: a throw-away overlay over the cached root (writes go to a temp dir), commands run in it
  without booting (``systemd-nspawn`` as a plain chroot-like runner), then booted with
  ``systemd-nspawn -b --register=no --keep-unit --private-network`` as a process this module owns and stops
  by its pid; commands go into the booted container through ``nsenter`` on its PID 1.

Only loopback exists inside (``--private-network``); the network is used only while building the cache
(debootstrap and apt-get to this machine's Debian mirror, pip to the configured index on the host), and by
``Container.run_plain(network=True)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
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
DEBOOTSTRAP = ["debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus", SUITE]
BARE_DEBOOTSTRAP = ["debootstrap", "--variant=minbase", SUITE]
APT_SOURCES_LIST = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
APT_CONF_DIR = Path("/etc/apt/apt.conf.d")
#: apt settings on how to reach the sources (proxies, release-date checks of a snapshot mirror).
APT_NETWORK_SETTING = re.compile(r"proxy|check-valid-until|check-date", re.IGNORECASE)
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
#: The machine's own CA certificates, from which Debian's ``update-ca-certificates`` rebuilds the bundle.
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
#: pip settings that name files of this machine (local wheel directories, constraints), not an index.
PIP_LOCAL_KEYS = frozenset(
    {"find-links", "constraint", "requirement", "cert", "client-cert", "cache-dir", "log"}
)
#: Where the project is copied inside the container.
SRC_IN_CONTAINER = "/usr/src/kvm-storage-agent"
WHEELS_IN_CONTAINER = "/usr/src/ksa-wheels"
#: Without a system bus on the host, nspawn works only without registering with machined (LAB-NOTES).
NSPAWN = ("systemd-nspawn", "-q", "--register=no", "--keep-unit")
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check")
NSPAWN_CLEANUP_NOISE = re.compile(
    r'^Attempted to remove disk file system under "/run/systemd/nspawn/propagate/'
)
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
    key = hashlib.sha256(json.dumps([DEBOOTSTRAP, apt_sources_text(), packages]).encode()).hexdigest()[:12]
    root = CACHE_DIR / f"root-{key}"
    with _cache_lock():
        if (root / ".ksa-complete").exists():
            os.utime(root)
            return root
        _remove_stale(CACHE_DIR.glob("root-*"))
        building = CACHE_DIR / f"building-{key}"
        shutil.rmtree(building, ignore_errors=True)
        run([*DEBOOTSTRAP[:-1], SUITE, str(building), debian_mirror()], timeout=900)
        give_package_sources(building)
        script = (
            "set -e; export DEBIAN_FRONTEND=noninteractive; apt-get update -q; "
            f"apt-get install -y -q --no-install-recommends {' '.join(packages)}; apt-get clean"
        )
        # Not booted, host network: apt-get reaches this machine's sources as its package manager does.
        run(
            [*NSPAWN, "-D", str(building), "-M", f"ksa-build-{key}", "sh", "-c", script],
            timeout=900,
        )
        (building / ".ksa-complete").write_text(" ".join(packages) + "\n")
        building.rename(root)
    return root


def bare_root() -> Path:
    """``debootstrap --variant=minbase bookworm`` and nothing else, built once (about a minute)."""
    mirror = debian_mirror()
    key = hashlib.sha256(json.dumps([BARE_DEBOOTSTRAP, mirror]).encode()).hexdigest()[:12]
    root = CACHE_DIR / f"bare-{key}"
    with _cache_lock():
        if (root / ".ksa-complete").exists():
            os.utime(root)
            return root
        _remove_stale(CACHE_DIR.glob("bare-*"))
        building = CACHE_DIR / f"building-bare-{key}"
        shutil.rmtree(building, ignore_errors=True)
        run([*BARE_DEBOOTSTRAP[:-1], SUITE, str(building), mirror], timeout=900)
        (building / ".ksa-complete").write_text(" ".join(BARE_DEBOOTSTRAP) + "\n")
        building.rename(root)
    return root


#: Debian packages downloaded by earlier runs in fresh roots (apt checks each against the index it fetched).
APT_ARCHIVES = CACHE_DIR / "apt-archives"
ARCHIVES_IN_ROOT = "var/cache/apt/archives"


def restore_apt_archives(root: Path) -> None:
    """Put the packages earlier runs downloaded where apt in ``root`` looks before it downloads."""
    target = root / ARCHIVES_IN_ROOT
    target.mkdir(parents=True, exist_ok=True)
    with _cache_lock():
        for deb in APT_ARCHIVES.glob("*.deb"):
            if not (target / deb.name).exists():
                shutil.copy2(deb, target / deb.name)


def save_apt_archives(root: Path) -> None:
    """Keep what apt in ``root`` downloaded for the next run (only this suite's packages are ever in it)."""
    with _cache_lock():
        APT_ARCHIVES.mkdir(parents=True, exist_ok=True)
        for deb in (root / ARCHIVES_IN_ROOT).glob("*.deb"):
            if not (APT_ARCHIVES / deb.name).exists():
                shutil.copy2(deb, APT_ARCHIVES / f".{deb.name}.part")
                (APT_ARCHIVES / f".{deb.name}.part").rename(APT_ARCHIVES / deb.name)


# -- this machine's package sources, certificates and pip settings, for a root -----------------------------


def apt_source_files() -> list[Path]:
    """The files apt reads its sources from (one-line ``.list`` and deb822 ``.sources``)."""
    files = [APT_SOURCES_LIST] if APT_SOURCES_LIST.is_file() else []
    if APT_SOURCES_DIR.is_dir():
        files += sorted(
            p for p in APT_SOURCES_DIR.iterdir() if p.suffix in (".list", ".sources") and p.is_file()
        )
    return files


def apt_sources_text() -> str:
    return "".join(f"# {path}\n{path.read_text()}" for path in apt_source_files())


def apt_sources() -> list[tuple[str, list[str], dict[str, str]]]:
    """Every enabled ``deb`` source: (URI, suites, options such as Signed-By)."""
    found: list[tuple[str, list[str], dict[str, str]]] = []
    for path in apt_source_files():
        text = path.read_text()
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    name, _, value = line.partition(":")
                    fields[name.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    found.append((uri, fields.get("suites", "").split(), fields))
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if not words or words[0] != "deb":
                    continue
                options: dict[str, str] = {}
                if words[1].startswith("["):
                    end = next(i for i, word in enumerate(words) if word.endswith("]"))
                    for option in " ".join(words[1 : end + 1]).strip("[]").split():
                        name, _, value = option.partition("=")
                        options[name.lower()] = value
                    words = [words[0], *words[end + 1 :]]
                if len(words) >= 3:
                    found.append((words[1], [words[2]], options))
    return found


def debian_mirror() -> str:
    """The URI this machine's apt gets Debian's ``SUITE`` from (what debootstrap should use too)."""
    for uri, suites, _options in apt_sources():
        if SUITE in suites:
            return uri
    raise ContainerError(f"no apt source for the suite {SUITE} in {', '.join(map(str, apt_source_files()))}")


def give_package_sources(root: Path) -> None:
    """Give ``root`` this machine's apt sources (in place of debootstrap's), the keyrings they name, apt's
    proxy and release-date settings, and the CA certificates (bundle and the local ones it is built from)."""
    etc_apt = root / "etc/apt"
    (etc_apt / "sources.list").unlink(missing_ok=True)
    shutil.rmtree(etc_apt / "sources.list.d", ignore_errors=True)
    (etc_apt / "sources.list.d").mkdir(parents=True)
    for path in apt_source_files():
        shutil.copy2(path, root / str(path).lstrip("/"))
    for _uri, _suites, options in apt_sources():
        keyring = Path(options.get("signed-by", ""))
        if keyring.is_absolute() and keyring.is_file() and not (root / str(keyring).lstrip("/")).exists():
            (root / str(keyring.parent).lstrip("/")).mkdir(parents=True, exist_ok=True)
            shutil.copy2(keyring, root / str(keyring).lstrip("/"))
    if APT_CONF_DIR.is_dir():
        for conf in sorted(APT_CONF_DIR.iterdir()):
            if conf.is_file() and APT_NETWORK_SETTING.search(conf.read_text(errors="replace")):
                shutil.copy2(conf, etc_apt / "apt.conf.d" / conf.name)
    bundle = root / CA_BUNDLE.lstrip("/")
    bundle.parent.mkdir(parents=True, exist_ok=True)
    bundle.unlink(missing_ok=True)  # debootstrap may leave a dangling symlink here
    shutil.copy2(CA_BUNDLE, bundle)
    if LOCAL_CAS.is_dir():
        local = root / str(LOCAL_CAS).lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        for cert in LOCAL_CAS.glob("*.crt"):
            shutil.copy2(cert, local / cert.name)


def pip_env() -> dict[str, str]:
    """This machine's pip settings that reach an index (``pip config list``: files and ``PIP_*``), as
    ``PIP_*`` variables for a root: index URLs (http and https ones only), timeouts, proxies; ``PIP_CERT``
    points at the CA bundle ``give_package_sources`` copied. Local wheel directories and constraint files
    of this machine are left out: a new machine does not have them."""
    listed = run([sys.executable, "-m", "pip", "config", "list"])
    env: dict[str, str] = {}
    for line in listed.splitlines():
        match = re.match(r"^(?:global|install|download|wheel|:env:)\.([a-z0-9-]+)='(.*)'$", line.strip())
        if match is None:
            continue
        key, value = match.groups()
        if key in PIP_LOCAL_KEYS:
            continue
        if key in ("index-url", "extra-index-url"):
            value = " ".join(url for url in value.split() if url.startswith(("http://", "https://")))
            if not value:
                continue
        env["PIP_" + key.upper().replace("-", "_")] = value
    env["PIP_CERT"] = CA_BUNDLE
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


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


def copy_checkout(dest: Path) -> Path:
    """The checkout as a fresh clone has it: the git-tracked files (as they are in the working tree), with
    their modes; no virtualenv, caches or untracked files."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], stdout=subprocess.PIPE, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        src = REPO / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
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

    def run_plain(
        self,
        *cmd: str,
        network: bool = False,
        cwd: str = "/",
        env: dict[str, str] | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the container with no init (a minimal PID 1 reaps what it leaves behind, and
        ends it all when it returns), as root, in a clean environment plus ``env``; with ``network`` on
        this machine's network (for apt and pip), else on a loopback of its own. Never raises on a
        failure of the command: the caller reads ``returncode`` and ``stdout`` (stderr is merged in)."""
        assert self.nspawn is None, "the container is booted"
        argv = [
            *NSPAWN,
            "-D",
            str(self.root),
            "-M",
            self.name,
            "--as-pid2",
            "--console=pipe",
            f"--chdir={cwd}",
        ]
        argv += [f"--setenv={item}" for item in CLEAN_ENV]
        argv += [f"--setenv={name}={value}" for name, value in (env or {}).items()]
        if not network:
            argv.append("--private-network")
        try:
            done = subprocess.run(
                [*argv, "--", *cmd],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
            raise ContainerError(
                f"{' '.join(cmd)}: no end after {timeout:.0f} s; its output ends:\n{out[-6000:]}"
            ) from err
        # systemd-nspawn 252 says this on its way out when it is not registered with machined; not ours.
        done.stdout = "".join(
            line for line in done.stdout.splitlines(keepends=True) if not NSPAWN_CLEANUP_NOISE.match(line)
        )
        return done

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
