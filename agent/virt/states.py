"""A domain's state as the agent names it (libvirt's ``virDomainState``, in words): what it logs, reports in
``GET /v1/vms/{uuid}`` and decides on (which engine moves the VM, where it runs after a migration)."""

from __future__ import annotations

import enum


class DomainState(enum.StrEnum):
    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    #: A state number this libvirt does not name, or a word another agent sent that this one does not know.
    UNKNOWN = "unknown"
    #: The host does not know the VM at all.
    UNDEFINED = "undefined"

    @classmethod
    def of(cls, word: object) -> DomainState:
        """The state another agent reported (``GET /v1/vms/{uuid}``); ``UNKNOWN`` for a word not listed."""
        try:
            return cls(str(word))
        except ValueError:
            return cls.UNKNOWN
