"""``kvm-storage-agent``: parse, run one command, turn its outcome into an exit code (see ``exits``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.client import AgentClient, ClientError
from agent.config import ConfigError, read_secret

from . import pki, render
from .exits import Exit, UsageError, exit_for_error
from .output import Output
from .parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(os.environ).parse_args(argv)
    if args.command == "serve":
        return serve(args.config)
    if args.command == "pki":
        return pki.run(args)
    out = Output(sys.stdout, sys.stderr, json_mode=args.json)
    try:
        return asyncio.run(_run(args, out))
    except UsageError as err:
        out.error(str(err))
        return Exit.USAGE
    except ClientError as err:
        _report(out, err)
        return exit_for_error(err)
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C (``_bound_interrupts``)
        return Exit.INTERRUPTED


def serve(config: Path) -> int:
    """Run the service; a bad config is one line naming the key and exit 2, not a traceback."""
    # Imported here: the client commands must work where the server's dependencies (libvirt) are missing.
    try:
        from agent.api import server
        from agent.zstack import mount
    except ImportError as err:  # e.g. libvirt-python missing on this machine: say so in one line
        print(f"kvm-storage-agent: cannot load the server: {err}", file=sys.stderr)
        return Exit.FAILED
    try:
        server.run(config, dialects=(mount,))
    except ConfigError as err:
        message = " ".join(str(err).split())
        print(f"kvm-storage-agent: config error: {message}", file=sys.stderr)
        return Exit.USAGE
    except server.StateDirInUse as err:
        print(f"kvm-storage-agent: {err}", file=sys.stderr)
        return Exit.FAILED
    return Exit.OK


#: How long a command has, after Ctrl-C, to wind down through its cancel before the CLI exits anyway.
INTERRUPT_GRACE_S = 3.0


async def _run(args: argparse.Namespace, out: Output) -> int:
    _bound_interrupts(out)
    async with _client(args) as client:
        code: int = await args.handler(client, args, out)
        return code


def _bound_interrupts(out: Output) -> None:
    """Ctrl-C cancels the command, as ``asyncio.run`` would; if it has not ended ``INTERRUPT_GRACE_S`` later
    (a cancel that some await never passed on: a watcher once stayed for minutes on an idle event stream),
    or at a second Ctrl-C, the CLI says what goes on without it and exits 130 at once. A watch must never
    outlive the operator's Ctrl-C; nothing is left half-done by leaving (no command writes after it)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is None:
        return
    pressed = 0

    def leave() -> None:
        out.interrupted()
        os._exit(Exit.INTERRUPTED)

    def on_sigint() -> None:
        nonlocal pressed
        pressed += 1
        if pressed > 1 or task.done():
            leave()
            return
        task.cancel()
        loop.call_later(INTERRUPT_GRACE_S, leave)

    # Not in the main thread (an embedding caller): asyncio's own handling stays.
    with contextlib.suppress(RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)


def _client(args: argparse.Namespace) -> AgentClient:
    if not args.agent:
        raise UsageError("--agent URL (or KSA_AGENT_URL) is required")
    token = None
    if args.token_file is not None:
        try:
            token = read_secret(args.token_file, "--token-file")
        except ConfigError as err:
            raise UsageError(str(err)) from err
    context = None
    if args.cacert is not None:
        try:
            context = ssl.create_default_context(cafile=str(args.cacert))
        except (OSError, ssl.SSLError) as err:
            raise UsageError(f"--cacert: cannot load {args.cacert}: {err}") from err
    try:
        return AgentClient(args.agent, token, ssl_context=context)
    except ValueError as err:
        raise UsageError(f"--agent: {err}") from err


def _report(out: Output, err: ClientError) -> None:
    """The agent's ErrorCode for people on stderr; with ``--json`` also as JSON on stdout."""
    if out.json_mode:
        out.json({"error": err.error, "httpStatus": err.status})
    status = f" (HTTP {err.status})" if err.status is not None else ""
    lines = render.error_lines(err.error)
    out.error(lines[0].removeprefix("error").strip() + status)
    for line in lines[1:]:
        out.note(line)
    if err.status == 401:
        out.note("hint: pass the agent's token with --token-file F (or KSA_TOKEN_FILE)")
    if "CERTIFICATE_VERIFY_FAILED" in str((err.error or {}).get("description", "")):
        out.note("hint: pass the cluster CA with --ca-file F (or KSA_CA_FILE), e.g. /etc/pki/CA/cacert.pem")
