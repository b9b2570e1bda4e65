"""A read-only look at one VM on another host's libvirtd: the hypervisor's own word on where a VM runs.

After a cross-host migration the source agent decides the task's verdict from where the VM runs. The
destination *agent* may be dead or cut off at that moment while the destination *libvirtd* answers (the
source libvirtd has just migrated peer-to-peer to it), so the source agent asks that libvirtd directly, with
the same URI the migration used. Each look opens a short-lived read-only connection on a small pool of its
own: a connect to an unreachable host can block a thread for minutes (TCP retries), and that must never
starve the shared libvirt pool of the engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import libvirt

from agent.virt.domxml import parse_disks
from agent.virt.events import ensure_event_loop
from agent.virt.states import DomainState

log = logging.getLogger(__name__)

#: How long one look may take before the peer counts as silent.
LOOK_TIMEOUT_S = 20.0

_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="libvirt-peer")


@dataclass(frozen=True)
class PeerDomain:
    """What a peer libvirtd says of one VM. ``state`` is ``undefined`` when it does not know the VM."""

    state: DomainState
    live_tops: dict[str, str]  # target -> top image of the running domain (empty unless active)
    persistent_tops: dict[str, str]  # target -> top image of the persistent definition (empty if none)

    @property
    def running(self) -> bool:
        return self.state == DomainState.RUNNING

    def runs_from(self, tops: dict[str, str]) -> bool:
        """Running, and every named disk's live and persistent top is the given path."""
        return self.running and all(
            self.live_tops.get(target) == path and self.persistent_tops.get(target, path) == path
            for target, path in tops.items()
        )


_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}


def _tops(xml: str) -> dict[str, str]:
    return {d.target: d.location for d in parse_disks(xml) if d.device == "disk" and d.location}


def _look(uri: str, vm_uuid: str) -> PeerDomain:
    ensure_event_loop()
    conn = libvirt.openReadOnly(uri)
    try:
        try:
            dom = conn.lookupByUUIDString(vm_uuid)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return PeerDomain(DomainState.UNDEFINED, {}, {})
            raise
        state = _STATES.get(dom.state()[0], DomainState.NOSTATE)
        live = _tops(dom.XMLDesc(0)) if dom.isActive() else {}
        persistent = _tops(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) if dom.isPersistent() else {}
        return PeerDomain(state, live, persistent)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


async def look_at_peer(uri: str, vm_uuid: str, *, timeout_s: float = LOOK_TIMEOUT_S) -> PeerDomain | None:
    """The peer libvirtd's view of the VM; None when it cannot be reached or did not answer in time."""
    future: asyncio.Future[PeerDomain] = asyncio.get_running_loop().run_in_executor(
        _pool, _look, uri, vm_uuid
    )
    try:
        async with asyncio.timeout(timeout_s):
            return await future
    except TimeoutError:
        log.warning("libvirtd at %s did not answer within %.0f s", uri, timeout_s)
    except libvirt.libvirtError as err:
        log.warning("cannot ask libvirtd at %s about VM %s: %s", uri, vm_uuid, err.get_error_message())
    return None


def describe(view: PeerDomain | None) -> str:
    """One word or two for logs and error details."""
    return "silent" if view is None else view.state
