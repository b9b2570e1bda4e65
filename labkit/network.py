"""The lab network: bridge ksabr0 (10.213.0.1/24) in the root namespace, one veth per host into its netns.

Hosts get no default route: from inside the lab only 10.213.0.0/24 and loopback are reachable.
"""

from __future__ import annotations

import os

from .layout import BRIDGE, BRIDGE_ADDRESS, PREFIX_LEN, HostSpec
from .sysutil import run


def link_exists(name: str, netns: str | None = None) -> bool:
    argv = ["ip"] + (["-n", netns] if netns else []) + ["link", "show", "dev", name]
    return run(argv, check=False).returncode == 0


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def netns_file_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def ensure_bridge() -> None:
    if not link_exists(BRIDGE):
        # STP off and no forward delay: a port forwards the moment it is up.
        run(["ip", "link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0"])
    run(["ip", "addr", "replace", f"{BRIDGE_ADDRESS}/{PREFIX_LEN}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


def ensure_host_network(host: HostSpec) -> None:
    """Netns with lo up, veth pair (root end on the bridge, `eth0` inside), the host's address; links up."""
    if not netns_exists(host.netns):
        run(["ip", "netns", "add", host.netns])
    run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
    if not link_exists(host.veth):
        if link_exists("eth0", host.netns):
            run(["ip", "-n", host.netns, "link", "del", "eth0"])
        run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns])
    run(["ip", "link", "set", host.veth, "master", BRIDGE, "up"])
    run(["ip", "-n", host.netns, "addr", "replace", f"{host.address}/{PREFIX_LEN}", "dev", "eth0"])
    run(["ip", "-n", host.netns, "link", "set", "eth0", "up"])


def set_link(host: HostSpec, up: bool) -> None:
    """Cut or restore the host's wire (the root end of its veth): both directions stop at once."""
    run(["ip", "link", "set", host.veth, "up" if up else "down"])


def link_is_up(host: HostSpec) -> bool:
    proc = run(["ip", "-o", "link", "show", "dev", host.veth], check=False)
    if proc.returncode != 0 or "<" not in proc.stdout:
        return False
    flags = proc.stdout.split("<", 1)[1].split(">", 1)[0].split(",")
    return "UP" in flags


def remove_host_network(host: HostSpec) -> None:
    if link_exists(host.veth):
        run(["ip", "link", "del", host.veth], check=False)
    if netns_exists(host.netns):
        run(["ip", "netns", "del", host.netns], check=False)


def remove_bridge() -> None:
    if link_exists(BRIDGE):
        run(["ip", "link", "del", BRIDGE], check=False)
