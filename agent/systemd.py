"""systemd's notify protocol (``sd_notify``) with the standard library: READY, STOPPING, STATUS, watchdog.

Without ``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=`` other than notify) every call is a no-op.
The datagram goes to the socket named there: a path, or ``@name`` for the abstract namespace.

The watchdog pings are sent by a task on the event loop, so they prove what a restart can fix: that the loop
still runs handlers and timers. They deliberately do not depend on libvirt: the libvirt adapter reconnects
on its own when libvirtd comes back, and an agent killed while libvirtd restarts would fail its own start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

#: Pings per watchdog period (systemd suggests at least two; more leaves room for a busy host).
PINGS_PER_PERIOD = 4


class Notifier:
    """Sends notify messages to systemd; ``address`` None means "not under systemd" and nothing is sent."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract; not notifying systemd", address)
            address = None
        return cls(address, _watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; True when sent (False when disabled or it failed)."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), target)
        except OSError as err:
            log.warning("cannot notify systemd at %s: %s", self.address, err)
            return False
        return True

    def listening(self, *_args: Any, **_kwargs: Any) -> None:
        """``READY=1``; shaped like ``print`` because aiohttp's ``run_app`` calls its ``print`` argument
        once every site listens (aiohttp 3.x ``_run_app``)."""
        self.notify("READY=1", "STATUS=listening")
        log.info("listening; ready")

    async def _stopping(self, _app: web.Application) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    async def _watchdog_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        task = None
        if self.enabled and self.watchdog_usec:
            task = asyncio.create_task(self.watchdog(self.watchdog_usec / 1e6 / PINGS_PER_PERIOD))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def watchdog(self, interval_s: float) -> None:
        """``WATCHDOG=1`` every ``interval_s`` for as long as the event loop runs this task."""
        log.info("systemd watchdog: pinging every %.1f s", interval_s)
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    def attach(self, app: web.Application) -> None:
        """Watchdog pings for the app's whole life (first cleanup context: running during startup and
        until the last resource closed) and ``STOPPING=1`` as the first shutdown step."""
        app.cleanup_ctx.insert(0, self._watchdog_ctx)
        app.on_shutdown.insert(0, self._stopping)


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """``$WATCHDOG_USEC`` when it is meant for this process (``$WATCHDOG_PID`` unset or ours)."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None
