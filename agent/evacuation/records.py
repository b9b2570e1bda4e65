"""The evacuations' journal: one JSON file per evacuation under ``state_dir/evacuations`` (mode 0600: the
request holds the destinations' tokens), written whole, synced and renamed into place on every change of a
VM's state, so that a restarted agent picks each unfinished evacuation up where it was (``service``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from agent.migration.request import normalise_uuid

log = logging.getLogger(__name__)

#: Finished evacuations kept (the newest); older ones are removed at start.
FINISHED_KEPT = 256


class EvacuationRecords:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "evacuations"

    def path(self, evacuation_uuid: str) -> Path:
        return self.dir / f"{normalise_uuid(evacuation_uuid)}.json"

    def save(self, record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.path(record["evacuationUuid"])
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(record))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)

    def load_all(self) -> list[dict[str, Any]]:
        """Every readable record, oldest first; unreadable ones are logged and left where they are."""
        if not self.dir.is_dir():
            return []
        records = []
        for path in self.dir.glob("*.json"):
            try:
                record = json.loads(path.read_text())
                records.append(record)
            except (OSError, ValueError) as err:
                log.error("evacuation record %s cannot be read; leaving it: %s", path, err)
        records.sort(key=lambda r: float(r.get("createdAt", 0)))
        return records

    def prune(self, finished: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Remove all but the newest ``FINISHED_KEPT`` finished records; returns those kept."""
        ordered = sorted(finished, key=lambda r: float(r.get("finishedAt") or r.get("createdAt", 0)))
        for record in ordered[:-FINISHED_KEPT]:
            self.path(record["evacuationUuid"]).unlink(missing_ok=True)
        return ordered[-FINISHED_KEPT:]
