"""The agent's error tree and the ErrorCode shape the management plane sees.

AgentError                 root; carries a stable ``code``, a description, details and a cause
 +- InvalidRequest         bad input, names the offending ``field`` (HTTP 400)
 |   +- StorageNotFound     unknown storage uuid (400)
 |   +- PathOutsideRoot     a path that escapes its storage root (400)
 +- Unauthorized           missing or wrong token (401)
 +- NotFound               unknown VM, task or incoming migration (404)
 +- Conflict               the VM already has a task, a task in the wrong state (409)
 +- PayloadTooLarge        request body over the limit (413)
 +- ServiceStopping        the agent is shutting down (503)
 +- PreflightFailed        the plan cannot run: no space, a block job present, target exists (409)
 +- MigrationFailed        a step of a running migration failed (task ends FAILED)
 |   +- ConvergenceFailed   live migration cannot converge within what the request allows
 +- VirtError              a libvirt call failed (wraps libvirt.libvirtError)
 +- StorageError           qemu-img or a file operation failed

Lower errors are wrapped with ``raise X(...) from err``; ``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations

from typing import Any


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""

    code = "AGENT.INTERNAL"
    http_status = 500

    def __init__(
        self,
        description: str,
        *,
        details: str | None = None,
        field: str | None = None,
        code: str | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(description)
        self.description = description
        self.details = details
        self.field = field
        self.extra = extra
        if code is not None:
            self.code = code

    def to_error_code(self) -> dict[str, Any]:
        """The ErrorCode body: ``{code, description, details, cause}`` plus ``field`` when known."""
        body: dict[str, Any] = {
            "code": self.code,
            "description": self.description,
            "details": self.details,
            "cause": _cause_of(self),
        }
        if self.field is not None:
            body["field"] = self.field
        if self.extra:
            body["extra"] = self.extra
        return body


def _cause_of(err: BaseException) -> dict[str, Any] | None:
    cause = err.__cause__
    if cause is None:
        return None
    if isinstance(cause, AgentError):
        return cause.to_error_code()
    return {
        "code": "AGENT.CAUSE",
        "description": f"{type(cause).__name__}: {cause}",
        "details": None,
        "cause": None,
    }


class InvalidRequest(AgentError):
    code = "AGENT.INVALID_REQUEST"
    http_status = 400


class StorageNotFound(InvalidRequest):
    code = "AGENT.STORAGE_NOT_FOUND"


class PathOutsideRoot(InvalidRequest):
    code = "AGENT.PATH_OUTSIDE_ROOT"


class Unauthorized(AgentError):
    code = "AGENT.UNAUTHORIZED"
    http_status = 401


class NotFound(AgentError):
    code = "AGENT.NOT_FOUND"
    http_status = 404


class Conflict(AgentError):
    code = "AGENT.CONFLICT"
    http_status = 409


class PayloadTooLarge(AgentError):
    code = "AGENT.PAYLOAD_TOO_LARGE"
    http_status = 413


class ServiceStopping(AgentError):
    code = "AGENT.STOPPING"
    http_status = 503


class PreflightFailed(AgentError):
    code = "AGENT.PREFLIGHT_FAILED"
    http_status = 409


class MigrationFailed(AgentError):
    code = "AGENT.MIGRATION_FAILED"
    http_status = 500


class ConvergenceFailed(MigrationFailed):
    code = "AGENT.CONVERGENCE_FAILED"


class VirtError(AgentError):
    code = "AGENT.LIBVIRT_ERROR"
    http_status = 502


class StorageError(AgentError):
    code = "AGENT.STORAGE_ERROR"
    http_status = 500
