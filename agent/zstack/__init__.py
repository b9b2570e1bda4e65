"""The ZStack agent dialect: drop-in endpoints for an existing ZStack management server (docs/zstack.md).

A thin adapter over the agent's own task manager: ZStack commands become agent tasks (same engines, journal
and guarantees), task events become ZStack callbacks and progress reports.

- ``wire``: command bodies, answer and progress shapes, the time-budget rule;
- ``records``: what the adapter keeps on disk (command records, the management server's connection facts);
- ``translate``: ZStack commands as ``MigrationRequest`` (targets pre-created by the management server);
- ``service``: intake, answers through the journal's outbox, progress, reload, cancel;
- ``routes``: the paths on the aiohttp app and the source-network guard; ``mount(app)`` adds them.
"""

from agent.zstack.routes import mount

__all__ = ["mount"]
