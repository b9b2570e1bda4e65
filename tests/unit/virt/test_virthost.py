"""The libvirt adapter's own logic, against a fake connection: the flags, parameters and units it hands to
libvirt, how libvirt failures become ``VirtError``/``NotFound``, reconnection, and event delivery. No
libvirtd is involved: ``VirtHost`` is given a connection (or ``libvirt.open`` is replaced)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import libvirt
import pytest

from agent.errors import NotFound, VirtError
from agent.virt import host as host_module
from agent.virt.host import UNREACHABLE, BlockJob, DomainEvent, MigrateParams, VirtHost

VM = "11111111-2222-4333-8444-555555555501"
OTHER_VM = "11111111-2222-4333-8444-555555555502"


def libvirt_error(code: int, message: str = "it failed") -> libvirt.libvirtError:
    err = libvirt.libvirtError(message)
    err.err = (code, 0, message, 2, None, None, None, 0, 0)
    return err


class FakeDomain:
    """Records every call as (method, args); answers what the adapter reads."""

    def __init__(self, uuid: str = VM, *, fail: libvirt.libvirtError | None = None) -> None:
        self.uuid = uuid
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.job_info: dict[str, int] = {}
        self.fail = fail
        self.state_code = libvirt.VIR_DOMAIN_RUNNING

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if self.fail is not None:
            raise self.fail

    def UUIDString(self) -> str:
        return self.uuid

    def name(self) -> str:
        return "vm1"

    def isPersistent(self) -> int:
        return 1

    def state(self) -> tuple[int, int]:
        return self.state_code, 0

    def info(self) -> list[int]:
        return [self.state_code, 524288, 262144, 1, 0]  # memory in KiB

    def XMLDesc(self, flags: int) -> str:
        self._record("XMLDesc", flags)
        return f"<domain flags='{flags}'/>"

    def blockCopy(self, disk: str, xml: str, params: dict[str, Any], flags: int) -> None:
        self._record("blockCopy", disk, xml, params, flags)

    def blockJobInfo(self, disk: str, flags: int) -> dict[str, int]:
        self._record("blockJobInfo", disk, flags)
        return self.job_info

    def blockJobSetSpeed(self, disk: str, bandwidth: int, flags: int) -> None:
        self._record("blockJobSetSpeed", disk, bandwidth, flags)

    def blockJobAbort(self, disk: str, flags: int) -> None:
        self._record("blockJobAbort", disk, flags)

    def blockStats(self, disk: str) -> tuple[int, int, int, int, int]:
        return (1, 2, 3, {"vda": 4096, "vdb": 8192}[disk], 0)

    def jobStats(self, flags: int) -> dict[str, int]:
        self._record("jobStats", flags)
        return {"type": 2, "memory_processed": 10}

    def abortJob(self) -> None:
        self._record("abortJob")

    def migrateSetMaxDowntime(self, ms: int, flags: int) -> None:
        self._record("migrateSetMaxDowntime", ms, flags)

    def migrateSetMaxSpeed(self, mib: int, flags: int) -> None:
        self._record("migrateSetMaxSpeed", mib, flags)

    def migrateStartPostCopy(self, flags: int) -> None:
        self._record("migrateStartPostCopy", flags)

    def migrateToURI3(self, uri: str, params: dict[str, Any], flags: int) -> None:
        self._record("migrateToURI3", uri, params, flags)

    def undefine(self) -> None:
        self._record("undefine")


class FakeConnection:
    def __init__(self, *domains: FakeDomain) -> None:
        self.domains = {d.uuid: d for d in domains}
        self.alive = True
        self.closed = False
        self.keepalive: tuple[int, int] | None = None
        self.registered: list[int] = []
        self.defined: list[str] = []

    def isAlive(self) -> int:
        return int(self.alive)

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        if uuid not in self.domains:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, f"no domain with uuid {uuid}")
        return self.domains[uuid]

    def listAllDomains(self, flags: int) -> list[FakeDomain]:
        return list(self.domains.values())

    def getHostname(self) -> str:
        return "hostA"

    def getLibVersion(self) -> int:
        return 9_000_000

    def getVersion(self) -> int:
        return 8_002_001

    def defineXML(self, xml: str) -> None:
        self.defined.append(xml)

    def setKeepAlive(self, interval: int, count: int) -> None:
        self.keepalive = (interval, count)

    def domainEventRegisterAny(self, dom: Any, event_id: int, callback: Any, opaque: Any) -> int:
        self.registered.append(event_id)
        return len(self.registered)

    def domainEventDeregisterAny(self, callback_id: int) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def getAllDomainStats(self, stats: int, flags: int) -> list[tuple[FakeDomain, dict[str, Any]]]:
        self.stats_asked = (stats, flags)
        block = {"block.count": 2, "block.0.name": "vda", "block.0.wr.bytes": 4096, "block.1.name": "vdb"}
        return [(d, block) for d in self.domains.values()]


@pytest.fixture
async def dom() -> FakeDomain:
    return FakeDomain()


@pytest.fixture
async def conn(dom: FakeDomain) -> FakeConnection:
    return FakeConnection(dom)


@pytest.fixture
async def host(conn: FakeConnection) -> AsyncIterator[VirtHost]:
    virt = VirtHost("qemu:///fake", workers=2)
    virt._conn = conn
    yield virt
    await virt.close()


@pytest.fixture
def no_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt's event loop thread is not needed by fake connections."""
    monkeypatch.setattr(host_module, "ensure_event_loop", lambda: None)


# -- what the engines' calls hand to libvirt ---------------------------------------------------------------


async def test_block_copy_passes_the_bandwidth_as_a_typed_parameter_in_bytes(
    host: VirtHost, dom: FakeDomain
) -> None:
    flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
    await host.block_copy(VM, "vda", "<disk/>", bandwidth=8 * 1024 * 1024, flags=flags)
    await host.block_copy(VM, "vdb", "<disk/>", bandwidth=None, flags=0)
    await host.block_copy(VM, "vdc", "<disk/>", bandwidth=0, flags=0)
    assert dom.calls == [
        ("blockCopy", ("vda", "<disk/>", {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: 8 * 1024 * 1024}, flags)),
        ("blockCopy", ("vdb", "<disk/>", {}, 0)),  # no cap: no parameter at all, not a zero
        ("blockCopy", ("vdc", "<disk/>", {}, 0)),
    ]


async def test_block_job_reads_bytes_and_maps_no_job_to_none(host: VirtHost, dom: FakeDomain) -> None:
    assert await host.block_job(VM, "vda") is None
    dom.job_info = {"type": 2, "cur": 10, "end": 30, "bandwidth": 1024}
    assert await host.block_job(VM, "vda") == BlockJob(type=2, cur=10, end=30, bandwidth=1024)
    dom.job_info = {"type": 2, "cur": 1, "end": 2}  # libvirt leaves bandwidth out when it is unset
    assert await host.block_job(VM, "vda") == BlockJob(type=2, cur=1, end=2, bandwidth=0)
    flags = {args[1] for name, args in dom.calls if name == "blockJobInfo"}
    assert flags == {libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES}


async def test_block_job_speed_is_in_bytes_and_never_negative(host: VirtHost, dom: FakeDomain) -> None:
    await host.set_block_job_speed(VM, "vda", 5_000_000.7)  # type: ignore[arg-type]
    await host.set_block_job_speed(VM, "vdb", -3)
    bytes_flag = libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES
    assert dom.calls == [
        ("blockJobSetSpeed", ("vda", 5_000_000, bytes_flag)),
        ("blockJobSetSpeed", ("vdb", 0, bytes_flag)),
    ]


async def test_abort_pivots_only_when_asked(host: VirtHost, dom: FakeDomain) -> None:
    await host.abort_block_job(VM, "vda", pivot=True)
    await host.abort_block_job(VM, "vdb")
    assert dom.calls == [
        ("blockJobAbort", ("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)),
        ("blockJobAbort", ("vdb", 0)),
    ]


async def test_abort_and_wait_waits_for_qemu_to_end_the_job(host: VirtHost, dom: FakeDomain) -> None:
    """The abort completes in QEMU after the call returns: the wait ends when no job is left, and says so;
    a job that outlives the wait is reported, not taken for gone."""
    dom.job_info = {"type": 2, "cur": 1, "end": 2}
    reads = 0
    real_info = dom.blockJobInfo

    def ends_on_the_third_read(disk: str, flags: int) -> dict[str, int]:
        nonlocal reads
        reads += 1
        return real_info(disk, flags) if reads < 3 else {}

    dom.blockJobInfo = ends_on_the_third_read  # type: ignore[method-assign]
    assert await host.abort_block_job_and_wait(VM, "vda") is True
    assert reads == 3 and dom.calls[0] == ("blockJobAbort", ("vda", 0))

    dom.blockJobInfo = real_info  # type: ignore[method-assign]
    assert await host.abort_block_job_and_wait(VM, "vdb", within_s=0.3) is False


async def test_migration_tuning_units_and_floors(host: VirtHost, dom: FakeDomain) -> None:
    await host.set_migration_speed(VM, 0)  # libvirt reads 0 as "unlimited": the floor is 1 MiB/s
    await host.set_migration_speed(VM, 40)
    await host.set_max_downtime(VM, 300)
    await host.start_postcopy(VM)
    await host.abort_job(VM)
    assert dom.calls == [
        ("migrateSetMaxSpeed", (1, 0)),
        ("migrateSetMaxSpeed", (40, 0)),
        ("migrateSetMaxDowntime", (300, 0)),
        ("migrateStartPostCopy", (0,)),
        ("abortJob", ()),
    ]


async def test_job_stats_of_the_running_or_the_completed_job(host: VirtHost, dom: FakeDomain) -> None:
    assert await host.job_stats(VM) == {"type": 2, "memory_processed": 10}
    await host.job_stats(VM, completed=True)
    assert [args for name, args in dom.calls if name == "jobStats"] == [
        (0,),
        (libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED,),
    ]


async def test_definitions_live_and_inactive(host: VirtHost, dom: FakeDomain, conn: FakeConnection) -> None:
    assert await host.live_xml(VM) == "<domain flags='0'/>"
    assert await host.inactive_xml(VM) == f"<domain flags='{libvirt.VIR_DOMAIN_XML_INACTIVE}'/>"
    await host.define_xml("<domain/>")
    await host.undefine(VM)
    assert conn.defined == ["<domain/>"]
    assert dom.calls[-1] == ("undefine", ())


async def test_queries_convert_libvirt_units_and_codes(host: VirtHost, dom: FakeDomain) -> None:
    assert await host.memory_bytes(VM) == 262144 * 1024
    assert await host.block_writes(VM, ["vda", "vdb"]) == {"vda": 4096, "vdb": 8192}
    assert await host.domain_state(VM) == "running"
    dom.state_code = libvirt.VIR_DOMAIN_SHUTOFF
    assert await host.domain_state(VM) == "shutoff"
    dom.state_code = 99
    assert await host.domain_state(VM) == "unknown"
    assert await host.list_domains() == [{"uuid": VM, "name": "vm1", "state": "unknown", "persistent": True}]
    assert await host.versions() == {"libvirt": "9.0.0", "qemu": "8.2.1"}
    assert await host.hostname() == "hostA"


# -- failures -------------------------------------------------------------------------------------------


async def test_every_running_vms_writes_in_one_call_without_waiting_for_busy_ones(
    host: VirtHost, conn: FakeConnection
) -> None:
    # A disk whose counter libvirt did not give (block.1 without wr.bytes) is left out, not read as 0.
    assert await host.all_block_writes() == {VM: {"vda": 4096}}
    active = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
    assert conn.stats_asked == (
        libvirt.VIR_DOMAIN_STATS_BLOCK,
        active | libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT,
    )


async def test_an_unknown_domain_is_not_found_on_the_vm_uuid(host: VirtHost) -> None:
    with pytest.raises(NotFound) as missing:
        await host.domain_state(OTHER_VM)
    assert missing.value.field == "vmUuid" and OTHER_VM in missing.value.description


@pytest.mark.parametrize(
    ("libvirt_code", "code"),
    [
        (libvirt.VIR_ERR_OPERATION_INVALID, "AGENT.LIBVIRT_OPERATION_INVALID"),
        (libvirt.VIR_ERR_NO_DOMAIN, "AGENT.VM_NOT_FOUND"),
        (libvirt.VIR_ERR_INTERNAL_ERROR, "AGENT.LIBVIRT_ERROR"),
    ],
)
async def test_a_libvirt_failure_is_a_virt_error_with_its_cause(
    host: VirtHost, dom: FakeDomain, libvirt_code: int, code: str
) -> None:
    dom.fail = libvirt_error(libvirt_code, "block copy refused")
    with pytest.raises(VirtError) as failed:
        await host.block_copy(VM, "vda", "<disk/>", bandwidth=None, flags=0)
    assert failed.value.code == code
    assert "block copy refused" in failed.value.description
    assert isinstance(failed.value.__cause__, libvirt.libvirtError)


async def test_a_failure_on_a_dead_connection_says_libvirt_is_unreachable(
    host: VirtHost, dom: FakeDomain, conn: FakeConnection
) -> None:
    def fail_and_die(*args: Any) -> None:
        conn.alive = False
        raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "end of file while reading data")

    dom.blockJobAbort = fail_and_die  # type: ignore[method-assign]
    with pytest.raises(VirtError) as failed:
        await host.abort_block_job(VM, "vda", pivot=True)
    assert failed.value.code == UNREACHABLE
    assert "went away" in failed.value.description


# -- the connection ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_event_loop")
async def test_a_lost_connection_is_reopened_with_keepalive_and_events(
    monkeypatch: pytest.MonkeyPatch, host: VirtHost, conn: FakeConnection, dom: FakeDomain
) -> None:
    conn.alive = False
    fresh = FakeConnection(dom)
    opened: list[str] = []

    def open_(uri: str) -> FakeConnection:
        opened.append(uri)
        return fresh

    monkeypatch.setattr(libvirt, "open", open_)
    assert await host.domain_state(VM) == "running"
    assert opened == ["qemu:///fake"]
    assert fresh.keepalive == (5, 3)
    assert fresh.registered == [
        libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
        libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
        libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
    ]
    await host.domain_state(VM)
    assert opened == ["qemu:///fake"], "a live connection is kept"


async def test_wait_reachable_gives_up_after_its_time(
    monkeypatch: pytest.MonkeyPatch, no_event_loop: None
) -> None:
    def refuse(uri: str) -> None:
        raise libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, "Failed to connect socket")

    monkeypatch.setattr(libvirt, "open", refuse)
    virt = VirtHost("qemu:///fake", workers=1)
    try:
        with pytest.raises(VirtError) as failed:
            await virt.hostname()
        assert failed.value.code == UNREACHABLE and "qemu:///fake" in failed.value.description
        assert await virt.wait_reachable(0.05, every_s=0.01) is False
    finally:
        await virt.close()


async def test_migrate_runs_on_a_connection_of_its_own_and_closes_it(
    monkeypatch: pytest.MonkeyPatch, no_event_loop: None, host: VirtHost, conn: FakeConnection
) -> None:
    own_dom = FakeDomain()
    own = FakeConnection(own_dom)
    monkeypatch.setattr(libvirt, "open", lambda uri: own)
    params = MigrateParams("tcp://10.0.0.2", ("vda",), "<domain/>", "<domain/>", bandwidth_mib=20)
    flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
    await host.migrate(VM, "qemu+tls://hostB/system", params, flags)
    wire = {
        libvirt.VIR_MIGRATE_PARAM_URI: "tcp://10.0.0.2",
        libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda"],
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: "<domain/>",
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: "<domain/>",
        libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 20,
    }
    assert own_dom.calls == [("migrateToURI3", ("qemu+tls://hostB/system", wire, flags))]
    assert own.keepalive == (5, 3) and own.closed
    assert not conn.closed, "the shared connection is not the migration's"

    own_dom.fail = libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, "domain is not running")
    with pytest.raises(VirtError) as failed:
        await host.migrate(VM, "qemu+tls://hostB/system", params, flags)
    assert failed.value.code == "AGENT.LIBVIRT_OPERATION_INVALID"


# -- events -------------------------------------------------------------------------------------------


async def test_events_reach_the_subscribers_of_that_domain_only(host: VirtHost, dom: FakeDomain) -> None:
    mine = host.subscribe(VM)
    others = host.subscribe(OTHER_VM)
    # libvirt calls these from its event thread.
    await asyncio.to_thread(host._on_block_job, None, dom, "vda", 2, libvirt.VIR_DOMAIN_BLOCK_JOB_READY, None)
    await asyncio.to_thread(host._on_job_completed, None, dom, {"downtime": 120}, None)
    await asyncio.to_thread(host._on_lifecycle, None, dom, libvirt.VIR_DOMAIN_EVENT_STOPPED, 3, None)
    events = [await asyncio.wait_for(mine.get(), 2) for _ in range(3)]
    assert events == [
        DomainEvent("block-job", VM, disk="vda", job_type=2, status=libvirt.VIR_DOMAIN_BLOCK_JOB_READY),
        DomainEvent("job-completed", VM, stats={"downtime": 120}),
        DomainEvent("lifecycle", VM, status=libvirt.VIR_DOMAIN_EVENT_STOPPED, detail=3),
    ]
    assert others.empty()
    host.unsubscribe(VM, mine)
    host._on_block_job(None, dom, "vda", 2, 0, None)
    await asyncio.sleep(0.05)
    assert mine.empty()
