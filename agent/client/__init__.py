"""Async client of the agent's HTTP API (DESIGN.md), for the CLI, tests and agent-to-agent calls.

    async with AgentClient("http://10.0.0.1:7070", token) as agent:
        task = await agent.start_migration(vm_uuid, body)
        async for snapshot in follow_task(agent, task["taskUuid"]):
            ...

Errors: every failed call raises a ``ClientError`` (see ``agent.client.errors`` for the tree) carrying the
HTTP ``status`` and the agent's ErrorCode body as ``error``.
"""

from .errors import AgentUnreachable, ApiError, BadResponse, ClientError
from .follow import apply_event, follow_task
from .http import AgentClient
from .models import FINAL_STATES, ErrorCodeBody, Progress, TaskView, is_final
from .sse import ServerEvent, SseParser

__all__ = [
    "FINAL_STATES",
    "AgentClient",
    "AgentUnreachable",
    "ApiError",
    "BadResponse",
    "ClientError",
    "ErrorCodeBody",
    "Progress",
    "ServerEvent",
    "SseParser",
    "TaskView",
    "apply_event",
    "follow_task",
    "is_final",
]
