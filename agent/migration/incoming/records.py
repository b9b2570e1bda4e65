"""The destination's record of each incoming migration: a small JSON file under ``state_dir/incoming``, so
that a restarted destination agent still knows what the migration created and must remove."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agent.errors import NotFound
from agent.migration.request import normalise_uuid
from agent.storage.roots import StorageRoots


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

    def forget(self, migration_id: str) -> None:
        self.path(migration_id).unlink(missing_ok=True)

    def list_ids(self) -> list[str]:
        if not self.dir.exists():
            return []
        return [p.stem for p in self.dir.glob("*.json")]


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
