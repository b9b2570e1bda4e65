"""The agent on each lab host: its agent.toml, and start/stop/kill inside the host's namespaces."""

from __future__ import annotations

import http.client
import ipaddress
import os
import secrets
import signal
import ssl
import time
import urllib.parse
import warnings
from pathlib import Path

from . import hostsetup
from .ceph import client_key
from .layout import (
    AGENT_BIN,
    AGENT_PORT,
    BLOCK_ROOT,
    BRIDGE_ADDRESS,
    CA_FILE,
    CEPH_ADDRESS,
    CEPH_MON_PORTS,
    CEPH_POOL,
    CEPH_POOL2,
    CEPH_USER,
    CLUSTER_TOKEN_FILE,
    PREFIX_LEN,
    STORAGE_ROOTS,
    TOKEN_FILE,
    HostSpec,
    insecure,
)
from .state import CephState, HostState
from .sysutil import LabError, kill_pids, log, pid_cmdline, pid_matches, run, tail_file, wait_for, write_file

AGENT_MARK = "kvm-storage-agent"


def health_status(url: str, timeout: float = 2) -> int | None:
    """The status of ``GET {url}/v1/health``, None when the agent does not answer. Straight http.client,
    closed in every case: urllib left a TLS socket to the garbage collector when an agent died mid-answer,
    and its ResourceWarning failed whichever lab case the collector ran in (2026-12-07). No proxy from the
    environment (only the lab's own addresses are contacted); https verified with the lab CA."""
    parts = urllib.parse.urlsplit(f"{url}/v1/health")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=str(CA_FILE) if CA_FILE.exists() else None)
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    # An agent killed while this probe's TLS handshake runs leaves an SSL socket inside ssl/http.client that
    # nothing here holds; it is finalized when the exception is dropped, and its ResourceWarning (an error
    # in the lab tests) failed a case whose verdict had passed (2026-12-07, the agent killed mid-copy). The
    # probe's own connection is closed below in every case; the warning about theirs is not ours to act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            conn.request("GET", parts.path)
            with conn.getresponse() as response:
                response.read()
                return response.status
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            conn.close()


class AgentIncomplete(LabError):
    """The agent died at start because part of the package is not written yet (an ImportError): the lab
    comes up without agents and says so, instead of failing, while colleagues are still writing `serve`."""


def config_text(host: HostSpec, hs: HostState, ceph: CephState, *, twin_port: int | None = None) -> str:
    """agent.toml in the shape agent/config.py reads (the management plane's token, and the cluster token the
    agents present to each other).
    ``twin_port``: a second, plain-text agent on that port (see ``start_twin``)."""
    lines = [
        f"# written by scripts/lab for {host.name}",
        f'listen_address = "{host.address}"',
        f"port = {twin_port or AGENT_PORT}",
        f'token_file = "{TOKEN_FILE}"',
        f'cluster_token_file = "{CLUSTER_TOKEN_FILE}"',
        f'host_uuid = "{hs.uuid}"',
        'libvirt_uri = "qemu:///system"',
        f'state_dir = "{host.dir / f"state-{twin_port}" if twin_port else host.agent_state_dir}"',
        f'migration_address = "{host.address}"',
    ]
    if twin_port and not insecure():
        # Plain HTTP and migration streams; libvirtd itself has only its TLS listener.
        lines += ["insecure_transport = true", f'peer_libvirt_uri = "qemu+tls://{host.address}/system"']
    elif insecure():
        lines.append("insecure_transport = true  # scripts/lab up --insecure")
    else:  # the host's /etc/pki (bind-mounted in its namespace), as a real install has it
        lines += [
            'tls_cert = "/etc/pki/libvirt/servercert.pem"',
            'tls_key = "/etc/pki/libvirt/private/serverkey.pem"',
            'tls_ca = "/etc/pki/CA/cacert.pem"',
        ]
    if level := os.environ.get("KSA_LAB_AGENT_LOG_LEVEL"):  # e.g. DEBUG, to see every steering step
        lines.append(f'log_level = "{level.upper()}"')
    # Four moves into one host at once (tests/lab/test_host_budget.py): a destination refuses more than
    # limits.incoming_migrations (429) and the source waits for a free one.
    lines += ["", "[limits]", "incoming_migrations = 4"]
    for name, _, _ in STORAGE_ROOTS:
        lines += ["", "[[storage]]", f'uuid = "{hs.storage[name]}"', f'path = "{host.storage_path(name)}"']
    lines += ["", "[[storage]]", f'uuid = "{hs.storage[BLOCK_ROOT]}"', 'kind = "block"']
    lines += [f'path = "{host.block_root}"']
    lines += ["", "[[storage]]", f'uuid = "{ceph.storage_uuid}"', 'kind = "rbd"', f'pool = "{CEPH_POOL}"']
    lines += [f'monitors = ["{CEPH_ADDRESS}:{CEPH_MON_PORTS[1]}"]', f'user = "{CEPH_USER}"']
    lines += [f'secret_uuid = "{ceph.secret_uuid}"', f'keyring = "{host.ceph_keyring}"']
    lines += ["", "[[storage]]", f'uuid = "{ceph.storage2_uuid}"', 'kind = "rbd"', f'pool = "{CEPH_POOL2}"']
    lines += [f'monitors = ["{CEPH_ADDRESS}:{CEPH_MON_PORTS[1]}"]', f'user = "{CEPH_USER}"']
    lines += [f'secret_uuid = "{ceph.secret_uuid}"', f'keyring = "{host.ceph_keyring}"']
    if twin_port:
        return "\n".join(lines) + "\n"
    # The ZStack dialect, for a management server played from the lab's network or inside a host.
    lab_net = ipaddress.ip_network(f"{BRIDGE_ADDRESS}/{PREFIX_LEN}", strict=False)
    lines += ["", "[zstack]", "enabled = true", f'allowed_networks = ["{lab_net}", "127.0.0.0/8"]']
    return "\n".join(lines) + "\n"


def start_twin(host: HostSpec, hs: HostState, ceph: CephState, port: int) -> tuple[int, str]:
    """A second agent on ``host`` with ``insecure_transport = true`` on ``port`` (its own state directory),
    next to the lab's: to compare plain migration streams with TLS on one lab (tests/lab/test_security.py,
    bench case 6). Returns (pid, its http URL); the caller stops it (``kill_pids``)."""
    config = host.dir / f"agent-{port}.toml"
    ensure_cluster_token()
    write_file(config, config_text(host, hs, ceph, twin_port=port))
    argv = [str(AGENT_BIN), "serve", "--config", str(config)]
    pid = hostsetup.spawn(host, argv, host.dir / f"agent-{port}.log", env={"PYTHONUNBUFFERED": "1"})
    url = f"http://{host.address}:{port}"

    def ready() -> bool:
        if not pid_matches(pid, AGENT_MARK):
            raise LabError(
                f"{host.name}: the agent on port {port} exited:\n{tail_file(host.dir / f'agent-{port}.log')}"
            )
        return health_status(url) == 200

    wait_for(f"{host.name} agent at {url}", ready, timeout=60, interval=0.3)
    return pid, url


def config_stale(host: HostSpec, hs: HostState, ceph: CephState) -> bool:
    """The running agent's config is not what the lab wants now (e.g. the lab switched to or from TLS)."""
    try:
        return host.agent_config.read_text() != config_text(host, hs, ceph)
    except OSError:
        return True


def write_config(host: HostSpec, hs: HostState, ceph: CephState) -> bool:
    host.agent_state_dir.mkdir(parents=True, exist_ok=True)
    ensure_cluster_token()
    # The client's key for the agent's own reads and writes of the pools (stopped VMs, RBD snapshots).
    keyring = f"[client.{CEPH_USER}]\n\tkey = {client_key()}\n"
    changed = write_file(host.ceph_keyring, keyring, 0o600)
    return write_file(host.agent_config, config_text(host, hs, ceph)) or changed


def ensure_cluster_token() -> None:
    """The cluster token the config names (a lab brought up before it existed gets one at the next start)."""
    if not CLUSTER_TOKEN_FILE.exists():
        write_file(CLUSTER_TOKEN_FILE, secrets.token_urlsafe(32) + "\n", 0o600)


def serve_available() -> str | None:
    """None when `kvm-storage-agent serve` exists, else why not (the command is still being written)."""
    if not AGENT_BIN.exists():
        return f"{AGENT_BIN} is missing (run scripts/setup)"
    proc = run([AGENT_BIN, "serve", "--help"], check=False, timeout=60)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        return f"`kvm-storage-agent serve --help` failed: {last[-1] if last else proc.returncode}"
    return None


def running(hs: HostState) -> bool:
    return pid_matches(hs.agent_pid, AGENT_MARK)


def running_this_checkout(hs: HostState) -> bool:
    """Running, and from this checkout's .venv (the lab is machine-wide; checkouts are not)."""
    return pid_matches(hs.agent_pid, str(AGENT_BIN))


def healthy(host: HostSpec) -> bool:
    status = health_status(host.agent_url)
    return status is not None and 200 <= status < 300


def strays(host: HostSpec, hs: HostState) -> list[int]:
    """Agents serving this host's config that the state does not name (a start that raced another one):
    left alone, one holds the port and the next start dies with "address already in use"."""
    config = str(host.agent_config)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == hs.agent_pid:
            continue
        argv = pid_cmdline(int(entry.name))
        if "serve" in argv and config in argv and any(AGENT_MARK in part for part in argv):
            found.append(int(entry.name))
    return found


def start(host: HostSpec, hs: HostState, ceph: CephState) -> None:
    """Start the agent under the host's holder (so in its namespaces) and wait for /v1/health."""
    write_config(host, hs, ceph)
    if running(hs):
        return
    if extra := strays(host, hs):
        log(f"{host.name}: stopping agents the lab state did not know: {extra}")
        kill_pids(extra, grace=20)
    argv = [str(AGENT_BIN), "serve", "--config", str(host.agent_config)]
    for attempt in (1, 2):
        hs.agent_pid = hostsetup.spawn(host, argv, host.agent_log, env={"PYTHONUNBUFFERED": "1"})
        write_file(host.agent_pid_file, f"{hs.agent_pid}\n")
        log(f"{host.name}: agent pid {hs.agent_pid}, log {host.agent_log}")
        try:
            wait_healthy(host, hs)
            return
        except AgentIncomplete:
            raise
        except LabError as err:
            # A live agent was taken for a dead one when its command line was read before its exec had
            # set it up (fixed in hostsetup.spawn); a fresh agent was also seen SIGKILLed within a second
            # of its start, by a sender not found. An agent that serves this host's config and answers is
            # kept; else once more, saying so: a broken agent fails twice.
            if (serving := _serving(host, hs)) is not None:
                log(f"WARNING: {str(err).splitlines()[0]}; but pid {serving} serves {host.name}: keeping it")
                hs.agent_pid = serving
                write_file(host.agent_pid_file, f"{serving}\n")
                return
            if attempt == 2:
                raise
            log(f"WARNING: {str(err).splitlines()[0]}; starting it once more")


def _serving(host: HostSpec, hs: HostState) -> int | None:
    """The one live agent process of this host's config, if the host's agent URL answers (else None)."""
    alive = [p for p in {hs.agent_pid or 0, *strays(host, hs)} if pid_matches(p, AGENT_MARK)]
    return alive[0] if len(alive) == 1 and healthy(host) else None


def wait_healthy(host: HostSpec, hs: HostState) -> None:
    def ready() -> bool:
        if not running(hs):
            tail = tail_file(host.agent_log)
            last = tail.strip().splitlines()[-1:] or [""]
            if "ModuleNotFoundError: No module named 'agent" in last[0] or "ImportError" in last[0]:
                raise AgentIncomplete(f"{host.name}: the agent is incomplete: {last[0]}")
            how = _exit_of(host, hs.agent_pid)
            raise LabError(f"{host.name}: the agent exited{how}; {host.agent_log}:\n{tail}")
        return healthy(host)

    wait_for(f"{host.name} agent at {host.agent_url}/v1/health", ready, timeout=60, interval=0.3)


def _exit_of(host: HostSpec, pid: int | None) -> str:
    """How the holder saw ``pid`` end (its reaper logs every child), as " (killed by signal 9)"."""
    deadline = time.monotonic() + 2  # the holder's reaper logs right after the child is gone
    while True:
        try:
            lines = (host.dir / "holder.log").read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        for line in reversed(lines):
            if line.startswith(f"holder: pid {pid} "):
                return " (" + line.split(" ", 3)[3] + ")"
        if time.monotonic() > deadline:
            return ""
        time.sleep(0.1)


def stop(host: HostSpec, hs: HostState, *, hard: bool = False) -> None:
    """SIGTERM with time for a graceful shutdown, or SIGKILL at once (`hard`, for fault tests)."""
    # An agent the state does not name (a start that raced another) is stopped too: it may be the one
    # serving, while the pid the state names is the one that lost the race for the port.
    pids = ([hs.agent_pid] if running(hs) and hs.agent_pid is not None else []) + strays(host, hs)
    if not pids:
        hs.agent_pid = None
        host.agent_pid_file.unlink(missing_ok=True)
        return
    if hard:
        kill_pids(pids, grace=0, sig=signal.SIGKILL)
    else:
        kill_pids(pids, grace=20)
    log(f"{host.name}: agent pid {', '.join(map(str, pids))} {'killed' if hard else 'stopped'}")
    hs.agent_pid = None
    host.agent_pid_file.unlink(missing_ok=True)
