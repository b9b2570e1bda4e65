"""The command line of DESIGN.md, as argparse; bad arguments exit 2 through argparse itself."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent import __version__
from agent.migration.request import Strategy, normalise_uuid
from agent.migration.states import TaskState

from . import commands, evacuate, pki


def _uuid(value: str) -> str:
    try:
        return normalise_uuid(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _whole_number(value: str, *, least: int, note: str = "") -> int:
    try:
        number = int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from err
    if number < least:
        raise argparse.ArgumentTypeError(f"{value} must be at least {least}{note}")
    return number


def _positive_int(value: str) -> int:
    return _whole_number(value, least=1)


def _bandwidth(value: str) -> int:
    """MiB/s; 0 means uncapped, as in libvirt and ``virsh``."""
    return _whole_number(value, least=0, note=" (0: uncapped)")


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from err
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value} must be more than 0")
    return number


def _agent_options(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """Options of every command that talks to an agent; defaults from the environment."""
    opts = argparse.ArgumentParser(add_help=False)
    group = opts.add_argument_group("agent connection")
    group.add_argument(
        "--agent",
        metavar="URL",
        default=env.get("KSA_AGENT_URL") or None,
        help="the agent's base URL, e.g. http://10.0.0.1:7070 (env KSA_AGENT_URL)",
    )
    token_file = env.get("KSA_TOKEN_FILE")
    group.add_argument(
        "--token-file",
        metavar="F",
        type=Path,
        default=Path(token_file) if token_file else None,
        help="file holding the agent's bearer token (env KSA_TOKEN_FILE)",
    )
    ca_file = env.get("KSA_CA_FILE")
    group.add_argument(
        "--ca-file",
        "--cacert",
        dest="cacert",
        metavar="F",
        type=Path,
        default=Path(ca_file) if ca_file else None,
        help="the cluster CA (or any CA bundle) to verify an https agent with (env KSA_CA_FILE)",
    )
    opts.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    return opts


def _follow_options() -> argparse.ArgumentParser:
    """Options of the commands that follow a task to its end (``migrate --wait``, ``watch``)."""
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument(
        "--no-events",
        action="store_true",
        help="poll the task instead of using its event stream (e.g. behind a buffering proxy)",
    )
    opts.add_argument("--poll-interval", type=_positive_float, default=1.0, help=argparse.SUPPRESS)
    return opts


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvm-storage-agent",
        description="Move running KVM virtual machines' storage: the agent service and its client.",
        epilog="exit codes: 0 done, 1 task failed/cancelled or refused, 2 usage/config, 3 agent unreachable",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the agent service")
    serve.add_argument("--config", required=True, type=Path, metavar="PATH", help="agent.toml")
    pki.add_parser(sub)

    agent = _agent_options(env)
    follow = _follow_options()

    migrate = sub.add_parser("migrate", parents=[agent, follow], help="move a VM's storage")
    migrate.set_defaults(handler=commands.migrate)
    migrate.add_argument("vm_uuid", metavar="VM_UUID", type=_uuid)
    migrate.add_argument(
        "--dst-storage",
        required=True,
        metavar="UUID",
        type=_uuid,
        help="destination primary storage uuid (as in the agent's config)",
    )
    dst = migrate.add_argument_group("another host (live migration with storage)")
    dst.add_argument("--dst-host-uuid", metavar="U", type=_uuid)
    dst.add_argument("--dst-agent", metavar="URL", help="the destination agent's URL")
    dst.add_argument("--dst-migration-address", metavar="ADDR", help="address QEMU migrates to")
    dst.add_argument("--dst-token-file", metavar="F", type=Path, help="the destination agent's token")
    migrate.add_argument("--with-data-volumes", action="store_true", help="move data volumes too")
    migrate.add_argument(
        "--with-snapshots",
        action="store_true",
        help="keep the backing chain as layers (default: one flattened image)",
    )
    migrate.add_argument(
        "--bandwidth",
        metavar="MIB_S",
        type=_bandwidth,
        help="MiB/s for the whole task, disks and memory together (0: uncapped, the default)",
    )
    migrate.add_argument("--downtime", metavar="MS", type=_positive_int, help="acceptable switchover pause")
    migrate.add_argument("--strategy", choices=[s.value for s in Strategy], default=Strategy.AUTO.value)
    migrate.add_argument("--allow-postcopy", action="store_true")
    migrate.add_argument(
        "--priority",
        metavar="N",
        type=_positive_int,
        help="1-100, higher first when tasks wait for a slot on the host (default 10)",
    )
    migrate.add_argument(
        "--timeout", metavar="S", type=_positive_float, help="give the task up after S seconds"
    )
    migrate.add_argument(
        "--task-uuid", metavar="U", type=_uuid, help="idempotency: the same uuid twice gives the same task"
    )
    migrate.add_argument("--wait", action="store_true", help="show progress until the end; exit 0 on success")

    tasks = sub.add_parser("tasks", parents=[agent], help="list tasks")
    tasks.set_defaults(handler=commands.tasks)
    tasks.add_argument(
        "--state",
        metavar="STATE",
        type=str.upper,
        choices=[s.value for s in TaskState],
        help="only tasks in STATE",
    )
    tasks.add_argument("--vm", metavar="VM_UUID", type=_uuid, help="only the tasks of one VM")

    for name, handler, helptext, extra in (
        ("show", commands.show, "one task's state, progress and result", []),
        ("watch", commands.watch, "follow a task to its end; exit 0 on success", [follow]),
        ("cancel", commands.cancel, "cancel a task (the VM keeps its source volumes)", []),
        ("retune", commands.retune, "change a running task's bandwidth or downtime", []),
    ):
        cmd = sub.add_parser(name, parents=[agent, *extra], help=helptext)
        cmd.set_defaults(handler=handler)
        cmd.add_argument("task_uuid", metavar="TASK", type=_uuid)
        if name == "retune":
            cmd.add_argument(
                "--bandwidth", metavar="MIB_S", type=_bandwidth, help="MiB/s from now on (0: uncapped)"
            )
            cmd.add_argument("--downtime", metavar="MS", type=_positive_int)

    _add_evacuation(sub, agent, follow)

    vms = sub.add_parser("vms", parents=[agent], help="list the host's VMs")
    vms.set_defaults(handler=commands.vms)
    vm = sub.add_parser("vm", parents=[agent], help="one VM's disks and backing chains")
    vm.set_defaults(handler=commands.vm)
    vm.add_argument("vm_uuid", metavar="VM_UUID", type=_uuid)
    host = sub.add_parser("host", parents=[agent], help="the host's CPU, memory and storage roots")
    host.set_defaults(handler=commands.host)
    health = sub.add_parser("health", parents=[agent], help="is the agent up (no token needed)")
    health.set_defaults(handler=commands.health)
    return parser


def _add_evacuation(sub: Any, agent: argparse.ArgumentParser, follow: argparse.ArgumentParser) -> None:
    """``evacuate`` (many VMs off the agent's host as one operation) and ``evacuation show|watch|cancel``."""
    cmd = sub.add_parser(
        "evacuate",
        parents=[agent, follow],
        help="move many VMs off the agent's host as one operation (each VM a task of its own)",
    )
    cmd.set_defaults(handler=evacuate.evacuate)
    which = cmd.add_mutually_exclusive_group()
    which.add_argument("--vm", metavar="VM_UUID", type=_uuid, action="append", help="a VM to move (repeat)")
    which.add_argument("--all", action="store_true", help="every VM running (or paused) on the host")
    cmd.add_argument(
        "--body",
        metavar="FILE",
        type=Path,
        help="the whole request as JSON (several destinations, a destination per VM); options given too "
        "override its migrateVm, priority, strategy",
    )
    dst = cmd.add_argument_group("the destination (one; several: --body)")
    dst.add_argument("--dst-host-uuid", metavar="U", type=_uuid)
    dst.add_argument("--dst-agent", metavar="URL", help="the destination agent's URL")
    dst.add_argument("--dst-migration-address", metavar="ADDR", help="address QEMU migrates to")
    dst.add_argument("--dst-token-file", metavar="F", type=Path, help="the destination agent's token")
    dst.add_argument("--dst-storage", metavar="UUID", type=_uuid, help="the destination's storage root")
    dst.add_argument(
        "--dst-incoming",
        metavar="N",
        type=_positive_int,
        help="moves into the destination at once (its limits.incoming_migrations; default 2)",
    )
    cmd.add_argument(
        "--bandwidth", metavar="MIB_S", type=_bandwidth, help="each move's own cap (0: uncapped)"
    )
    cmd.add_argument("--downtime", metavar="MS", type=_positive_int, help="acceptable switchover pause")
    cmd.add_argument("--priority", metavar="N", type=_positive_int, help="1-100 (default 10)")
    cmd.add_argument("--strategy", choices=[s.value for s in Strategy])
    cmd.add_argument("--with-data-volumes", action="store_true")
    cmd.add_argument("--with-snapshots", action="store_true")
    cmd.add_argument("--allow-postcopy", action="store_true")
    cmd.add_argument("--evacuation-uuid", metavar="U", type=_uuid, help="idempotency")
    cmd.add_argument(
        "--wait", action="store_true", help="progress bars until the end; exit 0 when every VM moved"
    )

    one = sub.add_parser("evacuation", parents=[agent, follow], help="show, watch or cancel an evacuation")
    one.set_defaults(handler=evacuate.evacuation)
    one.add_argument("action", choices=["show", "watch", "cancel"])
    one.add_argument("evacuation_uuid", metavar="EVACUATION", type=_uuid)
    one.add_argument(
        "--rollback", action="store_true", help="cancel: the running moves are cancelled too and roll back"
    )
