"""The agent's error tree and the ErrorCode shape the management plane sees.

AgentError                 root; carries a stable ``code``, a description, details and a cause
 +- InvalidRequest         bad input, names the offending ``field`` (HTTP 400)
 |   +- StorageNotFound     unknown storage uuid (400)
 |   +- PathOutsideRoot     a path that escapes its storage root, or an RBD image outside its pool (400)
 |   +- StorageKindUnsupported  a storage of a kind this move cannot use yet (400)
 +- Unauthorized           missing or wrong token (401)
 +- Forbidden              a known caller whose role or identity may not do this (403)
 +- NotFound               unknown VM, task or incoming migration (404)
 +- Conflict               the VM already has a task, a task in the wrong state (409)
 +- PayloadTooLarge        request body over the limit (413)
 +- Busy                   a limit of this host is full; ``retry_after_s`` says when to try again (429)
 +- ServiceStopping        the agent is shutting down (503)
 +- LimitsNotApplied       a live change of the limits did not take in QEMU (503)
 +- PreflightFailed        the plan cannot run: no space, a block job present, target exists (409)
 +- MigrationFailed        a step of a running migration failed (task ends FAILED)
 |   +- ConvergenceFailed   live migration cannot converge within what the request allows
 +- VirtError              a libvirt call failed (wraps libvirt.libvirtError)
 +- StorageError           qemu-img or a file operation failed

Lower errors are wrapped with ``raise X(...) from err``; ``asyncio.CancelledError`` is never wrapped.

Every code the agent reports is a member of ``Code``, with its meaning (both listed in the OpenAPI
document): a management plane may act on them, so they are stable. tests/unit/test_error_codes.py fails on a
code used anywhere in agent/ that is not registered here.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol, runtime_checkable


class Code(enum.StrEnum):
    """The stable error codes (values as they appear in an ErrorCode's ``code``), each with its meaning."""

    meaning: str

    def __new__(cls, value: str, meaning: str) -> Code:
        member = str.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    @classmethod
    def known(cls, value: object) -> Code | None:
        """The member whose value this is; None for a code this agent does not register."""
        return next((code for code in cls if code.value == value), None)

    # The agent itself
    INTERNAL = "AGENT.INTERNAL", "a bug in the agent; the details name the exception"
    CAUSE = "AGENT.CAUSE", "the cause of an error was not the agent's own (an exception of a library)"

    # The request as sent
    INVALID_REQUEST = "AGENT.INVALID_REQUEST", "bad input; `field` names it"
    REQUEST_TIMEOUT = "AGENT.REQUEST_TIMEOUT", "the request body did not arrive in time"
    METHOD_NOT_ALLOWED = "AGENT.METHOD_NOT_ALLOWED", "the path exists, not with this method"
    PAYLOAD_TOO_LARGE = "AGENT.PAYLOAD_TOO_LARGE", "the request body is over the limit"
    HTTP_REFUSED = (
        "AGENT.HTTP_REFUSED",
        "the HTTP layer refused the request (malformed, or a header it cannot take); the status says which",
    )
    UNAUTHORIZED = "AGENT.UNAUTHORIZED", "missing or wrong bearer token"
    CLUSTER_CERTIFICATE_REQUIRED = (
        "AGENT.CLUSTER_CERTIFICATE_REQUIRED",
        "an agent-to-agent path called without a cluster client certificate",
    )
    FORBIDDEN = "AGENT.FORBIDDEN", "the caller's role may not call this path (the details name both)"
    NOT_YOUR_MIGRATION = (
        "AGENT.NOT_YOUR_MIGRATION",
        "the incoming migration was prepared by another peer; only that peer may act on it",
    )
    DOMAIN_MISMATCH = (
        "AGENT.DOMAIN_MISMATCH",
        "the domain to define differs from what the source declared at prepare (`field` names the part)",
    )
    BUSY = "AGENT.BUSY", "a limit of this host is full (Retry-After says when to try again)"

    # What the request names
    NOT_FOUND = "AGENT.NOT_FOUND", "no such task or incoming migration"
    VM_NOT_FOUND = "AGENT.VM_NOT_FOUND", "no such VM on this host"
    STORAGE_NOT_FOUND = "AGENT.STORAGE_NOT_FOUND", "no storage root with that uuid in this agent's config"
    PATH_OUTSIDE_ROOT = (
        "AGENT.PATH_OUTSIDE_ROOT",
        "a path that escapes its storage root, a device not directly in its block directory, or an RBD "
        "image outside its storage's pool and namespace",
    )
    STORAGE_KIND_UNSUPPORTED = (
        "AGENT.STORAGE_KIND_UNSUPPORTED",
        "a storage of a kind (rbd, block) that this move cannot use yet (docs/storage.md)",
    )

    # The agent's own state
    CONFLICT = "AGENT.CONFLICT", "the VM already has a task, or the same taskUuid came with another body"
    INVALID_TRANSITION = (
        "AGENT.INVALID_TRANSITION",
        "a task was asked to go to a state its current one does not allow",
    )
    STOPPING = "AGENT.STOPPING", "the agent is shutting down; send the request again to another or later"
    LIMITS_NOT_APPLIED = (
        "AGENT.LIMITS_NOT_APPLIED",
        "a retune did not take in QEMU: the details name each stream, value and error",
    )
    LIMITS_TOO_LATE = (
        "AGENT.LIMITS_TOO_LATE",
        "a retune came after the streams it governs ended (the switch is under way)",
    )

    # Refused before anything is made
    PREFLIGHT_FAILED = (
        "AGENT.PREFLIGHT_FAILED",
        "the move cannot start as asked (VM state, a block job); nothing was made",
    )
    NO_SPACE = "AGENT.NO_SPACE", "the destination storage has not enough free space; nothing was made"
    TARGET_EXISTS = "AGENT.TARGET_EXISTS", "a destination file exists already; nothing was made"
    CEPH_ACCESS = (
        "AGENT.CEPH_ACCESS",
        "this host cannot reach the RBD pool: its libvirt secret is missing or not of usage ceph, or the "
        "secret's key does not open the pool (the description says which); nothing was made",
    )
    TARGET_MISMATCH = (
        "AGENT.TARGET_MISMATCH",
        "a pre-created target does not fit the volume (size, format, backing)",
    )
    ENGINE_UNAVAILABLE = (
        "AGENT.ENGINE_UNAVAILABLE",
        "no migration engine could be created (libvirt not connected)",
    )

    # The move failed: the VM runs on from its source volumes
    MIGRATION_FAILED = (
        "AGENT.MIGRATION_FAILED",
        "a step of the move failed; the VM runs on from its source volumes",
    )
    CONVERGENCE_FAILED = (
        "AGENT.CONVERGENCE_FAILED",
        "a live migration cannot converge within what the request allows (figures)",
    )
    MIGRATION_STALLED = (
        "AGENT.MIGRATION_STALLED",
        "no progress for 30 s (a cut link); aborted, the VM runs on at the source",
    )
    MIGRATION_JOB_WEDGED = (
        "AGENT.MIGRATION_JOB_WEDGED",
        "an earlier migration job of the VM never ended after its abort; restart libvirtd first",
    )
    DISK_COPY_FAILED = "AGENT.DISK_COPY_FAILED", "a disk mirror of the migration failed"
    BLOCK_JOB_FAILED = "AGENT.BLOCK_JOB_FAILED", "a block copy failed"
    BLOCK_JOB_GONE = "AGENT.BLOCK_JOB_GONE", "a block copy disappeared (the VM stopped, libvirtd lost it)"
    PIVOT_FAILED = "AGENT.PIVOT_FAILED", "a pivot failed; pivoted disks were put back on their sources"
    ROLLBACK_FAILED = (
        "AGENT.ROLLBACK_FAILED",
        "putting a pivoted disk back failed: the details name both sets of files",
    )
    VERIFY_FAILED = (
        "AGENT.VERIFY_FAILED",
        "after the switch the VM does not run from the planned volumes; nothing was removed",
    )

    # Other endings: the request's limits, an operator, a restart, the VM itself
    TIMEOUT = (
        "AGENT.TIMEOUT",
        "the task's timeout passed before the switch; the VM runs on from its source volumes",
    )
    CANCELLED = "AGENT.CANCELLED", "cancelled on request; the VM keeps its source volumes"
    INTERRUPTED = (
        "AGENT.INTERRUPTED",
        "the agent restarted during a step that cannot resume; cleaned up, send it again",
    )
    VM_STOPPED = "AGENT.VM_STOPPED", "the VM was shut down during the move"
    VM_LOCATION_UNKNOWN = (
        "AGENT.VM_LOCATION_UNKNOWN",
        "neither host could say where the VM runs; nothing was removed anywhere",
    )

    # The components the agent drives: the destination agent, libvirt, storage, transfers
    PEER_UNREACHABLE = "AGENT.PEER_UNREACHABLE", "the destination agent could not be reached"
    PEER_ERROR = "AGENT.PEER_ERROR", "the destination agent answered with an error without a code"
    LIBVIRT_ERROR = "AGENT.LIBVIRT_ERROR", "a libvirt call failed"
    LIBVIRT_OPERATION_INVALID = (
        "AGENT.LIBVIRT_OPERATION_INVALID",
        "libvirt refused the operation in the domain's current state",
    )
    LIBVIRT_UNAVAILABLE = "AGENT.LIBVIRT_UNAVAILABLE", "this agent runs without a libvirt connection"
    LIBVIRT_UNREACHABLE = "AGENT.LIBVIRT_UNREACHABLE", "libvirtd does not answer (stopped, restarting)"
    STORAGE_ERROR = "AGENT.STORAGE_ERROR", "qemu-img or a file operation failed"
    STORAGE_DAEMON = "AGENT.STORAGE_DAEMON", "qemu-storage-daemon (image transfer) failed"
    STORAGE_DAEMON_DIED = "AGENT.STORAGE_DAEMON_DIED", "qemu-storage-daemon (image transfer) died"
    TRANSFER_FAILED = (
        "AGENT.TRANSFER_FAILED",
        "an image transfer between hosts failed its verification or stopped",
    )

    # Snapshots
    INTERNAL_SNAPSHOTS = (
        "AGENT.INTERNAL_SNAPSHOTS",
        "the VM has qcow2-internal snapshots (a mirror cannot keep them); nothing made",
    )
    SNAPSHOTS_NEED_CHAIN = (
        "AGENT.SNAPSHOTS_NEED_CHAIN",
        "libvirt snapshot metadata travels only with the chain kept (withSnapshots)",
    )


@runtime_checkable
class ErrorCodeCarrier(Protocol):
    """An error that carries another agent's ErrorCode (``agent.client.ClientError``): shown as it came."""

    def to_error_code(self) -> dict[str, Any]: ...


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""

    code: Code = Code.INTERNAL
    http_status = 500

    def __init_subclass__(cls, *, code: Code | None = None, http_status: int | None = None) -> None:
        super().__init_subclass__()
        if code is not None:
            cls.code = code
        if http_status is not None:
            cls.http_status = http_status

    def __init__(
        self,
        description: str,
        *,
        details: str | None = None,
        field: str | None = None,
        code: Code | None = None,
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
    if isinstance(cause, ErrorCodeCarrier):  # ours, or another agent's as it came
        return cause.to_error_code()
    return {
        "code": Code.CAUSE,
        "description": f"{type(cause).__name__}: {cause}",
        "details": None,
        "cause": None,
    }


# The tree of the module docstring, one row a class: its stable code and the HTTP status it answers with
# (without one, its base's).
class InvalidRequest(AgentError, code=Code.INVALID_REQUEST, http_status=400): ...


class StorageNotFound(InvalidRequest, code=Code.STORAGE_NOT_FOUND): ...


class PathOutsideRoot(InvalidRequest, code=Code.PATH_OUTSIDE_ROOT): ...


class StorageKindUnsupported(InvalidRequest, code=Code.STORAGE_KIND_UNSUPPORTED): ...


class Unauthorized(AgentError, code=Code.UNAUTHORIZED, http_status=401): ...


class Forbidden(AgentError, code=Code.FORBIDDEN, http_status=403): ...


class NotFound(AgentError, code=Code.NOT_FOUND, http_status=404): ...


class Conflict(AgentError, code=Code.CONFLICT, http_status=409): ...


class PayloadTooLarge(AgentError, code=Code.PAYLOAD_TOO_LARGE, http_status=413): ...


class Busy(AgentError, code=Code.BUSY, http_status=429):
    """A limit is full; the answer carries ``Retry-After``."""

    def __init__(self, description: str, *, retry_after_s: int = 5, **kwargs: Any) -> None:
        super().__init__(description, **kwargs)
        self.retry_after_s = retry_after_s


class ServiceStopping(AgentError, code=Code.STOPPING, http_status=503): ...


class LimitsNotApplied(AgentError, code=Code.LIMITS_NOT_APPLIED, http_status=503): ...


class PreflightFailed(AgentError, code=Code.PREFLIGHT_FAILED, http_status=409): ...


class MigrationFailed(AgentError, code=Code.MIGRATION_FAILED, http_status=500): ...


class ConvergenceFailed(MigrationFailed, code=Code.CONVERGENCE_FAILED): ...


class VirtError(AgentError, code=Code.LIBVIRT_ERROR, http_status=502): ...


class StorageError(AgentError, code=Code.STORAGE_ERROR, http_status=500): ...
