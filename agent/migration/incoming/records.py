"""The destination's record of each incoming migration: a small JSON file under ``state_dir/incoming``, so
that a restarted destination agent still knows what the migration created and must remove, and which peer
prepared it (``peer``: only that peer may act on it). A settled migration (committed, defined) leaves a
small note under ``incoming/settled`` (its VM and peer), so that its source can still ask where the VM runs;
the newest ``SETTLED_KEPT`` notes are kept."""

from __future__ import annotations

import enum
import json
import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from agent.errors import Code, Forbidden, NotFound
from agent.migration.peer.wire import IncomingSpec, PreparedDisk
from agent.migration.request import normalise_uuid
from agent.migration.volumes import release_created
from agent.storage.roots import StorageRoot, StorageRoots
from agent.virt.host import VirtHost

_LOG = logging.LoggerAdapter(logging.getLogger(__name__), {})


class IncomingState(enum.StrEnum):
    """Where an incoming migration stands on the destination (its record's ``state``, and the word its
    answers carry)."""

    PREPARING = "preparing"  # targets being made; a restart here removes them
    PREPARED = "prepared"  # every target made; layers may arrive, the source may migrate into them
    COMMITTED = "committed"  # the VM runs here from the targets: they are its own now (settled)
    DEFINED = "defined"  # a shut-off VM's definition moved here with its files (settled)
    ABORTED = "aborted"  # what it made was removed (no record left)


class _Record(BaseModel):
    # A record of a newer agent may carry more: what this one does not know it leaves alone.
    model_config = ConfigDict(extra="ignore")


class Layout(_Record):
    """Every disk's paths on this host, confined in the storage root: top and lower layers (base first)."""

    disks: list[PreparedDisk]

    def tops(self) -> dict[str, str]:
        return {d.target: d.top for d in self.disks}


class Reservation(_Record):
    """The space a prepared migration holds in one storage until it settles."""

    storage: str
    bytes: int


class IncomingRecord(_Record):
    """One incoming migration, as journalled (the JSON keys are the file format: never rename one)."""

    migrationId: str
    vmUuid: str
    #: Who prepared it: only that peer may act on it (a record of an older agent names none).
    peer: str | None = None
    #: The spec as the source sent it, without the domain (which is kept as ``domainParts``).
    spec: IncomingSpec
    domainParts: dict[str, str] | None = None
    layout: Layout
    #: Files this migration created, in order: removed newest first when it does not settle here.
    created: list[str] = []
    reserved: Reservation | None = None
    state: IncomingState = IncomingState.PREPARING
    #: Lower layers transferred and verified.
    layersDone: list[str] = []


#: Settled notes kept (the newest); a source asks about its migration within minutes of settling it.
SETTLED_KEPT = 256


class IncomingRecords:
    """One JSON file per migration id (the source task uuid), written whole and renamed into place."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "incoming"

    def path(self, migration_id: str) -> Path:
        return self.dir / f"{normalise_uuid(migration_id)}.json"

    def exists(self, migration_id: str) -> bool:
        return self.path(migration_id).exists()

    def load(self, migration_id: str) -> IncomingRecord:
        try:
            text = self.path(migration_id).read_text()
        except FileNotFoundError:
            raise NotFound(f"no incoming migration {migration_id} on this host") from None
        return IncomingRecord.model_validate_json(text)

    def save(self, record: IncomingRecord) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.path(record.migrationId)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(record.model_dump_json(exclude_none=True))
        os.replace(tmp, path)

    def load_owned(self, migration_id: str, peer: str) -> IncomingRecord:
        """The record, if ``peer`` prepared it (403 otherwise; a record of an older agent names none)."""
        record = self.load(migration_id)
        check_owner(record.migrationId, record.peer, peer)
        return record

    def forget(self, migration_id: str) -> None:
        self.path(migration_id).unlink(missing_ok=True)

    def settle(self, record: IncomingRecord, state: IncomingState) -> None:
        """Forget the record, keeping a note of its VM and peer (the newest ``SETTLED_KEPT`` notes)."""
        settled = self.dir / "settled"
        settled.mkdir(parents=True, exist_ok=True, mode=0o700)
        note = {"migrationId": record.migrationId, "vmUuid": record.vmUuid, "state": str(state)}
        if record.peer is not None:
            note["peer"] = record.peer
        path = settled / f"{normalise_uuid(record.migrationId)}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(note))
        os.replace(tmp, path)
        self.forget(record.migrationId)
        notes = sorted(settled.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in notes[:-SETTLED_KEPT]:
            old.unlink(missing_ok=True)

    def vm_of(self, migration_id: str, peer: str) -> str:
        """The VM of an open or settled migration of ``peer``."""
        try:
            record = self.load(migration_id)
        except NotFound:
            try:
                note = json.loads((self.dir / "settled" / f"{normalise_uuid(migration_id)}.json").read_text())
            except FileNotFoundError:
                raise NotFound(f"no incoming migration {migration_id} on this host") from None
            check_owner(migration_id, note.get("peer"), peer)
            return str(note["vmUuid"])
        check_owner(record.migrationId, record.peer, peer)
        return record.vmUuid

    def list_ids(self) -> list[str]:
        if not self.dir.exists():
            return []
        return [p.stem for p in self.dir.glob("*.json")]


def check_owner(migration_id: str, owner: str | None, peer: str) -> None:
    """Only the peer that prepared a migration may act on it (``owner`` None: an older agent's record)."""
    if owner is not None and owner != peer:
        raise Forbidden(
            f"incoming migration {migration_id} was prepared by another peer",
            code=Code.NOT_YOUR_MIGRATION,
            details=f"the caller is {peer}",
        )


async def remove_created(record: IncomingRecord, roots: StorageRoots, host: VirtHost | None) -> list[str]:
    """Undo what the record says the migration created, newest first, inside this host's storages only: a
    file is removed, an RBD image removed (through libvirt: ``host``), a block device given back blank."""
    removed = []
    for location in reversed(record.created):
        storage = roots.owner_of_location(location)
        if storage is None:
            continue
        if isinstance(storage, StorageRoot):
            try:
                os.unlink(location)
                removed.append(location)
            except FileNotFoundError:
                pass
        elif host is not None:
            await release_created(host, roots, location, _LOG)
            removed.append(location)
    return removed
