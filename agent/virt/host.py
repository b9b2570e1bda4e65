"""The narrow libvirt adapter the engines use: blocking calls run in a small thread pool, never on the loop.

Only what the engines need is exposed. Every libvirt failure is raised as ``VirtError`` (or ``NotFound``
for an unknown domain) with the original error as its cause. Domain events (block jobs, migration job
completion, lifecycle) are delivered to asyncio queues subscribed per domain uuid.

The connection is reopened on demand when libvirtd went away (restart), and event callbacks are registered
again on the new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import libvirt

from agent.errors import Code, NotFound, VirtError
from agent.virt.domxml import mirror_targets, parse_disks
from agent.virt.events import ensure_event_loop
from agent.virt.states import DomainState

log = logging.getLogger(__name__)

#: ``VirtError.code`` when libvirtd cannot be reached (stopped, restarting): the one libvirt failure worth
#: waiting out, since QEMU and its block jobs keep running without it.
UNREACHABLE = Code.LIBVIRT_UNREACHABLE

#: How long a move waits for this host's libvirtd to come back (a restart takes a few seconds; QEMU keeps
#: its block jobs and migration meanwhile, and libvirt 9.0 takes them back when it reconnects). Past this
#: the move ends as its engine says.
LIBVIRT_OUTAGE_S = 120.0

T = TypeVar("T")

_DOMAIN_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}


@dataclass(frozen=True)
class DomainEvent:
    """One libvirt domain event, flattened: ``kind`` is ``block-job``, ``job-completed`` or ``lifecycle``."""

    kind: str
    vm_uuid: str
    disk: str | None = None
    job_type: int | None = None
    status: int | None = None
    detail: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BlockJob:
    """A block job's counters; for a mirror ``cur``/``end`` advance and ``end`` grows with guest writes."""

    type: int
    cur: int
    end: int
    bandwidth: int  # bytes/s, 0 = unlimited


@dataclass(frozen=True)
class MigrateParams:
    """What ``migrateToURI3`` is told besides its flags, typed until the call (``to_libvirt``)."""

    migration_uri: str  # where QEMU's stream goes (tcp://address on the destination)
    disks: tuple[str, ...]  # targets whose storage moves with the migration
    dest_xml: str  # the running domain as the destination starts it (new disk sources)
    persist_xml: str  # the persistent definition the destination keeps
    bandwidth_mib: int | None = None  # MiB/s at the start, per stream (None: libvirt's own)
    auto_converge_initial: int | None = None  # percent
    auto_converge_increment: int | None = None  # percent

    def to_libvirt(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            libvirt.VIR_MIGRATE_PARAM_URI: self.migration_uri,
            libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: list(self.disks),
            libvirt.VIR_MIGRATE_PARAM_DEST_XML: self.dest_xml,
            libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: self.persist_xml,
        }
        if self.bandwidth_mib is not None:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = self.bandwidth_mib
        if self.auto_converge_initial is not None:
            params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = self.auto_converge_initial
        if self.auto_converge_increment is not None:
            params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = self.auto_converge_increment
        return params


def _domain_state(dom: Any) -> DomainState:
    state, _reason = dom.state()
    return _DOMAIN_STATES.get(state, DomainState.UNKNOWN)


class VirtHost:
    """One libvirt connection (reopened on demand) plus event subscriptions per domain."""

    def __init__(self, uri: str, *, workers: int = 8) -> None:
        self.uri = uri
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="libvirt")
        self._conn: Any = None
        self._conn_lock = threading.Lock()
        self._callback_ids: list[int] = []
        self._subscribers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[DomainEvent]]]] = {}
        self._sub_lock = threading.Lock()

    @classmethod
    async def open(cls, uri: str) -> VirtHost:
        """Connect now if libvirtd answers; if it does not (yet), the agent still starts and every call
        tries again, so a libvirtd restarted after the agent is picked up without restarting the agent."""
        host = cls(uri)
        try:
            await host.call(lambda conn: conn.getHostname())
        except VirtError as err:
            log.warning("%s; calls will retry (%s)", err.description, err.details)
        return host

    async def close(self) -> None:
        def _close() -> None:
            with self._conn_lock:
                conn, self._conn = self._conn, None
                if conn is None:
                    return
                for cid in self._callback_ids:
                    with contextlib.suppress(libvirt.libvirtError):
                        conn.domainEventDeregisterAny(cid)
                self._callback_ids.clear()
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()

        await asyncio.get_running_loop().run_in_executor(self._executor, _close)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- connection -------------------------------------------------------------------------------------

    def _connection(self) -> Any:
        with self._conn_lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                log.warning("libvirt connection to %s lost; reconnecting", self.uri)
                self._conn = None
                self._callback_ids.clear()
            ensure_event_loop()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as err:
                raise VirtError(
                    f"cannot connect to libvirt at {self.uri}",
                    details="check that libvirtd is running and the URI in the config is right",
                    code=UNREACHABLE,
                ) from err
            try:
                conn.setKeepAlive(5, 3)
            except libvirt.libvirtError:
                log.debug("keepalive not supported on %s", self.uri)
            self._register_events(conn)
            self._conn = conn
            return conn

    def _register_events(self, conn: Any) -> None:
        self._callback_ids = [
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job, None
            ),
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed, None
            ),
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            ),
        ]

    async def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(conn)`` in the libvirt thread pool; libvirt errors become ``VirtError``."""

        def _run() -> T:
            conn = self._connection()
            try:
                return fn(conn)
            except libvirt.libvirtError as err:
                # libvirtd went away under the call (restart): say so, callers may wait for it to return.
                if not _alive(conn):
                    raise VirtError(
                        f"libvirt at {self.uri} went away: {err.get_error_message()}", code=UNREACHABLE
                    ) from err
                raise

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, _run)
        except libvirt.libvirtError as err:
            raise VirtError(f"libvirt: {err.get_error_message()}", code=_code_for(err)) from err

    async def wait_reachable(self, within_s: float = LIBVIRT_OUTAGE_S, *, every_s: float = 1.0) -> bool:
        """Wait up to ``within_s`` for libvirtd to answer again (a restart takes a few seconds); events are
        registered again on the new connection. True once it answers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            try:
                await self.ensure_connected()
                return True
            except VirtError as err:
                if err.code != UNREACHABLE or loop.time() >= deadline:
                    return False
            await asyncio.sleep(every_s)

    async def call_domain(self, vm_uuid: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(domain)`` for the domain with this uuid; an unknown uuid is ``NotFound``."""

        def _run(conn: Any) -> T:
            try:
                dom = conn.lookupByUUIDString(vm_uuid)
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    raise NotFound(f"VM {vm_uuid} is not defined on this host", field="vmUuid") from err
                raise
            return fn(dom)

        return await self.call(_run)

    # -- queries ----------------------------------------------------------------------------------------

    async def hostname(self) -> str:
        return await self.call(lambda conn: str(conn.getHostname()))

    async def versions(self) -> dict[str, str]:
        def _versions(conn: Any) -> dict[str, str]:
            return {"libvirt": _version(conn.getLibVersion()), "qemu": _version(conn.getVersion())}

        return await self.call(_versions)

    async def list_domains(self) -> list[dict[str, Any]]:
        def _list(conn: Any) -> list[dict[str, Any]]:
            out = []
            for dom in conn.listAllDomains(0):
                out.append(
                    {
                        "uuid": dom.UUIDString(),
                        "name": dom.name(),
                        "state": _domain_state(dom),
                        "persistent": bool(dom.isPersistent()),
                    }
                )
            return out

        return await self.call(_list)

    async def used_locations(self) -> set[str]:
        """Where every disk of every domain of this host is (active and defined XML): file and device
        paths, ``rbd:pool/image`` locations."""

        def _used(conn: Any) -> set[str]:
            found: set[str] = set()
            for dom in conn.listAllDomains(0):
                flags = [0, libvirt.VIR_DOMAIN_XML_INACTIVE] if dom.isActive() else [0]
                for flag in flags:
                    try:
                        xml = dom.XMLDesc(flag)
                    except libvirt.libvirtError:
                        continue  # gone meanwhile
                    for disk in parse_disks(xml):
                        found.update(p for p in (disk.location, *(b for b, _f in disk.backing)) if p)
                    found.update(mirror_targets(xml))  # a block copy's destination, while it runs
            return found

        return await self.call(_used)

    async def domain_state(self, vm_uuid: str) -> DomainState:
        return await self.call_domain(vm_uuid, _domain_state)

    async def domain_name(self, vm_uuid: str) -> str:
        return await self.call_domain(vm_uuid, lambda dom: str(dom.name()))

    async def memory_bytes(self, vm_uuid: str) -> int:
        """The guest's current memory (what a live migration has to move at least once)."""
        return await self.call_domain(vm_uuid, lambda dom: int(dom.info()[2]) * 1024)

    async def is_persistent(self, vm_uuid: str) -> bool:
        return await self.call_domain(vm_uuid, lambda dom: bool(dom.isPersistent()))

    async def live_xml(self, vm_uuid: str) -> str:
        return await self.call_domain(vm_uuid, lambda dom: str(dom.XMLDesc(0)))

    async def inactive_xml(self, vm_uuid: str) -> str:
        return await self.call_domain(vm_uuid, lambda dom: str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))

    async def define_xml(self, xml: str) -> None:
        await self.call(lambda conn: conn.defineXML(xml))

    async def undefine(self, vm_uuid: str) -> None:
        await self.call_domain(vm_uuid, lambda dom: dom.undefine())

    async def block_job(self, vm_uuid: str, disk: str) -> BlockJob | None:
        def _info(dom: Any) -> BlockJob | None:
            info = dom.blockJobInfo(disk, libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
            if not info:
                return None
            return BlockJob(
                type=int(info["type"]),
                cur=int(info["cur"]),
                end=int(info["end"]),
                bandwidth=int(info.get("bandwidth", 0)),
            )

        return await self.call_domain(vm_uuid, _info)

    # -- block copy -------------------------------------------------------------------------------------

    async def block_copy(
        self, vm_uuid: str, disk: str, dest_xml: str, *, bandwidth: int | None, flags: int
    ) -> None:
        params: dict[str, Any] = {}
        if bandwidth:
            params[libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH] = int(bandwidth)
        await self.call_domain(vm_uuid, lambda dom: dom.blockCopy(disk, dest_xml, params, flags))

    async def block_capacity(self, vm_uuid: str, disk: str) -> int:
        """The bytes the guest sees of ``disk`` (libvirt's block info; for a network disk, QEMU's)."""
        return int(await self.call_domain(vm_uuid, lambda dom: dom.blockInfo(disk)[0]))

    async def block_writes(self, vm_uuid: str, disks: Sequence[str]) -> dict[str, int]:
        """Bytes the guest wrote to each disk since the VM started (virDomainBlockStats ``wr_bytes``)."""
        return await self.call_domain(vm_uuid, lambda dom: {d: int(dom.blockStats(d)[3]) for d in disks})

    async def all_block_writes(self) -> dict[str, dict[str, int]]:
        """Bytes the guest wrote to each disk, for every running VM at once (virConnectGetAllDomainStats,
        block group); a VM busy with another job at that moment is left out (``NOWAIT``) rather than waited
        for."""
        flags = (
            libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
            | libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
        )
        return await self.call(
            lambda conn: {
                dom.UUIDString(): _written(stats)
                for dom, stats in conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_BLOCK, flags)
            }
        )

    async def set_block_job_speed(self, vm_uuid: str, disk: str, bytes_per_s: int) -> None:
        await self.call_domain(
            vm_uuid,
            lambda dom: dom.blockJobSetSpeed(
                disk, max(0, int(bytes_per_s)), libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES
            ),
        )

    async def abort_block_job(self, vm_uuid: str, disk: str, *, pivot: bool = False) -> None:
        flags = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT if pivot else 0
        await self.call_domain(vm_uuid, lambda dom: dom.blockJobAbort(disk, flags))

    async def abort_block_job_and_wait(self, vm_uuid: str, disk: str, *, within_s: float = 10.0) -> bool:
        """Abort the disk's block job without pivot and wait until QEMU has ended it (the abort completes
        asynchronously). True once no job is left on the disk, False if one still runs after ``within_s``."""
        await self.abort_block_job(vm_uuid, disk)
        deadline = asyncio.get_running_loop().time() + within_s
        while await self.block_job(vm_uuid, disk) is not None:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    # -- live migration ---------------------------------------------------------------------------------

    async def migrate(self, vm_uuid: str, dest_uri: str, params: MigrateParams, flags: int) -> None:
        """virDomainMigrateToURI3, peer-to-peer: the source libvirtd drives it, not this connection.

        It blocks for the whole migration, so it runs on its own thread, not in the shared pool.
        """

        def _migrate() -> None:
            # A connection of its own: while migrateToURI3 blocks, its thread is the one reading the
            # connection's replies, and every other call on a shared connection waited for its wake-ups, the
            # keepalive's 5 s (measured in the lab: steering calls took 5 s each during a migration, 0.01 s
            # on another connection).
            ensure_event_loop()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as err:
                raise VirtError(
                    f"cannot connect to libvirt at {self.uri}: {err.get_error_message()}", code=UNREACHABLE
                ) from err
            try:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.setKeepAlive(5, 3)
                dom = conn.lookupByUUIDString(vm_uuid)
                dom.migrateToURI3(dest_uri, params.to_libvirt(), flags)
            except libvirt.libvirtError as err:
                raise VirtError(f"libvirt: {err.get_error_message()}", code=_code_for(err)) from err
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()

        await asyncio.to_thread(_migrate)

    async def job_stats(self, vm_uuid: str, *, completed: bool = False) -> dict[str, Any]:
        flags = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED if completed else 0
        return await self.call_domain(vm_uuid, lambda dom: dict(dom.jobStats(flags)))

    async def abort_job(self, vm_uuid: str) -> None:
        await self.call_domain(vm_uuid, lambda dom: dom.abortJob())

    async def set_max_downtime(self, vm_uuid: str, ms: int) -> None:
        await self.call_domain(vm_uuid, lambda dom: dom.migrateSetMaxDowntime(int(ms), 0))

    async def max_downtime(self, vm_uuid: str) -> int:
        """The downtime (ms) the running migration is allowed now, as QEMU has it."""
        return int(await self.call_domain(vm_uuid, lambda dom: dom.migrateGetMaxDowntime(0)))

    async def set_migration_speed(self, vm_uuid: str, mib_per_s: int) -> None:
        await self.call_domain(vm_uuid, lambda dom: dom.migrateSetMaxSpeed(max(1, int(mib_per_s)), 0))

    async def start_postcopy(self, vm_uuid: str) -> None:
        await self.call_domain(vm_uuid, lambda dom: dom.migrateStartPostCopy(0))

    async def qmp(self, vm_uuid: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """A raw QMP command through libvirt (read-only queries and job speed only).

        libvirt hides the NBD mirror jobs of a migration and refuses blockJobSetSpeed while the migration
        job holds the domain; QMP via libvirt-qemu is the one way to steer them (it marks the domain
        tainted, "custom-monitor", which is harmless for a running guest).
        """
        import libvirt_qemu

        payload = json.dumps({"execute": command, "arguments": arguments or {}})
        reply = await self.call_domain(vm_uuid, lambda dom: libvirt_qemu.qemuMonitorCommand(dom, payload, 0))
        return json.loads(reply).get("return")

    # -- events -----------------------------------------------------------------------------------------

    def subscribe(self, vm_uuid: str) -> asyncio.Queue[DomainEvent]:
        """Events for one domain, delivered into the caller's loop until ``unsubscribe``."""
        queue: asyncio.Queue[DomainEvent] = asyncio.Queue()
        with self._sub_lock:
            self._subscribers.setdefault(vm_uuid, []).append((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, vm_uuid: str, queue: asyncio.Queue[DomainEvent]) -> None:
        with self._sub_lock:
            subs = self._subscribers.get(vm_uuid, [])
            self._subscribers[vm_uuid] = [(lp, q) for lp, q in subs if q is not queue]
            if not self._subscribers[vm_uuid]:
                del self._subscribers[vm_uuid]

    async def ensure_connected(self) -> None:
        """Make sure the connection (and so the event registration) is up before waiting for events."""
        await self.call(lambda conn: None)

    def _publish(self, event: DomainEvent) -> None:
        with self._sub_lock:
            subs = list(self._subscribers.get(event.vm_uuid, []))
        for loop, queue in subs:
            with contextlib.suppress(RuntimeError):  # that loop is closed; its subscriber is gone
                loop.call_soon_threadsafe(queue.put_nowait, event)

    def _on_block_job(self, _conn: Any, dom: Any, disk: str, job_type: int, status: int, _o: Any) -> None:
        self._publish(DomainEvent("block-job", dom.UUIDString(), disk=disk, job_type=job_type, status=status))

    def _on_job_completed(self, _conn: Any, dom: Any, stats: dict[str, Any], _o: Any) -> None:
        self._publish(DomainEvent("job-completed", dom.UUIDString(), stats=dict(stats)))

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _o: Any) -> None:
        self._publish(DomainEvent("lifecycle", dom.UUIDString(), status=event, detail=detail))


def _written(stats: dict[str, Any]) -> dict[str, int]:
    """``{target: bytes written}`` from one domain's block statistics (``block.<i>.name``,
    ``block.<i>.wr.bytes``)."""
    out: dict[str, int] = {}
    for i in range(int(stats.get("block.count", 0))):
        name, written = stats.get(f"block.{i}.name"), stats.get(f"block.{i}.wr.bytes")
        if name is not None and written is not None:
            out[str(name)] = int(written)
    return out


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _code_for(err: Any) -> Code:
    code = err.get_error_code()
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return Code.LIBVIRT_OPERATION_INVALID
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return Code.VM_NOT_FOUND
    return Code.LIBVIRT_ERROR


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"
