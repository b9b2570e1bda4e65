"""`scripts/lab`: the command line over labkit. Progress goes to stderr, results to stdout."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator

from . import agentctl, hostsetup, lab, network
from .layout import HOSTS, HostSpec, host_by_name
from .state import HostState, LabState, lab_lock
from .sysutil import LabError, kill_pids, log


def _cmd_up(args: argparse.Namespace) -> int:
    lab.up(with_agents=not args.no_agent, restart_agents=args.restart_agents, insecure_lab=args.insecure)
    ok, doc = lab.status()
    for host in doc["hosts"]:
        agent = "agent up" if host["health"]["agent"] else "no agent"
        log(f"{host['name']}: {host['address']} {host['libvirtUri']} ({agent})")
    if doc["caFile"]:
        log(f"transport: TLS (lab CA {doc['caFile']}; agents on https)")
    else:
        log("WARNING: transport: INSECURE (scripts/lab up --insecure): plain TCP and HTTP")
    return 0 if ok else 1


def _cmd_down(args: argparse.Namespace) -> int:
    lab.down()
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    ok, doc = lab.status()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"lab {'up' if ok else 'NOT up'}; agents {'on' if doc['agents'] else 'off'}")
        for host in doc["hosts"]:
            health = " ".join(f"{k}={'ok' if v else 'NO'}" for k, v in host["health"].items())
            print(f"{host['name']} {host['uuid']} {host['address']} {health}")
            for root in host["storage"]:
                print(f"    {root['name']:6} {root['uuid']} {root['path']}")
    return 0 if ok else 1


def _loaded_state() -> LabState:
    state = LabState.load()
    if state is None:
        raise LabError("the lab is not up: run scripts/lab up")
    return state


@contextlib.contextmanager
def _one_host(name: str) -> Iterator[tuple[HostSpec, LabState, HostState]]:
    """The lab state of host ``name`` under the lab lock, saved afterwards whatever happened."""
    lab.require_root()
    host = host_by_name(name)
    with lab_lock():
        state = _loaded_state()
        try:
            yield host, state, state.hosts[host.name]
        finally:
            state.save()


def _cmd_agent(args: argparse.Namespace) -> int:
    with _one_host(args.host) as (host, state, hs):
        if args.action in ("stop", "restart"):
            agentctl.stop(host, hs)
        elif args.action == "kill":
            agentctl.stop(host, hs, hard=True)
        if args.action in ("start", "restart"):
            agentctl.start(host, hs, state.ceph)
            state.agents = True
    return 0


def _cmd_libvirtd(args: argparse.Namespace) -> int:
    """Restart one host's libvirtd and nothing else (its guests' QEMU, its agent, the other host and Ceph
    stay as they are): the fault tests' libvirtd restart. Unlike ``up`` it never rebuilds a host."""
    with _one_host(args.host) as (host, _, hs):
        if hs.libvirtd_pid is not None and hostsetup.libvirtd_ok(hs):  # its own, not a reused pid
            kill_pids([hs.libvirtd_pid], grace=30)  # SIGTERM: QEMU goes on without it
        hostsetup.ensure_daemons(host, hs, restart_libvirtd=False)
        hostsetup.wait_libvirtd(host, hs)
    log(f"{host.name}: libvirtd restarted (pid {hs.libvirtd_pid})")
    return 0


def _cmd_link(args: argparse.Namespace) -> int:
    lab.require_root()
    host = host_by_name(args.host)
    network.set_link(host, args.state == "up")
    log(f"{host.name}: link {args.state}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/lab", description="The two-hypervisor lab (hostA, hostB).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="create or repair the lab (idempotent)")
    p.add_argument("--no-agent", action="store_true", help="do not start the agents (also LAB_NO_AGENT=1)")
    p.add_argument("--restart-agents", action="store_true", help="restart running agents (new agent code)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS: libvirtd on plain TCP without authentication, agents on http, migration streams in "
        "clear text (the lab is secure by default; `up` without this switches it back)",
    )
    p.set_defaults(func=_cmd_up)
    sub.add_parser("down", help="remove everything the lab made").set_defaults(func=_cmd_down)
    p = sub.add_parser("status", help="describe the lab; exit 1 if it is not up")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    hosts = [h.name for h in HOSTS]
    p = sub.add_parser("agent", help="start, stop, kill (SIGKILL) or restart a host's agent")
    p.add_argument("action", choices=("start", "stop", "kill", "restart"))
    p.add_argument("host", choices=hosts)
    p.set_defaults(func=_cmd_agent)
    p = sub.add_parser("libvirtd", help="restart a host's libvirtd (only it: guests and agent stay)")
    p.add_argument("action", choices=("restart",))
    p.add_argument("host", choices=hosts)
    p.set_defaults(func=_cmd_libvirtd)
    p = sub.add_parser("link", help="cut or restore a host's network link")
    p.add_argument("state", choices=("down", "up"))
    p.add_argument("host", choices=hosts)
    p.set_defaults(func=_cmd_link)

    from .guestcli import add_guest_commands

    add_guest_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LabError as err:
        print(f"lab: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): not an error of the lab
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
