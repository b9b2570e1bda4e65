"""The destination's record of each incoming migration: a small JSON file under ``state_dir/incoming``, so
that a restarted destination agent still knows what the migration created and must remove, and which peer
prepared it (``peer``: only that peer may act on it). A settled migration (committed, defined) leaves a
small note under ``incoming/settled`` (its VM and peer), so that its source can still ask where the VM runs;
the newest ``SETTLED_KEPT`` notes are kept."""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import Any

from agent.errors import Code, Forbidden, NotFound
from agent.migration.request import normalise_uuid
from agent.storage.roots import StorageRoots


class IncomingState(enum.StrEnum):
    """Where an incoming migration stands on the destination (its record's ``state``, and the word its
    answers carry)."""

    PREPARING = "preparing"  # targets being made; a restart here removes them
    PREPARED = "prepared"  # every target made; layers may arrive, the source may migrate into them
    COMMITTED = "committed"  # the VM runs here from the targets: they are its own now (settled)
    DEFINED = "defined"  # a shut-off VM's definition moved here with its files (settled)
    ABORTED = "aborted"  # what it made was removed (no record left)


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

    def load(self, migration_id: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.path(migration_id).read_text())
            return data
        except FileNotFoundError:
            raise NotFound(f"no incoming migration {migration_id} on this host") from None

    def save(self, record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.path(record["migrationId"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def load_owned(self, migration_id: str, peer: str) -> dict[str, Any]:
        """The record, if ``peer`` prepared it (403 otherwise; a record of an older agent names none)."""
        record = self.load(migration_id)
        check_owner(record, peer)
        return record

    def forget(self, migration_id: str) -> None:
        self.path(migration_id).unlink(missing_ok=True)

    def settle(self, record: dict[str, Any], state: IncomingState) -> None:
        """Forget the record, keeping a note of its VM and peer (the newest ``SETTLED_KEPT`` notes)."""
        settled = self.dir / "settled"
        settled.mkdir(parents=True, exist_ok=True, mode=0o700)
        note = {"migrationId": record["migrationId"], "vmUuid": record["vmUuid"], "state": str(state)}
        if "peer" in record:
            note["peer"] = record["peer"]
        path = settled / f"{normalise_uuid(record['migrationId'])}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(note))
        os.replace(tmp, path)
        self.forget(record["migrationId"])
        notes = sorted(settled.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in notes[:-SETTLED_KEPT]:
            old.unlink(missing_ok=True)

    def vm_of(self, migration_id: str, peer: str) -> str:
        """The VM of an open or settled migration of ``peer``."""
        try:
            record = self.load(migration_id)
        except NotFound:
            try:
                record = json.loads(
                    (self.dir / "settled" / f"{normalise_uuid(migration_id)}.json").read_text()
                )
            except FileNotFoundError:
                raise NotFound(f"no incoming migration {migration_id} on this host") from None
        check_owner(record, peer)
        return str(record["vmUuid"])

    def list_ids(self) -> list[str]:
        if not self.dir.exists():
            return []
        return [p.stem for p in self.dir.glob("*.json")]


def check_owner(record: dict[str, Any], peer: str) -> None:
    owner = record.get("peer")
    if owner is not None and owner != peer:
        raise Forbidden(
            f"incoming migration {record['migrationId']} was prepared by another peer",
            code=Code.NOT_YOUR_MIGRATION,
            details=f"the caller is {peer}",
        )


def remove_created(record: dict[str, Any], roots: StorageRoots) -> list[str]:
    """Remove the files the record says the migration created (inside a storage root only), newest first."""
    removed = []
    for path in reversed(record["created"]):
        if roots.owner_of(path) is None:
            continue
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed
