"""What the adapter keeps on disk: one record per ZStack command it accepted, and the management server's
connection facts (``/host/connect``), as small JSON files under ``state_dir/zstack`` (written atomically).

A command record ties ZStack's ``taskuuid`` (echoed verbatim in the callback header) and ``callbackurl`` to
the agent task that answers it; it survives restarts so a task that finishes after one is still answered,
a ``reload`` finds the job it asks about, and ``/job/cancel`` finds it by ``threadContext.api``. The callback
itself goes through the journal's outbox (``Journal.add_outbox``), which retries it across restarts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Answered records older than this are removed at start.
KEEP_ANSWERED_S = 7 * 24 * 3600.0


@dataclass
class CommandRecord:
    task_uuid: str  # ZStack's taskuuid header, verbatim
    kind: str  # wire.MIGRATE | wire.BLOCK_COPY
    callback_url: str
    created_at: float
    vm_uuid: str | None = None
    volume: str | None = None  # block copy: the old volume path (a reload of the same move matches it)
    thread_context: dict[str, Any] = field(default_factory=dict)
    thread_context_stack: list[Any] = field(default_factory=list)
    agent_task: str | None = None  # the agent task that answers this command
    answered: bool = False
    cancel_requested: bool = False

    @property
    def api_id(self) -> str | None:
        api = self.thread_context.get("api")
        return str(api) if api else None


@dataclass
class HostLink:
    """What ``/host/connect`` told us: ZStack's uuid for this host and where progress reports go."""

    host_uuid: str | None = None
    send_command_url: str | None = None


class CommandStore:
    """Command records and the host link under one directory; blocking file I/O, call it in a thread."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.commands = directory / "commands"

    def load(self, now: float | None = None) -> list[CommandRecord]:
        """Every record still worth keeping (answered ones older than ``KEEP_ANSWERED_S`` are removed)."""
        now = time.time() if now is None else now
        if not self.commands.exists():
            return []
        records = []
        for path in sorted(self.commands.glob("*.json")):
            try:
                record = CommandRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as err:
                log.error("skipping unreadable ZStack command record %s: %s", path, err)
                continue
            if record.answered and now - record.created_at > KEEP_ANSWERED_S:
                path.unlink(missing_ok=True)
                continue
            records.append(record)
        return records

    def save(self, record: CommandRecord) -> None:
        _write_json(self.commands / f"{record.task_uuid}.json", asdict(record))

    def remove(self, task_uuid: str) -> None:
        (self.commands / f"{task_uuid}.json").unlink(missing_ok=True)

    def load_link(self) -> HostLink:
        try:
            data = json.loads((self.dir / "host.json").read_text())
            return HostLink(data.get("host_uuid"), data.get("send_command_url"))
        except FileNotFoundError:
            return HostLink()
        except (OSError, ValueError) as err:
            log.error("unreadable ZStack host link: %s", err)
            return HostLink()

    def save_link(self, link: HostLink) -> None:
        _write_json(self.dir / "host.json", asdict(link))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
