"""``kvm-storage-agent serve``: load the config, set up logging, run the app until SIGTERM or SIGINT.

Stopping is graceful and bounded by ``shutdown_grace_s``: the listener closes, new requests get 503, event
streams end, handlers get half the grace to finish, and the task manager detaches from running migrations
within the other half (they go on in libvirt and are resumed from the journal at the next start).
"""

from __future__ import annotations

import faulthandler
import fcntl
import logging
import logging.config
import os
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from aiohttp import web

from agent.api.app import make_app
from agent.config import AgentConfig, ConfigError, load_config
from agent.security import server_context
from agent.systemd import Notifier

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """One stdout handler for everything (journald adds its own timestamps, we keep ours for files)."""
    if not isinstance(logging.getLevelName(level.upper()), int):
        raise ConfigError(f"log_level: unknown level {level!r}")
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"plain": {"format": LOG_FORMAT}},
            "handlers": {
                "stdout": {
                    "class": "logging.StreamHandler",
                    "formatter": "plain",
                    "stream": "ext://sys.stdout",
                }
            },
            "root": {"level": level.upper(), "handlers": ["stdout"]},
            "loggers": {"aiohttp.access": {"level": "WARNING"}},
        }
    )


def ssl_context(config: AgentConfig) -> ssl.SSLContext | None:
    """HTTPS with the host certificate; None (plain HTTP) only with ``insecure_transport``."""
    return server_context(config)


class StateDirInUse(Exception):
    """Another agent serves from the same state directory (its journal and incoming records)."""


def hold_state_dir(state_dir: Path) -> IO[str]:
    """An exclusive lock on ``state_dir/agent.lock`` for the life of the process. A second agent on the same
    state (a start that raced another, a unit started twice) would resume the same tasks beside the first
    before it failed to bind the port; it stops here instead, before anything runs."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle = open(state_dir / "agent.lock", "a+")  # noqa: SIM115 (held until the process ends)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise StateDirInUse(
            f"another kvm-storage-agent (pid {holder}) serves from {state_dir}: stop it first"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def run(
    config_path: str | os.PathLike[str], *, dialects: Sequence[Callable[[web.Application], None]] = ()
) -> None:
    """Serve until SIGTERM/SIGINT. Raises ``ConfigError`` (message names the key) for a bad config."""
    # A crash in a C extension (libvirt-python) otherwise leaves nothing in the journal but the exit code.
    faulthandler.enable()
    config = load_config(Path(config_path))
    setup_logging(config.log_level)
    lock = hold_state_dir(Path(config.state_dir))
    token = config.read_token()
    context = ssl_context(config)
    app = make_app(
        config,
        token=token,
        connect_libvirt=True,
        cluster_token=config.read_cluster_token(),
        dialects=dialects,
    )
    notifier = Notifier.from_environment()
    notifier.attach(app)  # under systemd: watchdog pings from the event loop, STOPPING=1 on shutdown
    if config.insecure_transport:
        log.warning(
            "insecure_transport = true: %s, libvirt peer URI %s, migration streams unencrypted; anyone on "
            "the network can read the VMs' memory and disks in transit and replay the token",
            "HTTPS without client certificates" if context is not None else "plain HTTP",
            config.peer_uri(),
        )
    log.info(
        "kvm-storage-agent starting on %s:%d over %s (host %s, %d storage roots, state in %s)",
        config.listen_address,
        config.port,
        "https" if context is not None else "plain http",
        config.host_uuid,
        len(config.storage),
        config.state_dir,
    )
    web.run_app(
        app,
        host=config.listen_address,
        port=config.port,
        ssl_context=context,
        shutdown_timeout=config.shutdown_grace_s / 2,
        print=notifier.listening,  # called once every site listens: READY=1 to systemd
        handle_signals=True,
    )
    log.info("kvm-storage-agent stopped")
    lock.close()
