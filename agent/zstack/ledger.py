"""The command records in memory: by ZStack's ``taskuuid`` and by the agent task that answers them, saved to
the ``CommandStore`` (one writer at a time, off the event loop) at every change."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

from agent.zstack.records import KEEP_ANSWERED_S, CommandRecord, CommandStore, HostLink
from agent.zstack.wire import BLOCK_COPY


class CommandLedger:
    """Load at start, then ``add``, ``attach`` and ``save`` as commands go; ``forget_old`` keeps it small."""

    def __init__(self, store: CommandStore) -> None:
        self._store = store
        self._records: dict[str, CommandRecord] = {}
        self._by_task: dict[str, set[str]] = {}
        self._save_lock = asyncio.Lock()

    async def load(self, now: float) -> tuple[list[CommandRecord], HostLink]:
        """The records kept on disk, now indexed, and the last host link."""
        records = await asyncio.to_thread(self._store.load, now)
        link = await asyncio.to_thread(self._store.load_link)
        for record in records:
            self._records[record.task_uuid] = record
            if record.agent_task:
                self._by_task.setdefault(record.agent_task, set()).add(record.task_uuid)
        return records, link

    def get(self, task_uuid: str) -> CommandRecord | None:
        return self._records.get(task_uuid)

    def add(self, record: CommandRecord) -> None:
        self._records[record.task_uuid] = record

    def attach(self, record: CommandRecord, agent_task: str) -> None:
        """The agent task that answers ``record``; indexed at once, so its changes find the record."""
        record.agent_task = agent_task
        self._by_task.setdefault(agent_task, set()).add(record.task_uuid)

    def answered_by(self, agent_task: str) -> Iterator[CommandRecord]:
        """The unanswered records that ``agent_task`` answers."""
        for task_uuid in list(self._by_task.get(agent_task, ())):
            record = self._records.get(task_uuid)
            if record is not None and not record.answered:
                yield record

    def unanswered_for_api(self, api_id: str) -> list[CommandRecord]:
        """The unanswered records whose command carried ``threadContext.api`` = ``api_id``."""
        return [r for r in self._records.values() if not r.answered and r.api_id == api_id]

    def latest_like(self, record: CommandRecord) -> str | None:
        """The agent task of the latest other command of the same kind for the same VM (and volume)."""
        same = [
            r
            for r in self._records.values()
            if r is not record
            and r.agent_task
            and r.kind == record.kind
            and r.vm_uuid == record.vm_uuid
            and (record.kind != BLOCK_COPY or r.volume == record.volume)
        ]
        return max(same, key=lambda r: r.created_at).agent_task if same else None

    def unanswered(self) -> int:
        return sum(1 for r in self._records.values() if not r.answered)

    def forget_old(self, now: float, keep: int | None = None) -> None:
        """Drop answered records past ``KEEP_ANSWERED_S`` from memory (their files go at the next start),
        and the oldest answered ones, with their files, beyond ``keep`` records in all."""
        cutoff = now - KEEP_ANSWERED_S
        for task_uuid, record in list(self._records.items()):
            if record.answered and record.created_at < cutoff:
                self._drop(task_uuid)
        if keep is None or len(self._records) < keep:
            return
        answered = sorted((r for r in self._records.values() if r.answered), key=lambda r: r.created_at)
        for record in answered[: len(self._records) - keep + 1]:
            self._drop(record.task_uuid)
            self._store.remove(record.task_uuid)

    def _drop(self, task_uuid: str) -> None:
        record = self._records.pop(task_uuid)
        if record.agent_task in self._by_task:
            self._by_task[record.agent_task].discard(task_uuid)
            if not self._by_task[record.agent_task]:
                del self._by_task[record.agent_task]

    async def save(self, record: CommandRecord) -> None:
        snapshot = dataclasses.replace(record)
        async with self._save_lock:
            await asyncio.to_thread(self._store.save, snapshot)

    async def save_link(self, link: HostLink) -> None:
        async with self._save_lock:
            await asyncio.to_thread(self._store.save_link, link)
