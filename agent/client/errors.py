"""Errors of the agent's HTTP client.

ClientError                the call did not give the answer asked for; carries ``status`` and ``error``
 +- ApiError               the agent answered with an error status and an ErrorCode body
 +- AgentUnreachable       no answer at all: refused, timed out, dropped halfway
 +- BadResponse            an answer that is not the API's (not JSON, wrong shape, not an event stream)

Its ``code`` is the peer's own (or ``CLIENT.*`` for what the client saw itself), a plain string: this
agent's ``Code`` registry does not list another agent's or the client's codes, so ``ClientError`` is not an
``AgentError``. An agent calling a peer agent wraps it (``raise MigrationFailed(...) from err``) and the
peer's own ErrorCode shows up verbatim as the cause (``to_error_code``).
"""

from __future__ import annotations

from typing import Any

from .models import ErrorCodeBody

# HTTP statuses after which the same call may well succeed a moment later (agent restarting, proxy hiccup).
TRANSIENT_STATUSES = frozenset({502, 503, 504})


class ClientError(Exception):
    """A call to an agent failed; ``status`` is the HTTP status (None without an answer)."""

    code = "CLIENT.ERROR"

    def __init__(self, error: ErrorCodeBody, status: int | None = None) -> None:
        self.description: str = error.get("description") or error.get("code") or "request failed"
        super().__init__(self.description)
        self.details = error.get("details")
        self.field = error.get("field")
        self.code = error.get("code") or self.code
        self.error = error
        self.status = status

    @property
    def transient(self) -> bool:
        """Whether retrying the same call later is reasonable."""
        return self.status in TRANSIENT_STATUSES

    def to_error_code(self) -> dict[str, Any]:
        """The peer's ErrorCode as it sent it, so nothing of its cause chain is lost."""
        return dict(self.error)

    def __str__(self) -> str:
        where = f"HTTP {self.status}: " if self.status is not None else ""
        return f"{where}{self.code}: {self.description}"


class ApiError(ClientError):
    """The agent refused the call with an ErrorCode (4xx or 5xx)."""


class AgentUnreachable(ClientError):
    """The agent could not be reached or stopped answering; the call's outcome is unknown."""

    code = "CLIENT.UNREACHABLE"

    @property
    def transient(self) -> bool:
        return True


class BadResponse(ClientError):
    """The agent answered something that is not the API's shape."""

    code = "CLIENT.BAD_RESPONSE"


def local_error(code: str, description: str, details: str | None = None) -> ErrorCodeBody:
    """An ErrorCode made on the client side, same shape as the agent's."""
    return {"code": code, "description": description, "details": details, "cause": None}
