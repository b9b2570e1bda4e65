"""The task journal: SQLite (stdlib ``sqlite3``, WAL) at ``<state_dir>/journal.sqlite``.

Every task, every state change, every engine checkpoint, every retune and the final result (together with its
outbox entry for the callback) is committed here *before* the step it announces; on start the agent reads
back the unfinished tasks. The outbox holds final results until the management plane has them.

The journal holds the full request, including a destination agent's token when the management plane gave
one (a resumed task needs it); the file is created ``0600`` inside a ``0700`` state directory.

Modules: ``schema`` (the tables, opening the file, one transaction), ``rows`` (what comes back),
``tasks_table`` and ``outbox_table`` (the SQL, run on the worker thread), ``facade`` (``Journal``, the async
face: one worker thread, each call one transaction).
"""

from agent.tasks.journal.facade import Journal
from agent.tasks.journal.rows import OutboxEntry, StateRow, TaskRecord
from agent.tasks.journal.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "Journal", "OutboxEntry", "StateRow", "TaskRecord"]
