"""Exit codes that scripts can trust, and which failure maps to which.

0  done: the task SUCCEEDED (``--wait``/``watch``), or the request was accepted / answered
1  the task ended FAILED or CANCELLED, or the agent refused the call (404, 409, 5xx)
2  usage or config: bad arguments, unreadable token file, a request the agent calls invalid (400),
   a wrong token (401/403), a body too large (413)
3  the agent could not be reached, timed out, or is stopping (502/503/504): trying again later may work
130 interrupted (Ctrl-C); a watched task goes on
"""

from __future__ import annotations

import enum

from agent.client import AgentUnreachable, ClientError, TaskView


class Exit(enum.IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    INTERRUPTED = 130


class UsageError(Exception):
    """A command line that cannot be run as given; the message says what to fix (exit 2)."""


_USAGE_STATUSES = frozenset({400, 401, 403, 413})


def exit_for_error(err: ClientError) -> Exit:
    if isinstance(err, AgentUnreachable) or err.transient:
        return Exit.UNREACHABLE
    if err.status in _USAGE_STATUSES:
        return Exit.USAGE
    return Exit.FAILED


def exit_for_task(task: TaskView) -> Exit:
    """Only SUCCEEDED is success: a cancelled migration did not do what the script asked for."""
    return Exit.OK if task.get("state") == "SUCCEEDED" else Exit.FAILED
