"""libvirt's event loop in one daemon thread, and delivery of domain events into asyncio.

libvirt needs an event loop implementation registered before the first connection for keepalives and domain
events. ``libvirtaio`` ties it to one asyncio loop for the life of the process, which breaks as soon as a
second loop appears (every pytest-asyncio test has its own). The default implementation run in a thread has
no such tie: callbacks run in that thread and hop into the subscriber's loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import logging
import threading

import libvirt

log = logging.getLogger(__name__)

_lock = threading.Lock()
_started = False


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread (once per process)."""
    global _started
    with _lock:
        if _started:
            return
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run, name="libvirt-events", daemon=True)
        thread.start()
        _started = True


def _run() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError:
            log.exception("libvirt event loop iteration failed")
