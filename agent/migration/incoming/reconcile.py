"""At the destination agent's start: settle the incoming-migration records an earlier life left, from what
this host's libvirtd says (the source agent may be gone, or may have ended its task while this agent was
down)."""

from __future__ import annotations

import asyncio
import logging

from agent.errors import AgentError, NotFound
from agent.migration.incoming.records import IncomingRecords, IncomingState, remove_created
from agent.storage.roots import StorageRoots
from agent.virt.domxml import parse_disks
from agent.virt.host import VirtHost
from agent.virt.states import DomainState

log = logging.getLogger(__name__)

#: How often the start-up reconciliation looks again at a record whose migration is still in flight, and for
#: how long at most.
RECONCILE_EVERY_S = 5.0
RECONCILE_GIVE_UP_S = 3600.0


async def reconcile(
    records: IncomingRecords,
    roots: StorageRoots,
    host: VirtHost,
    lock: asyncio.Lock,
    *,
    every_s: float = RECONCILE_EVERY_S,
    give_up_s: float = RECONCILE_GIVE_UP_S,
) -> None:
    """Settle every record (``lock``: the service's, held for each one):
    - the VM runs here from the record's tops: the migration arrived; commit (forget the record);
    - no VM here: nothing is in flight any more (an incoming migration shows as a paused domain from
      its start); remove what the record created. A source still at work then fails cleanly;
    - otherwise (paused: a migration in flight; libvirtd not answering): look again every ``every_s``
      until it settles, for up to ``give_up_s``; then keep the record and say so.
    """
    pending = set(records.list_ids())
    if pending:
        log.info("reconciling %d incoming migration record(s) left from before the start", len(pending))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_s
    while pending:
        for migration_id in sorted(pending):
            try:
                async with lock:
                    settled = await _reconcile_one(records, roots, host, migration_id)
            except Exception:
                log.exception("incoming migration %s: reconciliation failed", migration_id)
                raise
            if settled:
                pending.discard(migration_id)
        if not pending:
            break
        if loop.time() > deadline:
            for migration_id in sorted(pending):
                log.warning(
                    "incoming migration %s: still unsettled after %.0f s; record kept (abort or commit "
                    "it through the API once the VM's place is known)",
                    migration_id,
                    give_up_s,
                )
            return
        await asyncio.sleep(every_s)


async def _reconcile_one(
    records: IncomingRecords, roots: StorageRoots, host: VirtHost, migration_id: str
) -> bool:
    """True when the record was settled (committed, removed, or gone already)."""
    try:
        record = records.load(migration_id)
    except NotFound:
        return True
    vm_uuid = record.vmUuid
    tops = record.layout.tops()
    try:
        state = await host.domain_state(vm_uuid)
    except NotFound:
        state = DomainState.UNDEFINED
    except AgentError as err:
        log.info("incoming migration %s: libvirtd not answering (%s); later", migration_id, err)
        return False
    if state in (DomainState.RUNNING, DomainState.SHUTOFF):
        xml = await (host.live_xml if state == DomainState.RUNNING else host.inactive_xml)(vm_uuid)
        live = {d.target: d.location for d in parse_disks(xml)}
        if all(live.get(t) == top for t, top in tops.items()):
            records.settle(record, IncomingState.COMMITTED)
            log.info(
                "incoming migration %s committed at start: VM %s is %s here from its new volumes",
                migration_id,
                vm_uuid,
                state,
            )
            return True
        log.error(
            "incoming migration %s: VM %s is %s here but not from the prepared volumes; record kept",
            migration_id,
            vm_uuid,
            state,
        )
        return True
    if state == DomainState.UNDEFINED:
        removed = await remove_created(record, roots, host)
        records.forget(migration_id)
        log.info(
            "incoming migration %s for VM %s: the VM is not here and nothing is in flight; removed "
            "%d file(s) it created",
            migration_id,
            vm_uuid,
            len(removed),
        )
        return True
    log.info("incoming migration %s: VM %s is %s here; looking again later", migration_id, vm_uuid, state)
    return False
