"""The evacuation request (``POST /v1/host/evacuations``) and its cancel body.

Which VMs: ``vms`` lists them (a uuid, or ``{vmUuid, destination}`` for a VM with a destination of its own),
or is ``"all"``: every VM running (or paused) on this host when the request arrives. Where to: a VM's
own ``destination``, else the next of ``destinations`` in turn (round-robin) that has room: a destination
takes at most ``incomingMigrations`` of this evacuation's moves at once (its agent's
``limits.incoming_migrations``), the next VM waits for one of them to end. What every move runs with
(``migrateVm``, ``priority``, ``strategy``, ...) is the same for all; each VM is a task of its own with the
``taskUuid`` the evacuation gives it.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import Field, field_validator

from agent.migration.request import (
    DEFAULT_PRIORITY,
    DstHost,
    MigrateVm,
    Strategy,
    Uuid,
    _Wire,
    normalise_uuid,
)

#: VMs one evacuation may name.
MAX_VMS = 1024


class EvacuationDestination(_Wire):
    """A host and one of its storage roots; at most ``incomingMigrations`` moves into it at once."""

    dstHost: DstHost
    dstPrimaryStorageUuid: Uuid
    incomingMigrations: int = Field(
        default=2,
        ge=1,
        le=64,
        description="this evacuation's moves into this destination at once (its limits.incoming_migrations)",
    )

    @field_validator("dstPrimaryStorageUuid")
    @classmethod
    def _storage(cls, value: str) -> str:
        return normalise_uuid(value)


class EvacuationVm(_Wire):
    vmUuid: Uuid
    destination: EvacuationDestination | None = Field(
        default=None, description="where this VM goes; absent: the next of destinations with room"
    )

    @field_validator("vmUuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return normalise_uuid(value)


class EvacuationRequest(_Wire):
    evacuationUuid: str | None = Field(
        default=None, description="idempotency: the same uuid and body twice give the same evacuation"
    )
    vms: list[EvacuationVm] | None = Field(
        description='"all" (every running or paused VM of this host; kept as null), or the VMs: a uuid, or '
        "{vmUuid, destination}",
    )
    destinations: list[EvacuationDestination] = Field(default_factory=list, max_length=64)
    migrateVm: MigrateVm = MigrateVm()
    withDataVolumes: bool = False
    withSnapshots: bool = False
    strategy: Strategy = Strategy.AUTO
    allowPostCopy: bool = False
    priority: int = Field(default=DEFAULT_PRIORITY, ge=1, le=100)
    timeout: float | None = Field(default=None, gt=0, le=7 * 24 * 3600, description="seconds, per VM")

    @field_validator("evacuationUuid")
    @classmethod
    def _evacuation_uuid(cls, value: str | None) -> str | None:
        return normalise_uuid(value) if value else None

    @field_validator("vms", mode="before")
    @classmethod
    def _vms(cls, value: Any) -> Any:
        if value == "all":
            return None
        if isinstance(value, str) or value is None:
            raise ValueError('"all", or a list of VMs')
        if isinstance(value, list):
            if not value:
                raise ValueError('name at least one VM, or "all"')
            if len(value) > MAX_VMS:
                raise ValueError(f"at most {MAX_VMS} VMs")
            return [{"vmUuid": vm} if isinstance(vm, str) else vm for vm in value]
        return value

    def listed(self) -> list[EvacuationVm]:
        """The listed VMs (``[]`` for ``"all"``)."""
        return list(self.vms or [])


class RunningTasks(enum.StrEnum):
    FINISH = "finish"
    ROLLBACK = "rollback"


class EvacuationCancel(_Wire):
    """``POST /v1/host/evacuations/{uuid}/cancel``: the VMs not started never start; the running ones
    finish (default) or are cancelled and roll back (``running: rollback``)."""

    running: RunningTasks = RunningTasks.FINISH
