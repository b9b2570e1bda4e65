"""Bring the whole lab up, take it down, and describe it (`status --json`, the contract tests read)."""

from __future__ import annotations

import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import agentctl, blockdevs, ceph, hostsetup, image, network
from .layout import (
    AGENT_BIN,
    BLOCK_ROOT,
    BRIDGE,
    CA_FILE,
    CLUSTER_TOKEN_FILE,
    GUESTS_DIR,
    HOSTS,
    INSECURE_FILE,
    LAB_DIR,
    OPERATOR_PKI,
    STATE_FILE,
    STORAGE_ROOTS,
    TMP_DIR,
    TOKEN_FILE,
    HostSpec,
    insecure,
)
from .state import HostState, LabState, lab_lock
from .sysutil import (
    LabError,
    kill_pids,
    log,
    netns_inode,
    pid_alive,
    pid_cmdline,
    pids_in_netns,
    run,
    write_file,
)

# Command-line marks of every kind of process the lab starts (used only together with a lab netns).
LAB_PROCESS_MARKS = ("labkit.holder", "libvirtd", "virtlogd", "qemu-system", agentctl.AGENT_MARK)


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (namespaces, mounts, libvirtd)")


# --- up ---------------------------------------------------------------------------------------------------


def up(with_agents: bool = True, restart_agents: bool = False, insecure_lab: bool = False) -> LabState:
    """Secure by default (a lab CA, libvirtd on TLS only, agents on HTTPS, encrypted migrations);
    ``insecure_lab``: plain TCP and HTTP as before, explicitly. Switching either way restarts the daemons."""
    require_root()
    with lab_lock():
        state = LabState.load()
        if state is None:
            if _leftovers():
                log("found pieces of a lab without its state file; removing them first")
                _down_unlocked()
            state = LabState.fresh()
        for path in (LAB_DIR, GUESTS_DIR, TMP_DIR):
            path.mkdir(parents=True, exist_ok=True)
        state.save()
        for secret in (TOKEN_FILE, CLUSTER_TOKEN_FILE):
            if not secret.exists():
                write_file(secret, secrets.token_urlsafe(32) + "\n", 0o600)
        if insecure_lab != insecure():
            log(f"the lab switches to {'INSECURE (plain TCP and HTTP)' if insecure_lab else 'TLS'}")
            restart_agents = True
            if insecure_lab:
                write_file(INSECURE_FILE, "scripts/lab up --insecure\n")
            else:
                INSECURE_FILE.unlink()
        hostsetup.ensure_ca()
        network.ensure_bridge()
        # Ceph comes up (on the bridge's address) while the hosts do: it waits on its own daemons.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ceph") as pool:
            ceph_up = pool.submit(ceph.ensure, state.ceph)
            new_mounts = _ensure_storage()
            for host in HOSTS:
                _ensure_host(host, state.hosts[host.name], rebuild=new_mounts)
                state.save()
            for host in HOSTS:
                hostsetup.wait_libvirtd(host, state.hosts[host.name])
            ceph_up.result()
        state.save()
        for host in HOSTS:
            ceph.ensure_secret(host, state.ceph)
        image.ensure_image()  # build the guest kernel and initramfs now (cached): fail early, not mid-test
        _ensure_agents(state, with_agents, restart_agents)
        state.save()
    return state


def _ensure_storage() -> bool:
    """Storage roots live in the root namespace before any holder exists, so every host sees the same
    paths (host namespaces are private copies: a mount made later would not show up in them).
    Return whether a mount had to be made (then the hosts' namespaces are rebuilt)."""
    made = False
    for host in HOSTS:
        for name, kind, size_mib in STORAGE_ROOTS:
            path = host.storage_path(name)
            path.mkdir(parents=True, exist_ok=True)
            if kind == "tmpfs" and not os.path.ismount(path):
                run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", f"ksa-lab-{name}", path])
                made = True
        blockdevs.ensure(host)
    return made


def _ensure_host(host: HostSpec, hs: HostState, rebuild: bool) -> None:
    network.ensure_host_network(host)
    if rebuild or not hostsetup.holder_ok(host, hs):
        _stop_host_processes(host, hs)
        hs.virtlogd_pid = hs.libvirtd_pid = hs.agent_pid = None
        hostsetup.start_holder(host, hs)
    config_changed = hostsetup.prepare_files(host, hs)
    hostsetup.ensure_mounts_and_name(host, hs)
    hostsetup.ensure_daemons(host, hs, restart_libvirtd=config_changed)


def _ensure_agents(state: LabState, with_agents: bool, restart: bool) -> None:
    if not with_agents or os.environ.get("LAB_NO_AGENT") == "1":
        log("WARNING: agents not started (LAB_NO_AGENT=1 or --no-agent)")
        state.agents = False
        return
    for host in HOSTS:
        hs = state.hosts[host.name]
        stale = agentctl.config_stale(host, hs, state.ceph)
        if agentctl.running(hs) and (restart or stale or not agentctl.running_this_checkout(hs)):
            log(f"{host.name}: restarting the agent (from {AGENT_BIN}{', new config' if stale else ''})")
            agentctl.stop(host, hs)
    if all(agentctl.running(state.hosts[h.name]) and agentctl.healthy(h) for h in HOSTS):
        state.agents = True
        return
    missing = agentctl.serve_available()
    if missing is not None:
        log(f"WARNING: agents not started: {missing}")
        state.agents = False
        return
    try:
        for host in HOSTS:
            agentctl.start(host, state.hosts[host.name], state.ceph)
    except agentctl.AgentIncomplete as err:
        log(f"WARNING: agents not started: {err}")
        for host in HOSTS:
            agentctl.stop(host, state.hosts[host.name])
        state.agents = False
        return
    state.agents = True


# --- down -------------------------------------------------------------------------------------------------


def down() -> None:
    require_root()
    with lab_lock():
        _down_unlocked()


def _lab_netns_inodes(state: LabState | None) -> set[int]:
    inodes = {i for h in HOSTS if (i := network.netns_file_inode(h.netns)) is not None}
    if state is not None:
        inodes |= {h.netns_inode for h in state.hosts.values() if h.netns_inode is not None}
    return inodes


def _holder_netns_inodes() -> set[int]:
    """Network namespaces of holders found by their command line, which names this lab's socket path:
    after a crash that lost both the state file and the netns names, they still lead to the rest.
    Never this command's own namespace (the root one), where Ceph's holder lives: `down` stops every
    process of the namespaces found here."""
    inodes = set()
    root = netns_inode(os.getpid())
    for entry in Path("/proc").iterdir():
        argv = pid_cmdline(int(entry.name)) if entry.name.isdigit() else []
        if "labkit.holder" in argv and any(a.startswith(f"{LAB_DIR}/") for a in argv):
            if str(ceph.HOLDER_SOCKET) in argv:
                continue
            inode = netns_inode(int(entry.name))
            if inode is not None and inode != root:
                inodes.add(inode)
    return inodes


def _lab_pids(state: LabState | None) -> list[int]:
    """Processes in a lab network namespace. An inode that only the state file remembers may have been
    reused by an unrelated namespace since, so there a process must also look like one the lab starts."""
    current = {i for h in HOSTS if (i := network.netns_file_inode(h.netns)) is not None}
    current |= _holder_netns_inodes()
    pids = set(pids_in_netns(current))
    for pid in pids_in_netns(_lab_netns_inodes(state) - current):
        if any(mark in part for part in pid_cmdline(pid) for mark in LAB_PROCESS_MARKS):
            pids.add(pid)
    return sorted(pids)


def _stop_pids(pids: list[int]) -> None:
    """Everything but the holders first, so that the holders are still there to reap them."""
    holders = [p for p in pids if any("labkit.holder" in part for part in pid_cmdline(p))]
    others = [p for p in pids if p not in holders]
    if others:
        kill_pids(others)
    if holders:
        kill_pids(holders)


def _stop_host_processes(host: HostSpec, hs: HostState) -> None:
    """Before rebuilding one host: stop whatever still runs in its namespace."""
    inodes = {i for i in (network.netns_file_inode(host.netns), hs.netns_inode) if i is not None}
    pids = [
        p
        for p in pids_in_netns(inodes)
        if any(mark in part for part in pid_cmdline(p) for mark in LAB_PROCESS_MARKS)
    ]
    if pids:
        log(f"{host.name}: stopping stale processes {pids}")
        _stop_pids(pids)


def _leftovers() -> bool:
    return (
        any(network.netns_exists(h.netns) or network.link_exists(h.veth) for h in HOSTS)
        or (network.link_exists(BRIDGE) or bool(_lab_mounts()) or bool(_holder_netns_inodes()))
        or any(ceph.lab_pids())
        or bool(blockdevs.attached())
    )


def _lab_mounts() -> list[str]:
    prefix = str(LAB_DIR) + "/"
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted({p for p in points if p.startswith(prefix)}, key=len, reverse=True)


def _down_unlocked() -> None:
    state = LabState.load()
    pids = _lab_pids(state)
    if pids:
        log(f"stopping {len(pids)} lab processes")
        _stop_pids(pids)
    # After the hosts (their QEMUs are Ceph's clients), before the bridge it listens on.
    ceph_pids = ceph.stop(state.ceph if state else None)
    if ceph_pids:
        log(f"stopped Ceph ({len(ceph_pids)} processes)")
    pids += ceph_pids
    blockdevs.remove_all()
    for host in HOSTS:
        network.remove_host_network(host)
    network.remove_bridge()
    for point in _lab_mounts():
        if run(["umount", point], check=False).returncode != 0:
            run(["umount", "-l", point], check=False)
    if _lab_mounts():
        raise LabError(f"could not unmount {_lab_mounts()}; not deleting {LAB_DIR}")
    shutil.rmtree(LAB_DIR, ignore_errors=True)
    left = [p for p in pids if pid_alive(p)]
    loops = blockdevs.attached()
    if left or LAB_DIR.exists() or loops:
        raise LabError(
            f"lab not fully down: processes {left}, {LAB_DIR} exists: {LAB_DIR.exists()}, "
            f"loop devices {loops}"
        )
    log("lab is down")


# --- status -----------------------------------------------------------------------------------------------


def host_health(host: HostSpec, hs: HostState) -> dict[str, bool]:
    return {
        "netns": network.netns_exists(host.netns),
        "link": network.link_is_up(host),
        "holder": hostsetup.holder_ok(host, hs),
        "virtlogd": hostsetup.virtlogd_ok(hs),
        "libvirtd": hostsetup.libvirtd_ok(hs),
        "agent": agentctl.running(hs),
    }


def status() -> tuple[bool, dict[str, Any]]:
    """(lab is up, the status document). Up means both hosts' namespaces and libvirtd are there; the
    agents' state is reported (health.agent) but a lab without agents still counts as up."""
    state = LabState.load()
    if state is None:
        raise LabError(f"the lab is not up ({STATE_FILE} is missing): run scripts/lab up")
    try:
        token = TOKEN_FILE.read_text().strip()
    except OSError as err:
        raise LabError(f"the lab is not up: {TOKEN_FILE}: {err.strerror}") from err
    hosts = []
    all_up = True
    for host in HOSTS:
        hs = state.hosts[host.name]
        health = host_health(host, hs)
        all_up &= all(health[k] for k in ("netns", "holder", "virtlogd", "libvirtd"))
        hosts.append(
            {
                "name": host.name,
                "uuid": hs.uuid,
                "address": host.address,
                "libvirtUri": host.libvirt_uri,
                "agentUrl": host.agent_url,
                "migrationAddress": host.address,
                "storage": [
                    {
                        "uuid": hs.storage[name],
                        "path": str(host.storage_path(name)),
                        "name": name,
                        "kind": "file",
                    }
                    for name, _, _ in STORAGE_ROOTS
                ]
                + [
                    {
                        "uuid": hs.storage[BLOCK_ROOT],
                        "path": str(host.block_root),
                        "name": BLOCK_ROOT,
                        "kind": "block",
                    }
                ],
                "blockRoot": str(host.block_root),
                "agentConfig": str(host.agent_config),
                "agentLog": str(host.agent_log),
                "pids": {
                    "holder": hs.holder_pid,
                    "libvirtd": hs.libvirtd_pid,
                    "virtlogd": hs.virtlogd_pid,
                    "agent": hs.agent_pid,
                },
                "health": health,
            }
        )
    secure = not insecure()
    doc = {
        "up": all_up,
        "agents": state.agents,
        "token": token,
        "tokenFile": str(TOKEN_FILE),
        # TLS: the lab CA that verifies the agents (https) and libvirtd; the operator's client certificate
        # (libvirt pkipath layout) that libvirtUri already names. Both null in an insecure lab.
        "transport": "tls" if secure else "insecure",
        "caFile": str(CA_FILE) if secure else None,
        "clientPki": str(OPERATOR_PKI) if secure else None,
        "hosts": hosts,
    }
    ceph_status = ceph.status(state.ceph)
    all_up &= all(ceph_status["health"].values())
    doc["up"] = all_up
    doc["ceph"] = ceph_status
    return all_up, doc
